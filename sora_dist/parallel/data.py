"""Data-parallel engines behind one small interface the trainer uses.

- FSDP2 (``fully_shard``) per block and at the root, over the ``fsdp`` sub-mesh (dp_shard x sp),
  or HSDP over (dp_replicate, fsdp); bf16 parameters with fp32 gradient reduction on GPU/NPU.
- DDP over the ``dp_sp`` group.
- DeepSpeed ZeRO stage 1/2/3 over the ``dp_sp`` group, handed to DeepSpeed as its data-parallel
  group through a minimal ``mpu``.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from sora_dist.errors import require_extra
from sora_dist.parallel.mesh import ParallelDims, ParallelMesh


def grad_norm_across_meshes(params: list[nn.Parameter]) -> torch.Tensor:
    """Global L2 norm of the gradients, whether they are plain tensors or DTensors on different
    meshes (TP + FSDP), where torch's clip_grad_norm_ fails. DTensor computes each group's norm
    (one group per mesh and placements, so its collectives match the layout); the per-group
    norms, now plain scalars, combine here."""
    groups: dict = defaultdict(list)
    for p in params:
        if p.grad is not None:
            key = (p.grad.device_mesh, p.grad.placements) if isinstance(p.grad, DTensor) else None
            groups[key].append(p.grad.detach())
    squares = []
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        squares.append(norm.float() ** 2)
    return torch.stack(squares).sum().sqrt()


class TorchEngine:
    """FSDP2 or DDP with a torch optimizer: backward, clip, step."""

    def __init__(self, model: nn.Module, module: nn.Module, optimizer, scheduler, max_norm: float, grad_accum: int):
        self.model, self.module = model, module
        self.optimizer, self.scheduler, self.max_norm = optimizer, scheduler, max_norm
        self.grad_accum = grad_accum
        self.params = [p for p in module.parameters() if p.requires_grad]

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss; gradients accumulate until ``step``."""
        (loss / self.grad_accum).backward()

    def step(self, on_non_finite: Callable[[float], None]) -> float:
        norm = grad_norm_across_meshes(self.params)
        norm_value = norm.item()
        if not math.isfinite(norm_value):
            on_non_finite(norm_value)
        if self.max_norm > 0 and norm_value > self.max_norm:
            coef = self.max_norm / (norm_value + 1e-6)
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(coef)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm_value

    def last_lr(self) -> float:
        return self.scheduler.get_last_lr()[0]


class DeepSpeedEngine:
    """DeepSpeed ZeRO: it owns clipping, stepping and gradient accumulation boundaries."""

    def __init__(self, engine, module: nn.Module, scheduler, grad_accum: int):
        self.model, self.module, self.engine, self.scheduler = engine, module, engine, scheduler
        self.grad_accum = grad_accum
        self._micro_steps = 0

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
        self._micro_steps += 1
        if self._micro_steps < self.grad_accum:
            self.engine.step()  # DeepSpeed counts micro-steps in step(); no update before the boundary

    def step(self, on_non_finite: Callable[[float], None]) -> float:
        self.engine.step()
        self._micro_steps = 0
        norm = self.engine.get_global_grad_norm()
        norm_value = float(norm) if norm is not None else float("nan")
        if not math.isfinite(norm_value):
            on_non_finite(norm_value)
        return norm_value

    def last_lr(self) -> float:
        return self.scheduler.get_last_lr()[0]


def apply_fsdp(model: nn.Module, mesh: ParallelMesh, dims: ParallelDims, param_dtype: Optional[torch.dtype], reshard_after_forward: bool) -> None:
    """fully_shard each block, then the root (which holds embeddings and the final layer)."""
    fsdp_mesh = mesh.hsdp() if dims.dp_replicate > 1 else mesh["fsdp"]
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
    # A block's output is a view where timesteps are per frame (per_frame folds frames into the
    # batch and back); FSDP2 warns because an in-place op on it would skip the all-gather. No
    # block output is modified in place (the equivalence tests check the gradients), so say nothing.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(.*\) returned a view tensor", category=UserWarning)
    if param_dtype is not None and param_dtype != torch.float32:
        # The model's fp32 modules (Wan's time embedding, tables, affine norms): groups of their own.
        fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        for module in getattr(model, "kept_in_fp32", list)():
            fully_shard(module, mesh=fsdp_mesh, mp_policy=fp32, reshard_after_forward=reshard_after_forward)
    for block in model.blocks:
        fully_shard(block, mesh=fsdp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=fsdp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    if fsdp_mesh.device_type == "cpu":
        _sum_then_divide_on_gloo(model)


def _sum_then_divide_on_gloo(model: nn.Module) -> None:
    """FSDP2 averages gradients with ReduceOp.AVG, which gloo's reduce-scatter in torch 2.8 treats as
    SUM (gradients N times too large; torch 2.13 averages). SUM followed by FSDP's own division is
    right on every version."""
    for module in model.modules():
        if hasattr(module, "set_force_sum_reduction_for_comms"):
            module.set_force_sum_reduction_for_comms(True)


def apply_ddp(model: nn.Module, mesh: ParallelMesh, device: torch.device) -> nn.Module:
    device_ids = None if device.type == "cpu" else [device.index]
    return DistributedDataParallel(model, process_group=mesh["dp_sp"].get_group(), device_ids=device_ids)


class _DataParallelMPU:
    """The part of Megatron's ``mpu`` interface DeepSpeed asks for: our dp x sp group is its data
    parallel group, and there is no model parallelism (TP is rejected with DeepSpeed)."""

    def __init__(self, mesh: ParallelMesh):
        self.dp_group = mesh["dp_sp"].get_group()
        self.mp_group = mesh["tp"].get_group()

    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_rank(self):
        return dist.get_rank(self.dp_group)

    def get_data_parallel_world_size(self):
        return dist.get_world_size(self.dp_group)

    def get_model_parallel_group(self):
        return self.mp_group

    def get_model_parallel_rank(self):
        return 0

    def get_model_parallel_world_size(self):
        return 1


def deepspeed_config(zero_stage: int, grad_clip: float, grad_accum: int, bf16: bool) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 1,  # batches come from our loader; DeepSpeed only needs a value
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,  # set explicitly: DeepSpeed's default would be 1.0
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def deepspeed_checkpoint_classes() -> list[type]:
    """The classes DeepSpeed pickles beside tensors in its checkpoints (ZeRO 1-3 with the loss
    scaler), admitted when they are read back as weights only."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def apply_deepspeed(model: nn.Module, optimizer, scheduler, mesh: ParallelMesh, zero_stage: int, grad_clip: float, grad_accum: int, bf16: bool) -> DeepSpeedEngine:
    require_extra("deepspeed")
    import deepspeed

    if next(model.parameters()).device.type == "cpu":
        # DeepSpeed's CPU accelerator JIT-compiles shared-memory collectives (deepspeed_shm_comm,
        # ~40 s of g++ per machine and install path) for inference all-reduce, which training
        # never calls: gloo carries every collective here.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(zero_stage, grad_clip, grad_accum, bf16),
        mpu=_DataParallelMPU(mesh),
    )
    return DeepSpeedEngine(engine, model, scheduler, grad_accum)
