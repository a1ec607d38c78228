"""Training-step benchmark: step time, tokens/s, MFU and peak memory of a video DiT on the real
build path (meta init, parallel layout, data-parallel engine, bf16 on GPU/NPU), with synthetic
latents of a fixed shape so the numbers measure the model and the layout, not the data.

  sora-dist bench-train --preset 1B --latent 16 64 64 --batch 1 --steps 20          # one GPU
  torchrun --nproc-per-node 8 -m sora_dist.perf.bench_train --preset 3B --latent 32 64 64 \\
      --parallel.sp_ulysses=4 --parallel.activation_checkpointing=full           # a layout

MFU is model FLOPs (``sora_dist.models.train_flops``: 3x the forward matmuls) per second over
the device's peak dense bf16 rate; it is reported only where that peak is known.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import statistics
import time
from pathlib import Path

import torch

from sora_dist import device as device_lib
from sora_dist.build import build_stack, start_distributed, stop_distributed
from sora_dist.config import load_config, resolve_model_config
from sora_dist.console import CommandParser, exit_process, positive_int, user_command
from sora_dist.diffusion import build_objective
from sora_dist.kernels import get_attention_backend
from sora_dist.kernels.fused import get_fused_backend
from sora_dist.models import count_parameters, train_flops
from sora_dist.models.flops import image_tokens
from sora_dist.parallel.mesh import MESH_DIMS
from sora_dist.perf.output import report_on_rank_zero

TEXT_DIM = 4096  # T5-XXL width
IN_CHANNELS = 16  # a current video VAE's latent channels (a preset may fix its own)


def benchmark(args, overrides: list[str]) -> dict:
    cfg = load_config(None, [f"--model.preset={args.preset}", *overrides])
    dev = device_lib.detect(cfg.parallel.device)
    world_size, _ = start_distributed(dev, cfg.parallel.collective_timeout_minutes)
    model_cfg = resolve_model_config(cfg.model, IN_CHANNELS, TEXT_DIM)
    stack = build_stack(cfg, dev, model_cfg, world_size)
    engine, dims, autocast_dtype = stack.engine, stack.dims, stack.autocast_dtype
    shape = tuple(args.latent)
    step = training_step(cfg, dev, engine, autocast_dtype, dims.sp, args.batch, shape, args.text_len)
    dev.reset_peak_memory()
    times = timed(step, dev, args.warmup, args.steps)
    if args.profile:
        profile(step, dev, Path(args.profile), int(os.environ.get("RANK", "0")))
    step_s = statistics.median(times)
    tokens = model_cfg.num_tokens(shape)
    flops_per_step = args.batch * dims.dp * train_flops(model_cfg, shape, args.text_len)  # global
    peak = dev.peak_flops
    result = {
        "date": time.strftime("%Y-%m-%d"), "device": dev.name, "world_size": world_size, "layout": dims.describe(),
        "preset": args.preset, "parameters": count_parameters(model_cfg), "latent": list(shape), "tokens_per_sample": tokens,
        "batch_per_dp_rank": args.batch, "text_len": args.text_len, "model": dataclasses.asdict(model_cfg),
        "degrees": dict(zip(MESH_DIMS, dims.degrees)), "engine": dims.engine, "activation_checkpointing": cfg.parallel.activation_checkpointing,
        "ac_every": cfg.parallel.ac_every, "reshard_after_forward": cfg.parallel.reshard_after_forward,
        "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", "1")), "threads": torch.get_num_threads(),
        "precision": str(autocast_dtype or "fp32"), "attention": get_attention_backend(), "fused": get_fused_backend(),
        "step_s_median": step_s, "step_s_min": min(times),
        "tokens_per_s_per_device": args.batch * dims.dp * tokens / step_s / world_size,
        "tflops_per_device": flops_per_step / step_s / world_size / 1e12,
        "mfu": flops_per_step / step_s / (peak * world_size) if peak else None,
        **dev.memory_stats(),
    }
    stop_distributed()
    return result


def training_step(cfg, dev: device_lib.Device, engine, autocast_dtype, sp: int, batch: int, shape: tuple[int, int, int], text_len: int):
    """A closure that runs one optimizer step of ``engine`` on fixed random latents and text."""
    model_cfg = engine.module.cfg
    objective = build_objective(cfg.diffusion, model_cfg.patch_size)
    g = torch.Generator(device=dev.torch_device).manual_seed(0)
    latents = torch.randn(batch, model_cfg.predicted_channels, *shape, generator=g, device=dev.torch_device)
    text = torch.randn(batch, text_len, TEXT_DIM, generator=g, device=dev.torch_device)
    mask = torch.ones(batch, text_len, dtype=torch.bool, device=dev.torch_device)
    denoiser = image_conditioned(engine.model, model_cfg, batch, shape, g, dev.torch_device) if model_cfg.image_dim else engine.model

    def step():
        with dev.autocast(autocast_dtype):
            loss = objective.loss(denoiser, latents, text, mask, g).mean()
        engine.backward(loss * sp)
        engine.step(lambda norm: None)

    return step


def image_conditioned(model, model_cfg, batch: int, shape: tuple[int, int, int], g, device):
    """The model fed as an image-conditioned Wan model is (I2V, FLF2V): fixed random conditioning
    channels appended to the noised latents, and fixed random CLIP image tokens; the same work
    per step as fine-tuning it would be."""
    extra = torch.randn(batch, model_cfg.in_channels - model_cfg.predicted_channels, *shape, generator=g, device=device)
    image = torch.randn(batch, image_tokens(model_cfg), model_cfg.image_dim, generator=g, device=device)
    return lambda x, t, text, mask: model(torch.cat([x, extra.to(x.dtype)], dim=1), t, text, mask, image=image)


def timed(step, dev, warmup: int, steps: int) -> list[float]:
    """Seconds of each of ``steps`` steps after ``warmup`` untimed ones, device-synchronized."""
    times = []
    for i in range(warmup + steps):
        dev.synchronize()
        start = time.perf_counter()
        step()
        dev.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def profile(step, dev, folder: Path, rank: int, steps: int = 3) -> None:
    """torch.profiler over a few steps: a Chrome trace per rank in ``folder`` and, on rank 0, the
    operators that take the most time (device time where there is a device)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.kind == "cuda" else [])
    folder.mkdir(parents=True, exist_ok=True)
    with torch_profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            step()
        dev.synchronize()
    prof.export_chrome_trace(str(folder / f"trace_rank{rank}.json"))
    if rank == 0:
        sort_by = "self_cuda_time_total" if dev.kind == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort_by, row_limit=25)
        (folder / "top_ops.txt").write_text(table)
        print(table)


def print_table(r: dict) -> None:
    print(f"\ntraining-step benchmark, {r['date']}, {r['device']} x {r['world_size']} ({r['layout']})")
    print(f"  model {r['preset']} ({r['parameters'] / 1e9:.3f}B), latent {r['latent']} = {r['tokens_per_sample']} tokens, "
          f"{r['batch_per_dp_rank']} sample(s) per data-parallel rank, {r['precision']}, attention {r['attention']}, fused kernels {r['fused']}")
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a (unknown peak: set SORA_DIST_PEAK_TFLOPS)"
    rows = [
        ("step time (median)", f"{r['step_s_median'] * 1e3:.1f} ms"),
        ("tokens/s per device", f"{r['tokens_per_s_per_device']:.0f}"),
        ("model TFLOP/s per device", f"{r['tflops_per_device']:.2f}"),
        ("MFU", mfu),
        ("peak memory", f"{r.get('mem_peak_gib', 0):.2f} GiB"),
    ]
    for name, value in rows:
        print(f"  {name:<26} {value}")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """bench-train's options, and the --section.key=value config overrides after them."""
    parser = CommandParser(prog="sora-dist bench-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="debug")
    parser.add_argument("--latent", type=positive_int, nargs=3, default=[4, 16, 16], metavar=("T", "H", "W"), help="latent frames, height, width")
    parser.add_argument("--batch", type=positive_int, default=1, help="samples per data-parallel rank")
    parser.add_argument("--text-len", type=int, default=128)
    parser.add_argument("--steps", type=positive_int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default="", help="also write the numbers to this JSON file")
    parser.add_argument("--profile", default="", help="after timing, profile 3 steps into this folder (Chrome traces, top operators)")
    return parser.parse_known_args(argv)


@user_command
def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    report_on_rank_zero(benchmark(args, overrides), print_table, args.json)
    return 0


if __name__ == "__main__":
    exit_process(main())
