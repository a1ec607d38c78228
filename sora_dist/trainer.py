"""Build order and the training loop.

``train(cfg)`` detects the device, resolves the parallel layout (rejecting impossible ones before
any process group exists), builds the mesh, streams this data-parallel rank's shards, builds the
DiT on the meta device, parallelizes and materializes it, then runs AdamW with warmup and
cosine/constant LR, gradient accumulation, clipping, EMA and bf16 on GPU/NPU, guarded against
non-finite losses. Rank 0 logs progress with ETA and writes metrics; the run ends with final
weights and, for the demo, a sampled clip and a loss plot.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor

from sora_dist import device as device_lib
from sora_dist.build import build_stack, refuse_image_conditioning, single_model, start_distributed
from sora_dist.checkpoint import CheckpointManager, TrainState, checkpoint_dir, gather_to_rank0, saves_enabled
from sora_dist.config import Config, preset_sizes, resolve_model_config, save_config
from sora_dist.data import Batch, LatentLoader, make_synthetic, read_manifest
from sora_dist.diffusion import build_objective
from sora_dist.errors import ConfigError, TrainingError
from sora_dist.interop.load import load_wan
from sora_dist.kernels import get_attention_backend
from sora_dist.kernels.fused import get_fused_backend
from sora_dist.metrics import MetricsLogger, summarize
from sora_dist.models import DiTConfig, VideoDiT, count_parameters, train_flops
from sora_dist.parallel import DeepSpeedEngine, ParallelDims, local_bytes
from sora_dist.resilience.elastic import explain_layout_error, layout_change, restart_context, shared_store_warning
from sora_dist.resilience.guard import FaultGuard
from sora_dist.resilience.health import check_links, check_ranks_answer
from sora_dist.resilience.storage import check_checkpoint_space, check_run_folders

log = logging.getLogger("sora_dist")

FP32_BYTES = 4
HEALTH_CHECK_MIB_CPU, HEALTH_CHECK_MIB_ACCELERATOR = 1, 64


class EMA:
    """fp32 exponential moving average of the trained weights (sharded like them), with DiT-style
    warm-up of the decay. Frozen weights (LoRA's base) are their own average and are not copied."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        # Names as in the single-device model, so checkpoints load across layouts.
        self.shadow = {_clean(name): p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for name, p in model.named_parameters():
            if p.requires_grad:
                self.shadow[_clean(name)].lerp_(p.detach().float(), 1 - decay)



def _diagnose(loss: float, grad_norm: Optional[float], step: int, lr: float, model, batch: Batch) -> str:
    finite_params = all(torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all() for p in model.parameters())
    grad_text = "n/a" if grad_norm is None else f"{grad_norm:.3g}"
    return (
        f"non-finite training signal at step {step}: loss {loss}, grad norm {grad_text}, lr {lr:.3g}, "
        f"parameters finite: {finite_params}, batch of {len(batch.keys)} samples of shape "
        f"{tuple(batch.latents.shape[2:])} (first keys {batch.keys[:3]}, latent |max| "
        f"{batch.latents.abs().max().item():.3g}). Likely fixes: lower optim.lr or lengthen "
        f"optim.warmup_steps; keep optim.grad_clip > 0; try train.mixed_precision=fp32 to rule out bf16 "
        f"overflow; check those samples for extreme values."
    )


def check_dataset_fits_model(model_cfg, in_channels: int, text_dim: int) -> None:
    """The model's latent channels and text width are the dataset's."""
    if (model_cfg.in_channels, model_cfg.text_dim) != (in_channels, text_dim):
        raise ConfigError(
            f"model.in_channels={model_cfg.in_channels} / model.text_dim={model_cfg.text_dim} disagree with the "
            f"dataset ({in_channels} latent channels, text width {text_dim}): set them to null to read the manifest"
        )


def resolved_config(cfg: Config, model_cfg) -> Config:
    """The config with the model's preset and dataset-derived sizes written out."""
    resolved_model = dataclasses.replace(
        cfg.model, in_channels=model_cfg.in_channels, text_dim=model_cfg.text_dim,
        hidden_size=model_cfg.hidden_size, depth=model_cfg.depth, num_heads=model_cfg.num_heads,
    )
    return dataclasses.replace(cfg, model=resolved_model)


def _prepare_data(cfg: Config, rank: int, distributed: bool) -> None:
    """Rank 0 writes the synthetic dataset if asked and missing; the others wait for it."""
    if rank == 0 and cfg.data.synthetic_if_missing and not Path(cfg.data.path).exists():
        log.info("no dataset at %s: writing %d synthetic samples", cfg.data.path, cfg.data.synthetic_samples)
        make_synthetic(cfg.data.path, cfg.data.synthetic_samples, seed=cfg.data.seed)
    if distributed:
        dist.barrier()


def train(cfg: Config) -> dict[str, float]:
    """Run training as configured; returns a summary (first/last loss, steps, seconds)."""
    dev = device_lib.detect(cfg.parallel.device)
    world_size, rank = start_distributed(dev, cfg.parallel.collective_timeout_minutes, cfg.fault.flight_recorder_entries)
    try:
        return _train(cfg, dev, world_size, rank)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@dataclasses.dataclass
class Run:
    """The live objects of one training run."""

    cfg: Config
    dev: device_lib.Device
    dims: ParallelDims
    model: VideoDiT
    engine: object
    optimizer: torch.optim.Optimizer
    ema: Optional[EMA]
    objective: object
    loader: LatentLoader
    state: TrainState
    ckpt: CheckpointManager
    metrics: MetricsLogger
    autocast_dtype: Optional[torch.dtype]
    guard: FaultGuard
    model_cfg: DiTConfig
    samples: Optional[object] = None
    """rank 0's TrainingSamples when train.sample_every is set."""
    batches: Optional[Iterator[Batch]] = None


def build_run(cfg: Config, dev, world_size: int, rank: int) -> tuple[Run, object]:
    """Everything a training run needs, on the shared build path (``sora_dist.build``), plus the
    run's own pieces: data, EMA, noise generator, checkpoint manager, metrics and fault guards.
    Folders that cannot be written, a layout the world size no longer allows, a checkpoint that
    would not fit on disk and unhealthy ranks or links all stop the run here, before the first step."""
    distributed = world_size > 1
    refuse_image_conditioning(preset_sizes(cfg.model.preset).get("image_dim"), "train")  # image conditioning is a preset's
    if cfg.lora.rank and not cfg.checkpoint.init_from:
        raise ConfigError(f"lora.rank={cfg.lora.rank} trains adapters on pretrained weights: set checkpoint.init_from (a Wan folder or "
                          "a .safetensors from `sora-dist export`); LoRA checkpoints hold the adapters alone and read the base from it")
    out_dir = Path(cfg.train.out_dir)
    if rank == 0 and (warning := shared_store_warning()):
        log.warning(warning)
    hosts = check_ranks_answer(cfg.fault.health_timeout_s) if distributed and cfg.fault.health_check else []
    check_run_folders(out_dir, checkpoint_dir(cfg.checkpoint, out_dir), saves_enabled(cfg.checkpoint))
    _prepare_data(cfg, rank, distributed)
    manifest = read_manifest(cfg.data.path)
    model_cfg = resolve_model_config(cfg.model, manifest.latent_channels, manifest.text_dim)
    check_dataset_fits_model(model_cfg, manifest.latent_channels, manifest.text_dim)
    try:
        stack = build_stack(cfg, dev, model_cfg, world_size)
    except ConfigError as err:
        raise explain_layout_error(err, world_size, cfg.parallel) from None
    one_checkpoint = checkpoint_bytes(stack.model, cfg.optim.ema_decay > 0)
    if saves_enabled(cfg.checkpoint):
        check_checkpoint_space(checkpoint_dir(cfg.checkpoint, out_dir), one_checkpoint, cfg.checkpoint.keep_last)
    if distributed and cfg.fault.health_check:
        check_links(stack.mesh, stack.dims, dev, health_check_bytes(cfg.fault, dev), cfg.fault.health_min_fraction, hosts)
    loader = LatentLoader(cfg.data, cfg.model.patch_size, dp_rank=stack.dp_rank, dp_size=stack.dims.dp, pin_memory=dev.kind != "cpu")
    cfg = resolved_config(cfg, model_cfg)
    if rank == 0:
        save_config(cfg, out_dir / "config.yaml")
    if cfg.checkpoint.init_from:
        _load_initial_weights(stack.model, cfg.checkpoint.init_from)
    if model_cfg.text_context == "padded":
        _set_empty_caption(stack.model, cfg.data.path, manifest)
    ema = EMA(stack.model, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
    # Seeded by data-parallel rank: the ranks of one SP/TP group draw the same timesteps and noise.
    generator = torch.Generator(device=dev.torch_device).manual_seed(cfg.train.seed + 1 + stack.dp_rank)
    deepspeed = stack.engine.engine if isinstance(stack.engine, DeepSpeedEngine) else None
    state = TrainState(stack.model, stack.optimizer, stack.scheduler, ema, loader, generator, stack.dp_rank, stack.dp_group, world_size, deepspeed=deepspeed)
    metrics = MetricsLogger(out_dir, cfg.train.steps, cfg.logging.tensorboard, enabled=rank == 0)
    guard = FaultGuard.build(cfg, dev, stack.dims, stack.dp_rank, rank)
    async_save = cfg.checkpoint.async_save if cfg.checkpoint.async_save is not None else dev.kind != "cpu"
    ckpt = CheckpointManager(cfg.checkpoint, out_dir, async_save, on_complete=guard.checkpointed, expected_bytes=one_checkpoint,
                             watch=guard.watching_save)
    run = Run(cfg, dev, stack.dims, stack.model, stack.engine, stack.optimizer, ema, build_objective(cfg.diffusion, model_cfg.patch_size, cfg.mask),
              loader, state, ckpt, metrics, stack.autocast_dtype, guard, model_cfg)
    if rank == 0 and 0 < cfg.train.sample_every <= cfg.train.steps:
        from sora_dist.sample import TrainingSamples

        run.samples = TrainingSamples(cfg, manifest, model_cfg.text_dim)
    return run, model_cfg


def checkpoint_bytes(model: torch.nn.Module, with_ema: bool) -> int:
    """Bytes of one checkpoint of the whole run: the fp32 trained weights (all of them, or LoRA's
    adapters), AdamW's two moments and the EMA."""
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)  # a DTensor counts its global size
    return trained * FP32_BYTES * (3 + int(with_ema))


def health_check_bytes(fault, dev) -> int:
    """The health check's message size: fault.health_check_mib, else larger on accelerators."""
    mib = fault.health_check_mib or (HEALTH_CHECK_MIB_CPU if dev.kind == "cpu" else HEALTH_CHECK_MIB_ACCELERATOR)
    return int(mib * 2**20)


def _set_empty_caption(model, data_path: str, manifest) -> None:
    """The dataset's empty-prompt states into the model: what a dropped caption becomes."""
    if not manifest.empty_caption:
        log.warning("the dataset records no empty-prompt text states (encode it again with `sora-dist encode`): captions "
                    "dropped for guidance become all-zero context, not the empty prompt's as Wan was trained")
        return
    states = torch.from_numpy(np.load(Path(data_path) / manifest.empty_caption).astype(np.float32))
    try:
        model.set_empty_caption(states)
    except ValueError as err:
        raise ConfigError(f"{Path(data_path) / manifest.empty_caption}: {err}; a text encoder whose empty prompt is that long is not supported") from None


def _load_initial_weights(model, path: str) -> None:
    """Fine-tuning: from a Wan folder each rank reads only its own shards' slices; from a file
    exported by `sora-dist export` every rank reads the file and keeps its own shards."""
    if Path(path).is_dir():
        load_wan(model, path)
        return
    if not Path(path).is_file():
        raise ConfigError(f"checkpoint.init_from={path} does not exist: export weights with `sora-dist export`, "
                          "or give a diffusers or original Wan folder")
    weights = load_file(path)
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
    log.info("initialized the weights from %s", path)


def _train(cfg: Config, dev, world_size: int, rank: int) -> dict[str, float]:
    run, model_cfg = build_run(cfg, dev, world_size, rank)
    cfg, dims = run.cfg, run.dims
    log.info(
        "device %s (%s, backend %s) | attention %s | fused kernels %s | precision %s | model %s: %.2fM parameters | dataset %s: %d samples",
        dev.kind, dev.name, dev.comm_backend, get_attention_backend(), get_fused_backend(), run.autocast_dtype or "fp32",
        cfg.model.preset, count_parameters(model_cfg) / 1e6, cfg.data.path, run.loader.manifest.num_samples,
    )
    log.info(
        "layout %s on %d ranks | parameters %.1f MiB per rank | global batch per step: %d data-parallel ranks x "
        "%d micro-batches x up to %d tokens", dims.describe(), world_size, local_bytes(run.model.parameters()) / 2**20,
        dims.dp, cfg.train.grad_accum, cfg.data.tokens_per_batch,
    )
    log.info("mask strategy: %s", cfg.mask.describe())
    resume = run.ckpt.resume(run.state)
    if resume is not None:
        change, context = layout_change(resume, dims, model_cfg), restart_context()
        if change:
            log.info("%s%s", f"{context}: " if context else "", change)
    run.batches = iter(run.loader)  # after a resume has set the loader's position
    run.metrics.resumed_at(run.state.step)
    run.guard.started(run.state.step)
    start = time.perf_counter()
    finished = False
    with stop_signals() as stop:
        try:
            steps_done = run_loop(run, stop)
            finished = True
        finally:
            run.batches.close()  # the loader thread and DataLoader workers stop here, not at exit
            run.guard.close(finished)
    run.metrics.close()
    seconds = time.perf_counter() - start
    if run.loader.skipped:
        log.warning("skipped %d corrupt samples or shards on this rank", run.loader.skipped)
    summary = {"steps": steps_done, "seconds": seconds, **(summarize(run.metrics.history) if run.metrics.history else {})}
    if not stop.requested and (cfg.checkpoint.save_final or cfg.train.sample_at_end):
        weights, ema_weights = _final_weights(run)
        if rank == 0:
            _finish(cfg, model_cfg, weights, ema_weights, run.objective, run.loader, run.metrics.history, Path(cfg.train.out_dir), dev)
    return summary


def _final_weights(run: Run) -> tuple[Optional[dict], Optional[dict]]:
    """The whole weights and EMA weights on rank 0's CPU, gathered one tensor at a time (so no
    accelerator ever holds more than one whole tensor extra); None on the other ranks."""
    ema = _ema_weights(run) if run.ema is not None else None
    deepspeed = run.state.deepspeed
    if deepspeed is not None and run.dims.world_size > 1 and deepspeed.zero_optimization_stage() == 3:
        from deepspeed.zero import GatheredParameters

        weights = {}
        for name, param in run.model.named_parameters():
            with GatheredParameters([param]):
                weights[name] = param.detach().to("cpu", copy=True)
        return (_with_buffers(run.model, weights) if dist.get_rank() == 0 else None), ema
    return gather_to_rank0(run.model.state_dict()), ema


def _ema_weights(run: Run) -> Optional[dict]:
    """The EMA weights whole on rank 0 (every rank joins), with the frozen weights and the model's
    buffers; None elsewhere."""
    frozen = {_clean(name): p for name, p in run.model.named_parameters() if not p.requires_grad}
    return _with_buffers(run.model, gather_to_rank0({**frozen, **run.ema.shadow}))


def _with_buffers(model: torch.nn.Module, weights: Optional[dict]) -> Optional[dict]:
    """Parameters (EMA's, or gathered by hand) completed with the model's saved buffers (the
    empty-prompt states), which every rank holds whole; None stays None (ranks other than 0)."""
    if weights is None:
        return None
    params = {name for name, _ in model.named_parameters()}
    buffers = {_clean(k): v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if k not in params}
    return {**buffers, **weights}


def _clean(name: str) -> str:
    """A parameter name as in the single-device model (activation checkpointing and compile add prefixes)."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def _strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_clean(k): v for k, v in state.items()}


def _finish(cfg, model_cfg, weights, ema_weights, objective, loader, history, out_dir: Path, dev) -> None:
    """Rank 0: save the final weights, then sample with a single-device copy of the model."""
    weights = _strip_wrappers(weights)
    ema_weights = _strip_wrappers(ema_weights) if ema_weights is not None else None
    if cfg.checkpoint.save_final:
        save_file(weights, str(out_dir / "model.safetensors"))
        if ema_weights is not None:
            save_file(ema_weights, str(out_dir / "ema.safetensors"))
        log.info("saved final weights to %s", out_dir)
    if cfg.train.sample_at_end:
        from sora_dist.sample import sample_report

        single = single_model(cfg, model_cfg, dev.torch_device)
        single.load_state_dict(ema_weights if ema_weights is not None else weights)
        sample_report(cfg, single, objective, loader.manifest, history, out_dir, dev)


def _write_training_samples(run: Run, step: int) -> None:
    """Gather the EMA weights (every rank joins) and sample them on rank 0."""
    weights = _ema_weights(run) if run.ema is not None else gather_to_rank0(run.model.state_dict())
    if run.samples is None:
        return
    single = single_model(run.cfg, run.model_cfg, run.dev.torch_device)
    single.load_state_dict(_strip_wrappers(weights))
    run.samples.write(step, single, run.objective, Path(run.cfg.train.out_dir), run.dev, run.metrics)


def _global_sums(values: list[float], dims, device) -> list[float]:
    """Sum over data-parallel ranks (SP/TP ranks hold copies: divide them out)."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / (dims.sp * dims.tp)).tolist()


def run_loop(run: Run, stop: "_StopFlag") -> int:
    """The optimizer steps from the resumed step on; returns the last step run. Ends early, with a
    checkpoint, on SIGTERM/SIGUSR1 (agreed on by all ranks) or after train.max_minutes."""
    cfg, dev, state = run.cfg, run.dev, run.state
    deadline = time.perf_counter() + 60 * cfg.train.max_minutes if cfg.train.max_minutes else math.inf
    window = _new_window()
    step = state.step
    while step < cfg.train.steps:
        step += 1
        run.guard.begin_step(step)
        # The loss stays on the device until the step's single host sync (the gradient norm).
        step_loss = torch.zeros((), device=dev.torch_device)
        batches = []
        for _ in range(cfg.train.grad_accum):
            batch, loss = _micro_step(run, window, step)
            batches.append(batch)
            step_loss += loss / cfg.train.grad_accum
        run.guard.phase("optimizer step")
        lr = run.engine.last_lr()
        grad_norm = run.engine.step(lambda norm: _raise(_diagnose(step_loss.item(), norm, step, lr, run.model, batches[-1])))
        loss_value = step_loss.item()
        if not math.isfinite(loss_value):
            raise TrainingError(_diagnose(loss_value, grad_norm, step, lr, run.model, batches[-1]))
        window["loss"] += loss_value
        if run.ema is not None:
            run.ema.update(run.model, step)
        for batch in batches:
            run.loader.mark_consumed(batch)
        state.step, state.samples = step, state.samples + sum(len(b.keys) for b in batches)
        run.guard.end_step(step, batches)
        window["steps"] += 1
        if step == 1:
            states = [v for s in run.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
            run.metrics.note(f"optimizer state {local_bytes(states) / 2**20:.1f} MiB per rank")
        out_of_time = time.perf_counter() > deadline
        if step % cfg.logging.log_every == 0 or step == cfg.train.steps or out_of_time:
            _log_window(window, grad_norm, lr, step, run.dims, dev, dev.peak_flops, run.metrics, run.guard)
            window = _new_window()
        with run.guard.saving():
            run.ckpt.poll()
            if stop.agreed(dev.torch_device):
                log.info("stop signal received: saving a checkpoint at step %d and exiting", step)
                run.ckpt.save(step, state, cfg, blocking=True)
                return step
            if run.ckpt.due(step):
                run.ckpt.save(step, state, cfg)
        run.guard.end_iteration()
        if cfg.train.sample_every and step % cfg.train.sample_every == 0:
            with run.guard.accounted("sampling"):
                _write_training_samples(run, step)
        if out_of_time:
            log.info("train.max_minutes=%g reached after %d steps", cfg.train.max_minutes, step)
            break
    with run.guard.saving():
        run.ckpt.wait()
        if run.ckpt.enabled and run.ckpt.last_saved_step != step:
            run.ckpt.save(step, state, cfg, blocking=True)
    return step


def _new_window() -> dict[str, float]:
    return dict.fromkeys(("loss", "samples", "tokens", "flops", "wait", "steps"), 0.0) | {"time": time.perf_counter()}


def _micro_step(run: Run, window: dict, step: int) -> tuple[Batch, torch.Tensor]:
    """Forward and backward of one micro-batch; returns the batch and its (detached) loss."""
    run.guard.phase("waiting for data")
    waited = time.perf_counter()
    batch = next(run.batches).to(run.dev.torch_device)
    waited = time.perf_counter() - waited
    window["wait"] += waited
    run.guard.waited(waited)
    run.guard.phase("forward and backward")
    with run.dev.autocast(run.autocast_dtype):
        loss = run.objective.loss(run.engine.model, batch.latents, batch.text, batch.text_mask, run.state.generator).mean()
    # Data-parallel engines average over dp x sp ranks; SP ranks each hold part of one
    # sample's gradient, so scale by the SP degree to sum them (see parallel/sequence.py).
    run.engine.backward(loss * run.dims.sp)
    shape, text_len = tuple(batch.latents.shape[2:]), batch.text.shape[1]
    window["samples"] += len(batch.keys)
    window["tokens"] += len(batch.keys) * run.model.cfg.num_tokens(shape)
    window["flops"] += len(batch.keys) * train_flops(run.model.cfg, shape, text_len, per_frame_t=run.cfg.mask.enabled)
    return batch, loss.detach()


class _StopFlag:
    """Set by SIGTERM / SIGUSR1 (what schedulers send before preemption); ranks agree on it so
    that all of them save the same step."""

    def __init__(self):
        self.requested = False

    def agreed(self, device: torch.device) -> bool:
        if not dist.is_initialized():
            return self.requested
        flag = torch.tensor(int(self.requested), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.requested = bool(flag)
        return self.requested


@contextlib.contextmanager
def stop_signals():
    stop = _StopFlag()

    def handler(signum, frame):
        stop.requested = True
        log.warning("received %s: will checkpoint after this step", signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _raise(message: str) -> None:
    raise TrainingError(message)


def _log_window(window, grad_norm, lr, step, dims, dev, peak, metrics, guard: FaultGuard) -> None:
    dev.synchronize()
    elapsed = time.perf_counter() - window["time"]
    loss_sum, samples, tokens, flops = _global_sums([window["loss"], window["samples"], window["tokens"], window["flops"]], dims, dev.torch_device)
    values = {
        "loss": loss_sum / dims.dp / window["steps"],
        "grad_norm": grad_norm,
        "lr": lr,
        "samples_per_s": samples / elapsed,
        "tokens_per_s": tokens / elapsed,
        "data_wait_frac": window["wait"] / elapsed,
        **dev.memory_stats(),
    }
    if peak:
        values["mfu"] = flops / elapsed / (peak * dims.world_size)
    values.update(guard.window(int(window["steps"]), window["wait"]))
    metrics.log(step, values)
