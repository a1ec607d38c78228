"""The build path every entry point shares: process group, parallel layout, mesh, kernels, model,
parallelization, optimizer and data-parallel engine, in that order.

The trainer, the benchmarks, the sampler and the performance model all call these functions, so
a layout that trains is the layout that is benchmarked and the layout the planner accepts.

  dev = device.detect(cfg.parallel.device)
  world_size, rank = start_distributed(dev, cfg.parallel.collective_timeout_minutes)
  stack = build_stack(cfg, dev, model_cfg, world_size)   # -> TrainingStack
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from sora_dist import device as device_lib
from sora_dist.config import Config, resolve_model_config
from sora_dist.errors import ConfigError
from sora_dist.kernels import select_attention_backend, set_attention_backend
from sora_dist.kernels.fused import select_fused_backend, set_fused_backend
from sora_dist.models import DiTConfig, VideoDiT
from sora_dist.parallel import ParallelDims, ParallelMesh, build_mesh, make_engine, parallelize, resolve_dims

__all__ = [
    "TrainingStack", "autocast_dtype", "build_optimizer", "build_stack", "check_launcher", "lr_factor", "param_groups",
    "resolve_model_config", "select_kernels", "start_distributed",
]

TORCHRUN_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
FLIGHT_RECORDER_VARIABLES = ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE")  # the second: its name before torch 2.8


def check_launcher(environ=os.environ) -> None:
    """Stop a multi-task SLURM step that was started without torchrun: each task would otherwise
    believe it is rank 0 of a world of one, and all of them would write the same run folder."""
    tasks = int(environ.get("SLURM_NTASKS", environ.get("SLURM_STEP_NUM_TASKS", "1")) or 1)
    if tasks > 1 and not all(name in environ for name in TORCHRUN_VARIABLES):
        raise ConfigError(
            f"this SLURM step has {tasks} tasks but none was started by torchrun (WORLD_SIZE/RANK/LOCAL_RANK are unset), "
            "so each would train alone as rank 0 into the same folder. Launch with `sbatch launch/slurm.sbatch ...` "
            "(one torchrun per node) or `srun --ntasks-per-node=1 torchrun --nproc-per-node=N ... -m sora_dist.train ...`"
        )


def stop_distributed() -> None:
    """Leave the process group at the normal end of a job: a barrier, so that no rank's last
    collective is still in flight, then destroy it. Not for error paths: a barrier there waits for
    ranks that may be gone. End such a process with ``console.exit_process``: gloo's worker
    threads can outlive the group and abort the interpreter's finalization (see there)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def start_distributed(dev: device_lib.Device, timeout_minutes: float = 10.0, flight_recorder_entries: int = 0) -> tuple[int, int]:
    """Join the process group torchrun describes (if more than one process); returns (world size,
    rank). The backend covers the accelerator and the CPU (``Device.comm_backend``), so the small
    CPU collectives of checkpoints and the data position work on GPU/NPU clusters too. With
    ``flight_recorder_entries``, the group records its recent collectives for the step watchdog's
    dump (unless TORCH_FR_BUFFER_SIZE is already set)."""
    check_launcher()
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if flight_recorder_entries and not any(name in os.environ for name in FLIGHT_RECORDER_VARIABLES):
        os.environ["TORCH_FR_BUFFER_SIZE"] = str(flight_recorder_entries)  # read when the group is made (torch >= 2.8)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(dev.comm_backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return world_size, rank


def autocast_dtype(cfg: Config, dev: device_lib.Device) -> Optional[torch.dtype]:
    """bf16 autocast on GPU/NPU for mixed_precision auto or bf16; None is full fp32."""
    mode = cfg.train.mixed_precision
    if mode == "auto":
        mode = "fp32" if dev.kind == "cpu" else "bf16"
    return torch.bfloat16 if mode == "bf16" else None


def select_kernels(cfg: Config, dev: device_lib.Device) -> None:
    """Pick the attention and fused-kernel backends once, from the device and the config."""
    attention = cfg.model.attention_backend
    set_attention_backend(select_attention_backend(dev.kind, dev.capability) if attention == "auto" else attention)
    fused = cfg.model.fused_backend
    set_fused_backend(select_fused_backend(dev.kind) if fused == "auto" else fused)


def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only; norms, biases and the null-text token are not decayed."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:  # frozen base weights under LoRA are not the optimizer's
            (decay if p.dim() >= 2 and p.shape[0] > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: Config):
    """AdamW with linear warmup, then cosine or constant LR."""
    o = cfg.optim
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, o.warmup_steps, cfg.train.steps, o.schedule, o.min_lr_ratio)
    )
    return optimizer, scheduler


@dataclass
class TrainingStack:
    """A model laid out on the mesh, with its optimizer and data-parallel engine."""

    dev: device_lib.Device
    dims: ParallelDims
    mesh: Optional[ParallelMesh]
    model_cfg: DiTConfig
    model: VideoDiT
    optimizer: torch.optim.Optimizer
    scheduler: object
    engine: object
    autocast_dtype: Optional[torch.dtype]

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel index: which samples it reads and which noise it draws."""
        return self.mesh["dp"].get_local_rank() if self.mesh is not None else 0

    @property
    def dp_group(self):
        return self.mesh["dp"].get_group() if self.mesh is not None else None


def build_stack(cfg: Config, dev: device_lib.Device, model_cfg: DiTConfig, world_size: int) -> TrainingStack:
    """Layout, mesh, kernels, then the model built on the meta device, parallelized and
    materialized, with AdamW and its engine. Every rank gets the same initial weights."""
    dims = resolve_dims(cfg.parallel, world_size, model_cfg)
    if dims.engine == "deepspeed" and world_size > 1 and cfg.parallel.zero_stage == 3 and cfg.optim.ema_decay > 0:
        raise ConfigError("optim.ema_decay > 0 needs whole parameters; DeepSpeed ZeRO-3 partitions them: set optim.ema_decay=0 or use engine=fsdp")
    mesh = build_mesh(dims, dev.kind) if world_size > 1 else None
    select_kernels(cfg, dev)
    dtype = autocast_dtype(cfg, dev)
    torch.manual_seed(cfg.train.seed)
    with torch.device("meta"):
        model = VideoDiT(model_cfg)
    add_adapters(model, cfg)
    parallelize(model, cfg.parallel, dims, mesh, dev.torch_device, dtype)
    optimizer, scheduler = build_optimizer(model, cfg)
    engine = make_engine(model, cfg.parallel, dims, mesh, dev.torch_device, optimizer, scheduler, cfg.optim.grad_clip, cfg.train.grad_accum, dtype is not None)
    return TrainingStack(dev, dims, mesh, model_cfg, model, optimizer, scheduler, engine, dtype)


def frozen_base_reader(cfg: Config, model_cfg: DiTConfig, shapes: dict):
    """For a LoRA run, a reader of its frozen base weights from checkpoint.init_from (its
    checkpoints hold the adapters alone); None otherwise."""
    if not (cfg.lora.rank and cfg.checkpoint.init_from):
        return None
    from sora_dist.interop.load import initial_weights_reader

    return initial_weights_reader(cfg.checkpoint.init_from, model_cfg, shapes)


def refuse_image_conditioning(image_dim, command: str) -> None:
    """One line for a model that reads CLIP image tokens (Wan 2.1 I2V, FLF2V): the data pipeline
    and the samplers do not provide them yet."""
    if image_dim is not None:
        raise ConfigError(f"{command}: this model reads CLIP image tokens (Wan 2.1 I2V / FLF2V), which sora_dist's data and samplers "
                          "do not provide yet; it imports, exports, plans and benchmarks (bench-train). For image-to-video "
                          "fine-tuning and sampling use wan2.2-ti2v-5b (the first frame given at timestep 0)")


def build_single_device_model(cfg: Config, in_channels: int, text_dim: int, torch_device: torch.device) -> VideoDiT:
    """A single-device model for the config: built on meta, then materialized and initialized."""
    return single_model(cfg, resolve_model_config(cfg.model, in_channels, text_dim), torch_device)


def single_model(cfg: Config, model_cfg: DiTConfig, torch_device: torch.device) -> VideoDiT:
    """The run's model (with its adapters, if any) on one device, initialized."""
    with torch.device("meta"):
        model = VideoDiT(model_cfg)
    add_adapters(model, cfg)
    model.to_empty(device=torch_device)
    model.init_weights()
    return model


def add_adapters(model: VideoDiT, cfg: Config) -> None:
    """LoRA adapters per ``cfg.lora`` (none at rank 0); the base weights then stay frozen."""
    if cfg.lora.rank:
        from sora_dist.models.lora import add_lora

        add_lora(model, cfg.lora.rank, cfg.lora.resolved_alpha, cfg.lora.targets, cfg.lora.dropout)
