"""Low-rank adapters (LoRA, Hu et al. 2021) on the DiT blocks' linear layers, through peft.

``add_lora`` wraps each targeted ``nn.Linear`` of every block in peft's LoRA layer (its weights
move to ``<module>.base_layer``, the adapters are ``<module>.lora_A.default`` and ``lora_B``) and
freezes everything else. It runs on the model built on the meta device, before the parallel
wrappers, so FSDP shards the adapters with the rest and reduces only their gradients.
``VideoDiT.init_weights`` starts B at zero: the adapted model starts as the base model.
``merged`` folds the adapters back into the base weights for export.
"""

from __future__ import annotations

import re
from typing import Callable

import torch
import torch.nn as nn

from sora_dist.errors import ConfigError, require_extra

ADAPTER = "default"
TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.proj", "cross_attn.to_q", "cross_attn.to_k", "cross_attn.to_v",
           "cross_attn.proj", "mlp.fc1", "mlp.fc2")
"""Module names inside a block that can carry adapters (the default targets: all of them)."""


def add_lora(model: nn.Module, rank: int, alpha: float, targets: list[str], dropout: float = 0.0) -> None:
    """Adapters of ``rank`` (scaled by alpha / rank) on the blocks' ``targets``; the rest frozen."""
    require_extra("lora")
    from peft import LoraConfig, inject_adapter_in_model

    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise ConfigError(f"lora.targets {unknown} are not linear layers of a block: choose from {', '.join(TARGETS)}")
    widths = {target: min(model.blocks[0].get_submodule(target).weight.shape) for target in targets}
    too_narrow = {t: w for t, w in widths.items() if rank > w}
    if too_narrow:
        raise ConfigError(f"lora.rank={rank} is larger than the layers {too_narrow} (their smaller side): lower lora.rank")
    pattern = r"blocks\.\d+\.(" + "|".join(re.escape(t) for t in targets) + ")"
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern), model, adapter_name=ADAPTER)
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter(name))


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def base_name(name: str) -> str:
    """A parameter's name in the model without adapters."""
    return name.replace(".base_layer.", ".")


def stored_names(name: str, adapted: set[str]) -> list[str]:
    """The names a base parameter is stored under in an adapted model's state: the weight of an
    adapted layer with its two adapters, anything else as itself (a bias under base_layer)."""
    module, _, leaf = name.rpartition(".")
    if module not in adapted:
        return [name]
    if leaf == "bias":
        return [f"{module}.base_layer.bias"]
    return [f"{module}.base_layer.weight", f"{module}.lora_A.{ADAPTER}.weight", f"{module}.lora_B.{ADAPTER}.weight"]


def adapted_modules(names) -> set[str]:
    """The layers that carry adapters, from an adapted model's parameter names."""
    return {n.split(".lora_A.")[0] for n in names if ".lora_A." in n}


def merging_reader(read: Callable[[list[str]], dict[str, torch.Tensor]], adapted: set[str], scale: float) -> Callable[[list[str]], dict[str, torch.Tensor]]:
    """``read`` (stored names -> tensors) as a reader of base parameters with the adapters folded in."""

    def read_merged(names: list[str]) -> dict[str, torch.Tensor]:
        stored = read([s for name in names for s in stored_names(name, adapted)])
        return {name: merged(name, stored, adapted, scale) for name in names}

    return read_merged


def merged(name: str, stored: dict[str, torch.Tensor], adapted: set[str], scale: float) -> torch.Tensor:
    """Base parameter ``name`` with its layer's adapters folded in: W + scale * B A."""
    parts = [stored[n] for n in stored_names(name, adapted)]
    if len(parts) == 1:
        return parts[0]
    weight, a, b = parts
    return weight + scale * (b.to(torch.float64) @ a.to(torch.float64)).to(weight.dtype)
