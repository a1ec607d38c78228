"""Load a diffusers Wan folder into a VideoDiT laid out on any mesh, each rank reading only the
rows and columns of its own shards.

For every parameter, the rank computes which part of the global tensor it holds (its DTensor's
local shape and offset; the whole tensor on one device), maps those rows to the Wan rows they come
from (``TensorMap.rows``), and reads that range of the safetensors file through
``safe_open(...).get_slice``, which reads those bytes alone. Nothing reads a whole file, and no
rank ever holds a whole tensor it does not own (but for the patch embedding, whose Conv3d shape is
read row by row). Values are cast as they are copied in: bf16 files load into fp32 weights.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.distributed.tensor import DTensor

from sora_dist.errors import SoraDistError
from sora_dist.models.lora import base_name, is_adapter
from sora_dist.interop.wan import DIFFUSERS_CLASS, TensorMap, diffusers_name, read_config, tensor_maps, to_ours, transformer_folder, wan_model_options

log = logging.getLogger("sora_dist")
INDEX = "diffusion_pytorch_model.safetensors.index.json"
SINGLE = "diffusion_pytorch_model.safetensors"


def weight_files(folder: Path, original: bool = False) -> dict[str, tuple[Path, str]]:
    """Diffusers tensor name -> (the safetensors file holding it, its name there), from the index
    (sharded) or the one file; an original Wan checkpoint's names are translated."""
    if (folder / INDEX).is_file():
        weight_map = {name: folder / file for name, file in json.loads((folder / INDEX).read_text())["weight_map"].items()}
    elif (folder / SINGLE).is_file():
        weight_map = {name: folder / SINGLE for name in _header(folder / SINGLE)}
    else:
        raise SoraDistError(f"{folder} has neither {INDEX} nor {SINGLE}: is the download complete?")
    return {(diffusers_name(name) if original else name): (path, name) for name, path in weight_map.items()}


def _header(path: Path) -> dict:
    """A safetensors file's header (name -> dtype, shape, offsets), checked against the file size."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
            f.seek(0, 2)
            size = f.tell()
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SoraDistError(f"{path} is not a readable safetensors file ({err}): re-download it") from err
    header.pop("__metadata__", None)
    end = 8 + length + max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if size < end:
        raise SoraDistError(f"{path} is truncated ({size} bytes, its header needs {end}): re-download it")
    return header


def check_tensors(files: dict[str, tuple[Path, str]], maps: list[TensorMap]) -> None:
    """Every tensor the model needs is there with its shape, and nothing else is: one line naming
    the first tensor that is not, its file and the shape wanted."""
    headers = {path: _header(path) for path, _ in set(files.values())}
    wanted = {m.theirs: m for m in maps}
    for name, tmap in wanted.items():
        if name not in files:
            raise SoraDistError(f"tensor {name} (shape {list(tmap.theirs_shape)}) is missing from the Wan folder {next(iter(files.values()))[0].parent}")
        path, stored = files[name]
        if stored not in headers[path]:
            raise SoraDistError(f"tensor {stored} is not in {path}, where the index puts it: re-download the folder")
        shape = tuple(headers[path][stored]["shape"])
        if shape != tmap.theirs_shape:
            raise SoraDistError(f"tensor {stored} in {path} has shape {list(shape)}, the model needs {list(tmap.theirs_shape)}: "
                                "does the folder match the model's preset?")
    extra = sorted(set(files) - set(wanted))
    if extra:
        raise SoraDistError(f"tensor {files[extra[0]][1]} in {files[extra[0]][0]} has no place in the model ({len(extra)} such): "
                            "is this a different Wan variant than the preset?")


def local_part(param: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(this rank's tensor, its offset in the global tensor) of a parameter."""
    if isinstance(param, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local = param.to_local()
        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        assert tuple(shape) == tuple(local.shape), (tuple(shape), tuple(local.shape))
        return local, tuple(offset)
    return param, (0,) * param.dim()


def read_local(handle, stored: str, tmap: TensorMap, global_shape: tuple[int, ...], local_shape: tuple[int, ...], offset: tuple[int, ...]) -> torch.Tensor:
    """The part of our tensor at ``offset`` of ``local_shape``, read from Wan's tensor."""
    if not local_shape or 0 in local_shape:
        return torch.empty(local_shape)
    rows = torch.arange(offset[0], offset[0] + local_shape[0])
    if tmap.rows is not None:
        rows = tmap.rows[rows]
    first, last = int(rows.min()), int(rows.max()) + 1
    source = handle.get_slice(stored)
    if tuple(global_shape) == tmap.theirs_shape:  # same shape: read the columns too
        index = (slice(first, last), *(slice(o, o + n) for o, n in zip(offset[1:], local_shape[1:])))
        return source[index].index_select(0, rows - first)
    block = source[first:last].reshape(last - first, *global_shape[1:]).index_select(0, rows - first)
    for dim in range(1, len(local_shape)):
        block = block.narrow(dim, offset[dim], local_shape[dim])
    return block


@torch.no_grad()
def load_wan(model: torch.nn.Module, path: str | Path) -> dict:
    """Copy a diffusers Wan folder's (or an original Wan checkpoint's) weights into ``model`` (a
    VideoDiT with Wan's options, on one device or laid out on a mesh). Checks the folder's config against the model's first. Returns
    the folder's config."""
    from safetensors import safe_open

    config, folder, files = open_wan(path, model.cfg)
    maps = tensor_maps(model.cfg)
    check_tensors(files, maps)
    params = {base_name(n): p for n, p in model.named_parameters() if not is_adapter(n)}  # LoRA: the frozen base
    for tmap in maps:
        file, stored = files[tmap.theirs]
        param = params[tmap.ours]
        local, offset = local_part(param)
        # Opened per tensor: the file's memory map goes with the handle, so the pages read do not
        # stay resident (a rank's peak is its shards plus one slice, not its shards twice).
        with safe_open(str(file), framework="pt") as handle:
            local.copy_(read_local(handle, stored, tmap, tuple(param.shape), tuple(local.shape), offset))
    log.info("loaded %d Wan tensors from %s", len(maps), folder)
    return config


def initial_weights_reader(init_from: str, cfg, shapes: dict[str, torch.Size]) -> Callable[[list[str]], dict[str, torch.Tensor]]:
    """``read(names)``: whole tensors of a model (names as in its state, LoRA's ``base_layer`` too)
    from the weights a run started from, a Wan folder or a safetensors file written by `sora-dist
    export`: the frozen base of a LoRA checkpoint, which holds the adapters alone."""
    from safetensors import safe_open

    path = Path(init_from)
    if not path.exists():
        raise SoraDistError(f"{path}, the weights this LoRA run started from (checkpoint.init_from), does not exist: its "
                            "checkpoints hold the adapters alone, so the base must be where it was")
    if path.is_file():
        def read_file(names: list[str]) -> dict[str, torch.Tensor]:
            with safe_open(str(path), framework="pt") as handle:
                return {name: handle.get_tensor(base_name(name)).float() for name in names}
        return read_file
    _, _, files = open_wan(path, cfg)
    maps = {m.ours: m for m in tensor_maps(cfg)}

    def read_wan(names: list[str]) -> dict[str, torch.Tensor]:
        tensors = {}
        for name in names:
            tmap = maps[base_name(name)]
            file, stored = files[tmap.theirs]
            with safe_open(str(file), framework="pt") as handle:
                tensors[name] = to_ours(handle.get_tensor(stored), tmap, tuple(shapes[name])).float()
        return tensors
    return read_wan


def open_wan(path: str | Path, cfg) -> tuple[dict, Path, dict[str, tuple[Path, str]]]:
    """(its diffusers config, the transformer folder, ``weight_files``) of a Wan folder whose
    config matches the model's."""
    folder = transformer_folder(path)
    config, original = read_config(folder)
    check_matches(config, cfg)
    return config, folder, weight_files(folder, original)


def check_matches(config: dict, cfg) -> None:
    """The folder's Wan config against the model's: one line naming the first setting that differs."""
    plain = lambda value: tuple(value) if isinstance(value, (list, tuple)) else value  # noqa: E731
    for key, value in wan_model_options(config).items():
        ours = cfg.mlp_hidden if key == "ffn_dim" else getattr(cfg, key)
        if plain(ours) != plain(value):
            raise SoraDistError(f"the Wan folder's model has {key}={plain(value)!r}, the configured model {plain(ours)!r}: "
                                f"choose the preset of that Wan model (or set model.{key})")


def pipeline_root(path: Path) -> Optional[Path]:
    """``path`` if it is a diffusers Wan pipeline folder (model_index.json naming a Wan
    transformer, with transformer/, vae/, text_encoder/ and tokenizer/), else None."""
    index = path / "model_index.json"
    if not index.is_file():
        return None
    try:
        components = json.loads(index.read_text())
    except json.JSONDecodeError as err:
        raise SoraDistError(f"{index} is not valid JSON ({err}): re-download the pipeline's model_index.json") from err
    if DIFFUSERS_CLASS not in json.dumps(components.get("transformer", "")):
        return None
    missing = [name for name in ("transformer", "vae", "text_encoder", "tokenizer") if not (path / name).is_dir()]
    if missing:
        raise SoraDistError(f"{path} is a Wan pipeline folder without {', '.join(missing)}/: download the whole pipeline repository")
    return path
