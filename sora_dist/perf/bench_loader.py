"""Loader benchmark: stream latent shards through the real loader with N workers and report
samples/s, MB/s, and the data wait against a training step.

  sora-dist bench-loader                                   # demo, XL 256px and XL 512px profiles
  sora-dist bench-loader --profiles xl512 --workers 4 8 --step-ms xl512=180 --json loader.json
  sora-dist bench-loader --data /data/latents --config configs/dit_xl.yaml --step-ms custom=150

Each profile writes shards of its sample size to a temporary folder (or streams ``--data``):
- ``demo``: the synthetic dataset of configs/demo.yaml; its step time is measured here by
  training the demo model on the streamed batches;
- ``xl256`` / ``xl512``: configs/dit_xl.yaml batches of 33-frame clips encoded by a 16-channel
  4x/8x video VAE (latents 16x9x32x32 and 16x9x64x64) with 4096-wide T5 states of 120 tokens.
  Their step time is *estimated* from the model FLOPs at ``--mfu`` of ``--peak-tflops`` (an H100
  at 40% MFU by default) unless ``--step-ms`` gives a measured one (``sora-dist bench-train``).

Throughput is the loader alone, as fast as it goes. The data wait runs the loader against a
stand-in step and reports the time spent waiting for the next batch as a share of the step time,
twice: with a step that sleeps (the accelerator busy, the host idle), and with one whose first
``--host-busy`` share is spent in Python holding the GIL, as an eager training step launching
kernels does, so that the loader's handover thread must compete for it. Numbers are per
data-parallel rank: on a node, each rank's workers share its CPU cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from sora_dist.config import Config, load_config, resolve_model_config
from sora_dist.console import CommandParser, exit_process, positive_int, user_command
from sora_dist.data import LatentLoader, ShardWriter, make_synthetic, read_manifest
from sora_dist.data.format import Sample
from sora_dist.models import train_flops

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Profile:
    config: str
    """Experiment file whose data settings (token budget, batch cap, text length) are used."""
    latent: Optional[tuple[int, int, int, int]]
    """(C, T, h, w) of generated samples; None streams the config's synthetic data."""
    text_len: int = 120
    text_dim: int = 4096


PROFILES = {
    "demo": Profile("configs/demo.yaml", None),
    "xl256": Profile("configs/dit_xl.yaml", (16, 9, 32, 32)),
    "xl512": Profile("configs/dit_xl.yaml", (16, 9, 64, 64)),
}


def write_random_shards(out: Path, profile: Profile, num_samples: int) -> Path:
    rng = np.random.default_rng(0)
    with ShardWriter(out, samples_per_shard=64, vae="bench-random", text_encoder="bench-random") as writer:
        for i in range(num_samples):
            latent = rng.standard_normal(profile.latent, dtype=np.float32).astype(np.float16)
            text = rng.standard_normal((profile.text_len, profile.text_dim), dtype=np.float32).astype(np.float16)
            writer.write(Sample(key=f"{i:06d}", latent=latent, text=text, meta={"caption": f"sample {i}"}))
    return out


def _loader(cfg: Config, data: Path, workers: int) -> LatentLoader:
    cfg.data.path, cfg.data.num_workers = str(data), workers
    return LatentLoader(cfg.data, cfg.model.patch_size)


def throughput(cfg: Config, data: Path, workers: int, batches: int) -> dict:
    """Samples/s and MB/s (latent + text bytes as stored) of the loader alone."""
    stream = iter(_loader(cfg, data, workers))
    for _ in range(2):  # workers start and fill their prefetch queues
        next(stream)
    samples = nbytes = 0
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(stream)
        samples += batch.latents.shape[0]
        nbytes += 2 * (batch.latents.numel() + int(batch.text_mask.sum()) * batch.text.shape[-1])
    seconds = time.perf_counter() - start
    return {"samples_per_s": samples / seconds, "mb_per_s": nbytes / seconds / 1e6, "samples_per_batch": samples / batches}


def stand_in_step(step_s: float, host_busy: float) -> None:
    """Spin in Python, holding the GIL, for ``host_busy`` of ``step_s``; sleep the rest."""
    busy_until = time.perf_counter() + host_busy * step_s
    while time.perf_counter() < busy_until:
        pass
    time.sleep((1 - host_busy) * step_s)


def data_wait(cfg: Config, data: Path, workers: int, batches: int, step_s: float, host_busy: float = 0.0) -> float:
    """Share of the step time spent waiting for batches between stand-in steps of step_s."""
    stream = iter(_loader(cfg, data, workers))
    next(stream)
    stand_in_step(step_s, host_busy)
    waited = 0.0
    for _ in range(batches):
        start = time.perf_counter()
        next(stream)
        waited += time.perf_counter() - start
        stand_in_step(step_s, host_busy)
    return waited / (batches * step_s)


def measured_demo_step(cfg: Config, data: Path, steps: int = 6) -> float:
    """Median time of a real training step of the demo model on streamed batches, here."""
    from sora_dist.diffusion import build_objective
    from sora_dist.models import VideoDiT

    manifest = read_manifest(data)
    model = VideoDiT(resolve_model_config(cfg.model, manifest.latent_channels, manifest.text_dim))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    objective = build_objective(cfg.diffusion, model.cfg.patch_size)
    g = torch.Generator().manual_seed(0)
    times = []
    for _, batch in zip(range(steps + 1), _loader(cfg, data, 0)):
        start = time.perf_counter()
        batch = batch.to(torch.device("cpu"))
        objective.loss(model, batch.latents, batch.text, batch.text_mask, g).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def estimated_step(cfg: Config, profile: Profile, samples_per_batch: float, peak_tflops: float, mfu: float) -> float:
    model_cfg = resolve_model_config(cfg.model, profile.latent[0], profile.text_dim)
    flops = samples_per_batch * train_flops(model_cfg, profile.latent[1:], profile.text_len)
    return flops / (peak_tflops * 1e12 * mfu)


def run_profile(name: str, args, workdir: Path) -> list[dict]:
    profile = PROFILES.get(name, Profile(args.config, None))
    cfg = load_config(REPO / profile.config if name in PROFILES else Path(args.config), [])
    if args.data:
        data = Path(args.data)
    elif profile.latent is None:
        data = make_synthetic(workdir / name, num_samples=256, seed=0, samples_per_shard=32)
    else:
        data = write_random_shards(workdir / name, profile, args.samples)
    rows = []
    for workers in args.workers:
        speed = throughput(cfg, data, workers, args.batches)
        if name in args.step_ms:
            step_s, source = args.step_ms[name] / 1e3, "given"
        elif profile.latent is None:
            step_s, source = measured_demo_step(cfg, data), "measured here"
        else:
            step_s = estimated_step(cfg, profile, speed["samples_per_batch"], args.peak_tflops, args.mfu)
            source = f"estimated: {args.peak_tflops:g} TFLOP/s at {args.mfu:.0%} MFU"
        needed = speed["samples_per_batch"] / step_s
        wait = data_wait(cfg, data, workers, args.batches, step_s)
        wait_busy = data_wait(cfg, data, workers, args.batches, step_s, args.host_busy)
        rows.append({"profile": name, "workers": workers, **speed, "step_ms": step_s * 1e3, "step_source": source,
                     "samples_per_s_needed": needed, "data_wait_frac": wait, "host_busy": args.host_busy,
                     "data_wait_frac_host_busy": wait_busy})
        print(f"  {name:<7} {workers:>7} {speed['samples_per_s']:>10.1f} {speed['mb_per_s']:>8.1f} {speed['samples_per_batch']:>8.1f}"
              f" {step_s * 1e3:>9.1f} {needed:>10.1f} {wait:>8.2%} {wait_busy:>9.2%}   {source}", flush=True)
    return rows


def _step_ms(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    return name, float(value)


@user_command
def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="sora-dist bench-loader", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", nargs="+", default=list(PROFILES), help=f"any of {', '.join(PROFILES)}, or 'custom' with --data (and --config)")
    parser.add_argument("--data", default="", help="stream this dataset instead of generated shards")
    parser.add_argument("--config", default="configs/dit_xl.yaml", help="data settings for the 'custom' profile")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=positive_int, default=30, help="batches per measurement")
    parser.add_argument("--samples", type=positive_int, default=192, help="samples written per generated profile")
    parser.add_argument("--step-ms", type=_step_ms, nargs="*", default=[], metavar="PROFILE=MS", help="measured step times")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="for estimated step times (H100 SXM dense bf16)")
    parser.add_argument("--mfu", type=float, default=0.4, help="for estimated step times")
    parser.add_argument("--host-busy", type=float, default=0.5, help="share of the step the training thread holds the GIL, for the second wait")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    args.step_ms = dict(args.step_ms)
    unknown = [name for name in args.profiles if name not in PROFILES and name != "custom"]
    if unknown:
        parser.error(f"unknown profiles {unknown}: choose from {', '.join(PROFILES)}, or custom (with --data)")
    if "custom" in args.profiles and not args.data:
        parser.error("the custom profile streams your dataset: give --data DIR (and --config for its data settings)")
    if not 0 <= args.host_busy < 1:
        parser.error(f"--host-busy={args.host_busy} must be in [0, 1)")
    print(f"loader benchmark, {time.strftime('%Y-%m-%d')}; per data-parallel rank; wait = share of step time spent waiting "
          f"(busy: the step holds the GIL for its first {args.host_busy:.0%})")
    print(f"  {'profile':<7} {'workers':>7} {'samples/s':>10} {'MB/s':>8} {'batch':>8} {'step ms':>9} {'needed/s':>10} {'wait':>8} {'wait busy':>9}   step time")
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.profiles:
            rows += run_profile(name, args, Path(workdir))
    if args.json:
        Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    exit_process(main())
