"""Write a Wan-layout VideoDiT as a diffusers ``WanTransformer3DModel`` folder: config.json and
safetensors files of at most ``max_shard_bytes`` each, with diffusers' index when there are
several. Tensors are read one file's worth at a time (``read_group``), so a model larger than the
writer's memory exports in pieces; with ``--base`` a whole pipeline folder around it.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Callable

import torch

from sora_dist.errors import SoraDistError
from sora_dist.interop.load import INDEX, SINGLE
from sora_dist.interop.wan import TensorMap, diffusers_config, tensor_maps, to_theirs
from sora_dist.models import DiTConfig

log = logging.getLogger("sora_dist")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def shard_groups(maps: list[TensorMap], dtype: torch.dtype, max_shard_bytes: int) -> list[list[TensorMap]]:
    """The tensors in order, cut into groups of at most max_shard_bytes (a larger tensor alone)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    groups, size = [[]], 0
    for tmap in maps:
        nbytes = itemsize * int(torch.Size(tmap.theirs_shape).numel())
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(tmap)
        size += nbytes
    return groups


def write_diffusers(read_group: Callable[[list[str]], dict[str, torch.Tensor]], cfg: DiTConfig, out: Path,
                    dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write the transformer folder ``out``; ``read_group(names)`` returns our whole tensors by name."""
    from safetensors.torch import save_file

    maps = tensor_maps(cfg)
    groups = shard_groups(maps, dtype, max_shard_bytes)
    out.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        file = SINGLE if len(groups) == 1 else f"diffusion_pytorch_model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        ours = read_group([m.ours for m in group])
        theirs = {m.theirs: to_theirs(ours.pop(m.ours), m).to(dtype).contiguous() for m in group}
        save_file(theirs, str(out / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in theirs.values())
        weight_map.update({name: file for name in theirs})
        log.info("export: wrote %s (%d/%d)", file, i + 1, len(groups))
    if len(groups) > 1:
        (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(diffusers_config(cfg), indent=2))
    return out


LORA_FILE = "pytorch_lora_weights.safetensors"
"""The file diffusers' ``load_lora_weights`` / ``load_lora_adapter`` read from a folder."""


def write_lora(read: Callable[[list[str]], dict[str, torch.Tensor]], cfg: DiTConfig, adapted: set[str], scale: float, out: Path,
               dtype: torch.dtype = torch.bfloat16) -> Path:
    """The adapters alone, under diffusers' names for the Wan transformer (``transformer.<layer>.
    lora_A.weight`` and ``lora_B``), in ``out/pytorch_lora_weights.safetensors``. B takes the
    layout changes of its layer's weight rows (RoPE's interleaving); the scale alpha / rank is
    folded into B, since diffusers applies 1 without the original alpha."""
    from safetensors.torch import save_file

    from sora_dist.models.lora import ADAPTER

    by_weight = {m.ours: m for m in tensor_maps(cfg)}
    tensors = {}
    for layer in sorted(adapted):
        weight_map = by_weight[f"{layer}.weight"]
        stored = read([f"{layer}.lora_A.{ADAPTER}.weight", f"{layer}.lora_B.{ADAPTER}.weight"])
        a, b = stored[f"{layer}.lora_A.{ADAPTER}.weight"], stored[f"{layer}.lora_B.{ADAPTER}.weight"] * scale
        theirs = weight_map.theirs.removesuffix(".weight")
        b_map = TensorMap(layer, theirs, tuple(b.shape), weight_map.rows)
        tensors[f"transformer.{theirs}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"transformer.{theirs}.lora_B.weight"] = to_theirs(b, b_map).to(dtype).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / LORA_FILE), metadata={"format": "pt"})
    return out / LORA_FILE


def pipeline_around(base: Path, out: Path) -> None:
    """A pipeline folder ``out`` around the transformer exported to ``out/transformer``: the base
    pipeline's model_index.json and every other component linked (VAE, text encoder, tokenizer,
    scheduler)."""
    index = base / "model_index.json"
    if not index.is_file():
        raise SoraDistError(f"{base} has no model_index.json: --base takes a diffusers Wan pipeline folder (e.g. Wan2.1-T2V-1.3B-Diffusers)")
    components = json.loads(index.read_text())
    if "transformer_2" in components and components["transformer_2"] and components["transformer_2"][0] is not None:
        raise SoraDistError(f"{base} is a two-expert pipeline (transformer_2): export each expert and assemble the pipeline by hand")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(index, out / "model_index.json")
    for entry in base.iterdir():
        if entry.name in ("transformer", "model_index.json") or (out / entry.name).exists():
            continue
        (out / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
