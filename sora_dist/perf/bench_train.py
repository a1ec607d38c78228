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
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from sora_dist import device as device_lib
from sora_dist.build import build_stack, start_distributed
from sora_dist.config import load_config, resolve_model_config
from sora_dist.diffusion import build_objective
from sora_dist.kernels import get_attention_backend
from sora_dist.kernels.fused import get_fused_backend
from sora_dist.models import count_parameters, train_flops

TEXT_DIM = 4096  # T5-XXL width
IN_CHANNELS = 16  # a current video VAE's latent channels


def benchmark(args, overrides: list[str]) -> dict:
    cfg = load_config(None, [f"--model.preset={args.preset}", *overrides])
    dev = device_lib.detect(cfg.parallel.device)
    world_size, _ = start_distributed(dev, cfg.parallel.collective_timeout_minutes)
    model_cfg = resolve_model_config(cfg.model, IN_CHANNELS, TEXT_DIM)
    stack = build_stack(cfg, dev, model_cfg, world_size)
    engine, dims, autocast_dtype = stack.engine, stack.dims, stack.autocast_dtype
    objective = build_objective(cfg.diffusion, model_cfg.patch_size)
    shape = tuple(args.latent)
    g = torch.Generator(device=dev.torch_device).manual_seed(0)
    latents = torch.randn(args.batch, IN_CHANNELS, *shape, generator=g, device=dev.torch_device)
    text = torch.randn(args.batch, args.text_len, TEXT_DIM, generator=g, device=dev.torch_device)
    mask = torch.ones(args.batch, args.text_len, dtype=torch.bool, device=dev.torch_device)

    times = []
    dev.reset_peak_memory()
    for step in range(args.warmup + args.steps):
        dev.synchronize()
        start = time.perf_counter()
        with dev.autocast(autocast_dtype):
            loss = objective.loss(engine.model, latents, text, mask, g).mean()
        engine.backward(loss * dims.sp)
        engine.step(lambda norm: None)
        dev.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    tokens = model_cfg.num_tokens(shape)
    flops_per_step = args.batch * dims.dp * train_flops(model_cfg, shape, args.text_len)  # global
    peak = dev.peak_flops
    result = {
        "date": time.strftime("%Y-%m-%d"), "device": dev.name, "world_size": world_size, "layout": dims.describe(),
        "preset": args.preset, "parameters": count_parameters(model_cfg), "latent": list(shape), "tokens_per_sample": tokens,
        "batch_per_dp_rank": args.batch, "precision": str(autocast_dtype or "fp32"), "attention": get_attention_backend(), "fused": get_fused_backend(),
        "step_s_median": step_s, "step_s_min": min(times),
        "tokens_per_s_per_device": args.batch * dims.dp * tokens / step_s / world_size,
        "tflops_per_device": flops_per_step / step_s / world_size / 1e12,
        "mfu": flops_per_step / step_s / (peak * world_size) if peak else None,
        **dev.memory_stats(),
    }
    if dist.is_initialized():
        dist.destroy_process_group()
    return result


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sora-dist bench-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="debug")
    parser.add_argument("--latent", type=int, nargs=3, default=[4, 16, 16], metavar=("T", "H", "W"), help="latent frames, height, width")
    parser.add_argument("--batch", type=int, default=1, help="samples per data-parallel rank")
    parser.add_argument("--text-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default="", help="also write the numbers to this JSON file")
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.WARNING)
    result = benchmark(args, overrides)
    if int(os.environ.get("RANK", "0")) == 0:
        print_table(result)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
