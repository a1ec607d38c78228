"""Parallelism applied from outside the single-device model, in a fixed order (torchtitan's):
sequence parallel plan, tensor parallel plan, activation checkpointing, compile, then the
data-parallel engine. See mesh.py for the mesh and its sub-meshes."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

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
from sora_dist.parallel.mesh import MESH_DIMS, ParallelDims, ParallelMesh, build_mesh, local_bytes, resolve_dims
from sora_dist.parallel.sequence import apply_sequence_parallel
from sora_dist.parallel.tensor import TP_PLAN, apply_tensor_parallel


def apply_model_parallel(model: nn.Module, cfg: ParallelConfig, dims: ParallelDims, mesh: Optional[ParallelMesh]) -> None:
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


def materialize(model: nn.Module, device: torch.device) -> None:
    model.to_empty(device=device)
    model.init_weights()


def parallelize(model: nn.Module, cfg: ParallelConfig, dims: ParallelDims, mesh: Optional[ParallelMesh], device, param_dtype) -> nn.Module:
    """Apply the layout to a model built on the meta device and materialize it.

    FSDP on an accelerator follows the meta -> parallelize -> materialize -> init order, so no rank
    ever holds the whole model. On CPU, DTensor's RNG tracker is unavailable and every shard would
    draw the same numbers, and DDP / DeepSpeed wrap real tensors: there the full model is
    initialized first (same seed on every rank) and then sharded.
    """
    init_first = mesh is None or device.type == "cpu" or dims.engine != "fsdp"
    if init_first:
        materialize(model, device)
    if mesh is not None:
        apply_model_parallel(model, cfg, dims, mesh)
        if dims.engine == "fsdp":
            apply_fsdp(model, mesh, dims, param_dtype, cfg.reshard_after_forward)
    if not init_first:
        materialize(model, device)
    return model


def make_engine(model, cfg: ParallelConfig, dims: ParallelDims, mesh, device, optimizer, scheduler, grad_clip: float, grad_accum: int, bf16: bool):
    """Wrap the parallelized model in its data-parallel engine."""
    if mesh is not None and dims.engine == "deepspeed":
        return apply_deepspeed(model, optimizer, scheduler, mesh, cfg.zero_stage, grad_clip, grad_accum, bf16)
    wrapped = apply_ddp(model, mesh, device) if mesh is not None and dims.engine == "ddp" else model
    return TorchEngine(wrapped, model, optimizer, scheduler, grad_clip, grad_accum)


__all__ = [
    "MESH_DIMS", "ParallelDims", "ParallelMesh", "build_mesh", "resolve_dims", "local_bytes", "apply_model_parallel", "parallelize", "make_engine",
    "apply_fsdp", "apply_ddp", "apply_deepspeed", "TorchEngine", "DeepSpeedEngine", "grad_norm_across_meshes", "TP_PLAN",
]
