"""Parallelism applied from outside the single-device model, in a fixed order (torchtitan's):
sequence parallel plan, tensor parallel plan, activation checkpointing, compile, then the
data-parallel engine. See mesh.py for the mesh and its sub-meshes."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from sora_dist.config import ParallelConfig
from sora_dist.parallel.activation import apply_activation_checkpointing, apply_compile
from sora_dist.parallel.data import (
    DeepSpeedEngine,
    TorchEngine,
    apply_ddp,
    apply_deepspeed,
    apply_fsdp,
    grad_norm_across_meshes,
)
from sora_dist.parallel.mesh import MESH_DIMS, ParallelDims, build_mesh, local_bytes, resolve_dims
from sora_dist.parallel.sequence import apply_sequence_parallel
from sora_dist.parallel.tensor import TP_PLAN, apply_tensor_parallel


def apply_model_parallel(model: nn.Module, cfg: ParallelConfig, dims: ParallelDims, mesh: Optional[DeviceMesh]) -> None:
    """SP plan, TP plan, activation checkpointing and compile: everything before data parallel."""
    if dims.sp > 1:
        sp_mesh = mesh["sp"]
        apply_sequence_parallel(
            model,
            sp_rank=sp_mesh.get_local_rank(),
            sp_group=sp_mesh.get_group(),
            ulysses_group=mesh["sp_ulysses"].get_group() if dims.sp_ulysses > 1 else None,
            ring_group=mesh["sp_ring"].get_group() if dims.sp_ring > 1 else None,
        )
    if dims.tp > 1:
        apply_tensor_parallel(model, mesh["tp"])
    apply_activation_checkpointing(model, cfg.activation_checkpointing, cfg.ac_every)
    if cfg.compile:
        apply_compile(model)


__all__ = [
    "MESH_DIMS", "ParallelDims", "build_mesh", "resolve_dims", "local_bytes", "apply_model_parallel",
    "apply_fsdp", "apply_ddp", "apply_deepspeed", "TorchEngine", "DeepSpeedEngine", "grad_norm_across_meshes", "TP_PLAN",
]
