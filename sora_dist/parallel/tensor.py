"""Tensor parallelism: a DTensor plan for the DiT blocks, a plain dict from module names to
styles (attribute names of sora_dist.models.dit are API).

Attention projections q/k/v are column-parallel (each rank gets whole heads; the model infers
its local head count from the width) and the output projection row-parallel; the MLP likewise.
The residual stream stays replicated across TP ranks: the adaLN-modulated norms mix per-sample
shift/scale into every token, and at our TP degrees (2-8, within a node) keeping them whole
costs less than the extra all-gather/reduce-scatter pair of sequence-parallel norms.
"""

from __future__ import annotations

from fnmatch import fnmatch

import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, SequenceParallel, parallelize_module

TP_PLAN = {
    "blocks.*.attn.to_q": ColwiseParallel(),
    "blocks.*.attn.to_k": ColwiseParallel(),
    "blocks.*.attn.to_v": ColwiseParallel(),
    "blocks.*.attn.proj": RowwiseParallel(),
    "blocks.*.cross_attn.to_q": ColwiseParallel(),
    "blocks.*.cross_attn.to_k": ColwiseParallel(),
    "blocks.*.cross_attn.to_v": ColwiseParallel(),
    "blocks.*.cross_attn.proj": RowwiseParallel(),
    "blocks.*.cross_attn.image_k": ColwiseParallel(),  # image-conditioned models only (Wan I2V)
    "blocks.*.cross_attn.image_v": ColwiseParallel(),
    # QK-norm weights are shared by all heads while each rank holds only its own heads: run the
    # norms on DTensors sharded along the head dimension (dim 1 of (B, H, N, Dh)) so that the
    # weights' gradients are reduced over the TP group.
    "blocks.*.attn.q_norm": SequenceParallel(sequence_dim=1, use_local_output=True),
    "blocks.*.attn.k_norm": SequenceParallel(sequence_dim=1, use_local_output=True),
    "blocks.*.cross_attn.q_norm": SequenceParallel(sequence_dim=1, use_local_output=True),
    "blocks.*.cross_attn.k_norm": SequenceParallel(sequence_dim=1, use_local_output=True),
    "blocks.*.cross_attn.image_k_norm": SequenceParallel(sequence_dim=1, use_local_output=True),
    "blocks.*.mlp.fc1": ColwiseParallel(),
    "blocks.*.mlp.fc2": RowwiseParallel(),
}


def resolved_plan(model: nn.Module) -> dict[str, ParallelStyle]:
    """TP_PLAN on ``model``'s own module names. Entries that name no module are dropped (a model
    without image conditioning has no image projections). A layer carrying LoRA adapters (peft's
    wrapper: ``base_layer``, ``lora_A``, ``lora_B``) is split as its base is: column-parallel
    shards the base and B by output rows and keeps A whole (its input is whole); row-parallel
    shards the base and A by input columns (A's output is then summed over the ranks) and keeps B
    whole. Either way the adapter's output is laid out as the base layer's, so they add."""
    plan: dict[str, ParallelStyle] = {}
    for name, module in model.named_modules():
        style = next((style for path, style in TP_PLAN.items() if fnmatch(name, path)), None)
        if style is None:
            continue
        if not hasattr(module, "base_layer"):
            plan[name] = style
            continue
        plan[f"{name}.base_layer"] = style
        adapter = {ColwiseParallel: "lora_B", RowwiseParallel: "lora_A"}[type(style)]
        for key in getattr(module, adapter):
            plan[f"{name}.{adapter}.{key}"] = type(style)()
    return plan


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """The plan applied. parallelize_module re-creates each parameter it distributes as a new
    nn.Parameter, which requires grad: frozen ones (LoRA's base) are frozen again."""
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    parallelize_module(model, tp_mesh, resolved_plan(model))
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
