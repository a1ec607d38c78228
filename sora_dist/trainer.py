"""Build order and the training loop.

``train(cfg)`` detects the device, streams the shards, builds the DiT on the meta device and
materializes it, then runs AdamW with warmup and cosine/constant LR, gradient accumulation,
clipping, EMA and bf16 autocast on GPU/NPU, guarded against non-finite losses. Rank 0 logs
progress with ETA and writes metrics; the run ends with final weights and, for the demo, a
sampled clip and a loss plot.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from pathlib import Path
from typing import Iterator, Optional

import torch
from safetensors.torch import save_file

from sora_dist import device as device_lib
from sora_dist.config import Config, save_config
from sora_dist.data import Batch, LatentLoader, make_synthetic
from sora_dist.diffusion import build_objective
from sora_dist.errors import ConfigError, TrainingError
from sora_dist.kernels import get_attention_backend, set_attention_backend
from sora_dist.metrics import MetricsLogger, summarize
from sora_dist.models import VideoDiT, count_parameters, resolve_model_config, train_flops

log = logging.getLogger("sora_dist")


class EMA:
    """fp32 exponential moving average of the weights, with DiT-style warm-up of the decay."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for name, p in model.named_parameters():
            self.shadow[name].lerp_(p.detach().float(), 1 - decay)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for name, p in model.named_parameters():
            p.copy_(self.shadow[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.contiguous() for name, t in self.shadow.items()}


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
        (decay if p.dim() >= 2 and p.shape[0] > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _check_layout(cfg: Config) -> None:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    p = cfg.parallel
    degrees = {"dp_replicate": p.dp_replicate, "sp_ring": p.sp_ring, "sp_ulysses": p.sp_ulysses, "tp": p.tp}
    if p.dp_shard != -1:
        degrees["dp_shard"] = p.dp_shard
    too_big = {k: v for k, v in degrees.items() if v > 1}
    if world_size > 1 or too_big:
        raise ConfigError(
            f"this build trains on one rank (WORLD_SIZE={world_size}, parallel degrees {too_big or 'all 1'}): "
            f"multi-rank data/sequence/tensor parallelism is not implemented yet; run with --nproc-per-node 1 "
            f"and leave the parallel degrees at 1"
        )


def _diagnose(loss: float, grad_norm: Optional[float], step: int, lr: float, model, batch: Batch) -> str:
    finite_params = all(torch.isfinite(p).all() for p in model.parameters())
    grad_text = "n/a" if grad_norm is None else f"{grad_norm:.3g}"
    return (
        f"non-finite training signal at step {step}: loss {loss}, grad norm {grad_text}, lr {lr:.3g}, "
        f"parameters finite: {finite_params}, batch of {len(batch.keys)} samples of shape "
        f"{tuple(batch.latents.shape[2:])} (first keys {batch.keys[:3]}, latent |max| "
        f"{batch.latents.abs().max().item():.3g}). Likely fixes: lower optim.lr or lengthen "
        f"optim.warmup_steps; keep optim.grad_clip > 0; try train.mixed_precision=fp32 to rule out bf16 "
        f"overflow; check those samples for extreme values."
    )


def _autocast_dtype(cfg: Config, dev: device_lib.Device) -> Optional[torch.dtype]:
    mode = cfg.train.mixed_precision
    if mode == "auto":
        mode = "fp32" if dev.kind == "cpu" else "bf16"
    return torch.bfloat16 if mode == "bf16" else None


def build_model(cfg: Config, in_channels: int, text_dim: int, torch_device: torch.device) -> VideoDiT:
    """Construct on the meta device (no memory, no init cost), then materialize and init."""
    model_cfg = resolve_model_config(cfg.model, in_channels, text_dim)
    if (model_cfg.in_channels, model_cfg.text_dim) != (in_channels, text_dim):
        raise ConfigError(
            f"model.in_channels={model_cfg.in_channels} / model.text_dim={model_cfg.text_dim} disagree with the "
            f"dataset ({in_channels} latent channels, text width {text_dim}): set them to null to read the manifest"
        )
    with torch.device("meta"):
        model = VideoDiT(model_cfg)
    model.to_empty(device=torch_device)
    model.init_weights()
    return model


def resolved_config(cfg: Config, model: VideoDiT) -> Config:
    """The config with the model's preset and dataset-derived sizes written out."""
    m = model.cfg
    resolved_model = dataclasses.replace(
        cfg.model, in_channels=m.in_channels, text_dim=m.text_dim, hidden_size=m.hidden_size, depth=m.depth, num_heads=m.num_heads
    )
    return dataclasses.replace(cfg, model=resolved_model)


def train(cfg: Config) -> dict[str, float]:
    """Run training as configured; returns a summary (first/last loss, steps, seconds)."""
    _check_layout(cfg)
    dev = device_lib.detect(cfg.parallel.device)
    torch.manual_seed(cfg.train.seed)
    out_dir = Path(cfg.train.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.data.synthetic_if_missing and not Path(cfg.data.path).exists():
        log.info("no dataset at %s: writing %d synthetic samples", cfg.data.path, cfg.data.synthetic_samples)
        make_synthetic(cfg.data.path, cfg.data.synthetic_samples, seed=cfg.data.seed)
    loader = LatentLoader(cfg.data, cfg.model.patch_size)
    set_attention_backend(dev.default_attention_backend if cfg.model.attention_backend == "auto" else cfg.model.attention_backend)
    model = build_model(cfg, loader.manifest.latent_channels, loader.manifest.text_dim, dev.torch_device)
    cfg = resolved_config(cfg, model)
    save_config(cfg, out_dir / "config.yaml")

    o = cfg.optim
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, o.warmup_steps, cfg.train.steps, o.schedule, o.min_lr_ratio)
    )
    ema = EMA(model, o.ema_decay) if o.ema_decay > 0 else None
    objective = build_objective(cfg.diffusion, model.cfg.patch_size)
    generator = torch.Generator(device=dev.torch_device).manual_seed(cfg.train.seed + 1)
    autocast_dtype = _autocast_dtype(cfg, dev)
    log.info(
        "device %s (%s, backend %s) | attention %s | precision %s | model %s: %.2fM parameters | dataset %s: %d samples",
        dev.kind, dev.name, dev.comm_backend, get_attention_backend(), autocast_dtype or "fp32",
        cfg.model.preset, count_parameters(model.cfg) / 1e6, cfg.data.path, loader.manifest.num_samples,
    )

    metrics = MetricsLogger(out_dir, cfg.train.steps, cfg.logging.tensorboard)
    start = time.perf_counter()
    steps_done = run_loop(cfg, model, optimizer, scheduler, ema, objective, iter(loader), generator, autocast_dtype, dev, metrics)
    metrics.close()
    seconds = time.perf_counter() - start
    if loader.skipped:
        log.warning("skipped %d corrupt samples or shards in total", loader.skipped)

    if cfg.checkpoint.save_final:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out_dir / "model.safetensors"))
        if ema is not None:
            save_file(ema.state_dict(), str(out_dir / "ema.safetensors"))
        log.info("saved final weights to %s", out_dir)
    summary = {**summarize(metrics.history), "steps": steps_done, "seconds": seconds} if metrics.history else {"steps": steps_done, "seconds": seconds}
    if cfg.train.sample_at_end:
        from sora_dist.sampling import sample_report

        if ema is not None:
            ema.copy_to(model)
        sample_report(cfg, model, objective, loader, metrics.history, out_dir, dev)
    return summary


def run_loop(cfg, model, optimizer, scheduler, ema, objective, batches: Iterator[Batch], generator, autocast_dtype, dev, metrics) -> int:
    """The optimizer steps; returns how many ran (train.max_minutes may end the run early)."""
    peak = dev.peak_flops
    deadline = time.perf_counter() + 60 * cfg.train.max_minutes if cfg.train.max_minutes else math.inf
    window = {"loss": 0.0, "samples": 0, "tokens": 0, "flops": 0.0, "wait": 0.0, "steps": 0, "time": time.perf_counter()}
    grad_norm = None
    for step in range(1, cfg.train.steps + 1):
        for _ in range(cfg.train.grad_accum):
            waited = time.perf_counter()
            batch = next(batches).to(dev.torch_device)
            window["wait"] += time.perf_counter() - waited
            with dev.autocast(autocast_dtype):
                loss = objective.loss(model, batch.latents, batch.text, batch.text_mask, generator).mean()
            if not torch.isfinite(loss):
                raise TrainingError(_diagnose(loss.item(), grad_norm, step, scheduler.get_last_lr()[0], model, batch))
            (loss / cfg.train.grad_accum).backward()
            shape, text_len = tuple(batch.latents.shape[2:]), batch.text.shape[1]
            window["loss"] += loss.item() / cfg.train.grad_accum
            window["samples"] += len(batch.keys)
            window["tokens"] += len(batch.keys) * model.cfg.num_tokens(shape)
            window["flops"] += len(batch.keys) * train_flops(model.cfg, shape, text_len)
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
        if not math.isfinite(grad_norm):
            raise TrainingError(_diagnose(window["loss"], grad_norm, step, scheduler.get_last_lr()[0], model, batch))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        if ema is not None:
            ema.update(model, step)
        window["steps"] += 1
        if step % cfg.logging.log_every == 0 or step == cfg.train.steps or time.perf_counter() > deadline:
            dev.synchronize()
            elapsed = time.perf_counter() - window["time"]
            values = {
                "loss": window["loss"] / window["steps"],
                "grad_norm": grad_norm,
                "lr": lr,
                "samples_per_s": window["samples"] / elapsed,
                "tokens_per_s": window["tokens"] / elapsed,
                "data_wait_frac": window["wait"] / elapsed,
                **dev.memory_stats(),
            }
            if peak:
                values["mfu"] = window["flops"] / elapsed / peak
            metrics.log(step, values)
            window = {"loss": 0.0, "samples": 0, "tokens": 0, "flops": 0.0, "wait": 0.0, "steps": 0, "time": time.perf_counter()}
        if time.perf_counter() > deadline:
            log.info("train.max_minutes=%g reached after %d steps", cfg.train.max_minutes, step)
            return step
    return cfg.train.steps
