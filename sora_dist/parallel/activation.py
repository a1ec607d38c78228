"""Activation checkpointing and per-block torch.compile, applied to the DiT blocks in place."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int) -> int:
    """Wrap every block (full) or every ``every``-th block (selective); returns how many."""
    if mode == "none":
        return 0
    chosen = [i for i in range(len(model.blocks)) if mode == "full" or i % every == 0]
    for i in chosen:
        model.blocks[i] = checkpoint_wrapper(model.blocks[i], preserve_rng_state=False)
    return len(chosen)


def apply_compile(model: nn.Module) -> None:
    """Compile each block separately: shapes repeat across blocks, so one graph serves all."""
    for i, block in enumerate(model.blocks):
        model.blocks[i] = torch.compile(block, dynamic=True)
