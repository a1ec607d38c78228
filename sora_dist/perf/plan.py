"""Layout planner: what each layout gives on N accelerators, before booking them.

  sora-dist plan --preset 1B --devices 256 --devices-per-node 8 --accelerator h100 --latent 16 64 64
  sora-dist plan --preset 7B --frames 121 --height 720 --width 1280 --vae 4 8 8 --devices 512 --accelerator 910b2
  sora-dist plan ... --calibration calib.json comm8.json comm16.json   # measured on your hardware
  sora-dist plan ... --scaling 8 16 32 64 128 256 512 1024 --plot scaling.png

For every layout the trainer accepts (its own validation decides) x activation checkpointing
(none, selective every 2nd block, full) x FSDP reshard-after-forward on/off, it predicts the step
time split into compute, optimizer, exposed communication per mesh group, wrappers' host work and rank skew, memory per device,
MFU and tokens/s per device, ranks the layouts that fit by step time and prints the launch command
of the best. ``sora_dist/perf/model.py`` states every term and overlap assumption.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sora_dist.config import ModelConfig, ParallelConfig, resolve_model_config
from sora_dist.console import CommandParser, exit_process, positive_int, user_command
from sora_dist.errors import ConfigError
from sora_dist.models import count_parameters
from sora_dist.parallel.mesh import MESH_DIMS, resolve_dims
from sora_dist.perf.calibration import load_calibration
from sora_dist.perf.hardware import GB, Accelerator, accelerator
from sora_dist.perf.model import Layout, Prediction, Workload, candidate_layouts, predict

GIB = 1024**3
BF16_BYTES = 2  # parameters gathered and activations kept in bf16 on GPU/NPU


def latent_shape(args) -> tuple[int, int, int]:
    """--latent T H W, or --frames/--height/--width through the VAE's (t, h, w) compression
    (causal video VAEs keep the first frame: 1 + (frames - 1) / t latent frames)."""
    if args.latent:
        return tuple(args.latent)
    if not (args.frames and args.height and args.width):
        raise ConfigError("give the latent shape (--latent T H W) or the clip (--frames, --height, --width with --vae)")
    t, h, w = args.vae
    return 1 + (args.frames - 1) // t, -(-args.height // h), -(-args.width // w)


def build_workload(args, element_bytes: int) -> Workload:
    overrides = {k: v for k, v in (("hidden_size", args.hidden), ("depth", args.depth), ("num_heads", args.heads)) if v}
    model = resolve_model_config(ModelConfig(preset=args.preset, **overrides), args.in_channels, args.text_dim)
    return Workload(model, latent_shape(args), args.text_len, args.global_batch or args.devices, element_bytes, element_bytes)


def plan(work: Workload, acc: Accelerator, devices: int, per_node: int, calibration=None, fixed: Optional[dict] = None) -> list[Prediction]:
    """Predictions for every candidate layout (those matching ``fixed`` degrees), best first;
    layouts that do not fit in memory come last."""
    check_request(work, devices, per_node, fixed or {})
    layouts = [lay for lay in candidate_layouts(work.model, devices, per_node, work.global_batch)
               if all(getattr(lay.dims, k) == v for k, v in (fixed or {}).items())]
    predictions = [predict(work, lay, acc, per_node, calibration) for lay in layouts]
    return sorted(predictions, key=lambda p: (not p.fits, round(p.step_s, 6), _parallel_dims(p.layout), p.memory["total"]))


def _parallel_dims(layout: Layout) -> int:
    """How many mesh dimensions a layout uses: between equally fast layouts, the simpler first."""
    return sum(getattr(layout.dims, n) > 1 for n in MESH_DIMS) + (layout.ac != "none")


def check_request(work: Workload, devices: int, per_node: int, fixed: dict) -> None:
    """Stop impossible requests with the fix: node shape, fixed degrees, batch."""
    if devices < 1 or per_node < 1:
        raise ConfigError("--devices and --devices-per-node must be at least 1")
    if devices > per_node and devices % per_node:
        raise ConfigError(f"--devices {devices} is not a whole number of nodes of {per_node}: use a multiple of {per_node}")
    if fixed:
        resolve_dims(ParallelConfig(**fixed), devices, work.model)  # the trainer's own message
    if work.global_batch < 1:
        raise ConfigError("--global-batch must be at least 1")


def best_fitting(predictions: list[Prediction], acc: Accelerator) -> Prediction:
    if not predictions:
        raise ConfigError("no layout divides this request: make --global-batch a multiple of the data-parallel degree you want, "
                          "or change --devices or the fixed degrees")
    if not predictions[0].fits:
        smallest = min(predictions, key=lambda p: p.memory["total"])
        raise ConfigError(
            f"no layout fits in {acc.memory_bytes / GB:.0f} GB per device: the smallest needs {smallest.memory['total'] / GB:.1f} GB "
            f"({smallest.layout.describe()}). Use more devices, a smaller --global-batch (or gradient accumulation), "
            f"a shorter clip, or an accelerator with more memory")
    return predictions[0]


@dataclass(frozen=True)
class PublishedRun:
    """A measured throughput someone published for a preset's model, to put beside the plan."""

    accelerator: str
    devices: int
    tokens: int
    layout: str
    tflops_per_device: float
    source: str


PUBLISHED = {
    "wan2.1-t2v-14b": [PublishedRun("h100", 128, 37440, "TP 2 x CP 4, sequence parallel, full recompute", 325.8,
                                    "NVIDIA Megatron-Bridge Wan 2.1 recipe performance")],
}
"""Published figures per preset; docs/wan.md explains the difference from the plan's."""


def published_lines(best: Prediction, work: Workload, acc: Accelerator, args) -> list[str]:
    """The preset's published runs on this accelerator, beside #1's predicted TFLOP/s per device."""
    runs = [r for r in PUBLISHED.get(args.preset, []) if r.accelerator == args.accelerator.lower()]
    return [f"published for {args.preset} on {r.devices} x {acc.name} at {r.tokens} tokens ({r.layout}): {r.tflops_per_device:.1f} TFLOP/s per "
            f"device ({r.source}); #1 here, {work.tokens} tokens on {args.devices}: {best.mfu * acc.peak_flops / 1e12:.1f} TFLOP/s predicted "
            f"(see docs/wan.md)" for r in runs]


def launch_command(p: Prediction, devices: int, per_node: int, args) -> str:
    nodes = max(1, devices // per_node)
    sizes = [f"--model.{key}={value}" for key, value in (("hidden_size", args.hidden), ("depth", args.depth), ("num_heads", args.heads)) if value]
    extra = " ".join([f"--model.preset={args.preset}", *sizes, *p.layout.overrides()])
    if nodes == 1:
        return f"torchrun --nproc-per-node {devices} -m sora_dist.train --config CONFIG {extra}"
    return f"sbatch --nodes={nodes} launch/slurm.sbatch --config CONFIG {extra}"


def format_plan(predictions: list[Prediction], work: Workload, acc: Accelerator, devices: int, per_node: int, args, top: int) -> str:
    fitting = [p for p in predictions if p.fits]
    lines = [f"{work.model.depth}-block DiT, hidden {work.model.hidden_size} ({count_parameters(work.model) / 1e9:.2f}B parameters), latent {work.latent} = "
             f"{work.tokens} tokens, text {work.text_len}, global batch {work.global_batch}; {devices} x {acc.name} "
             f"({per_node} per node, {acc.platform}); {len(predictions)} layouts, {len(fitting)} fit in memory",
             f"{'#':>3} {'layout':<58} {'step ms':>9} {'compute':>8} {'optim':>6} {'exposed comm, host, skew ms':<34} {'mem GiB':>8} {'MFU':>6} {'tok/s/dev':>10}"]
    for i, p in enumerate(predictions[:top], 1):
        lines.append(_row(i, p))
    unfit = [p for p in predictions if not p.fits]
    if unfit:
        lines.append(f"... and {len(unfit)} layouts that do not fit, e.g. {unfit[0].layout.describe()} needs {unfit[0].memory['total'] / GIB:.1f} GiB")
    if fitting:
        best = fitting[0]
        lines.append("\nmemory of #1 per device (GiB): " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in best.memory.items()))
        days = days_to_train(best, devices, acc, args)
        if days is not None:
            lines.append(f"days to train on #1: {days:.1f} ({_budget(args)})")
        lines += published_lines(best, work, acc, args)
        lines.append("launch the best:")
        lines += [f"  {launch_command(p, devices, per_node, args)}" for p in fitting[:3]]
    return "\n".join(lines)


def days_to_train(p: Prediction, devices: int, acc: Accelerator, args) -> Optional[float]:
    """Days of training at the predicted throughput for --train-tokens (latent tokens) or
    --train-flops (model FLOPs, as in MFU), or None when neither is given."""
    if args.train_tokens:
        return args.train_tokens / (p.tokens_per_s_per_device * devices) / 86400
    if args.train_flops:
        return args.train_flops / (p.mfu * acc.peak_flops * devices) / 86400
    return None


def _budget(args) -> str:
    return f"{args.train_tokens:.3g} tokens" if args.train_tokens else f"{args.train_flops:.3g} model FLOPs"


def _row(i: int, p: Prediction) -> str:
    extra = {**p.comm_s, "host": p.host_s, "skew": p.skew_s}
    comm = " ".join(f"{k} {v * 1e3:.1f}" for k, v in extra.items() if v > 5e-5) or "-"
    mark = "" if p.fits else " (no fit)"
    return (f"{i:>3} {p.layout.describe() + mark:<58} {p.step_s * 1e3:>9.1f} {p.compute_s * 1e3:>8.1f} {p.optimizer_s * 1e3:>6.1f} "
            f"{comm:<34} {p.memory['total'] / GIB:>8.1f} {p.mfu:>6.1%} {p.tokens_per_s_per_device:>10.0f}")


# ---------------------------------------------------------------------------------------------
# Scaling


def scaling_tables(args, acc: Accelerator, calibration, sizes: list[int]) -> dict:
    """Best layout at each size. Weak: samples per device fixed (global batch grows with the
    devices); strong: the global batch of the largest size, fixed."""
    rows = {"weak": [], "strong": []}
    strong_batch = args.global_batch or max(sizes)
    for kind in rows:
        for n in sizes:
            batch = n * (args.global_batch or max(sizes)) // max(sizes) if kind == "weak" else strong_batch
            args_n = argparse.Namespace(**{**vars(args), "global_batch": max(1, batch), "devices": n})
            work = build_workload(args_n, BF16_BYTES)
            per_node = min(args.devices_per_node, n)
            try:
                best = best_fitting(plan(work, acc, n, per_node, calibration), acc)
            except ConfigError as err:
                rows[kind].append({"devices": n, "global_batch": work.global_batch, "error": str(err)})
                continue
            rows[kind].append({"devices": n, "global_batch": work.global_batch, "layout": best.layout.describe(), "step_s": best.step_s,
                               "samples_per_s": work.global_batch / best.step_s, "mfu": best.mfu,
                               "memory_gib": best.memory["total"] / GIB, "days": days_to_train(best, n, acc, args)})
        _efficiency(rows[kind])
    return rows


def _efficiency(rows: list[dict]) -> None:
    """Throughput per device against the smallest size that fits."""
    base = next((r for r in rows if "error" not in r), None)
    for r in rows:
        if "error" not in r and base:
            r["efficiency"] = (r["samples_per_s"] / r["devices"]) / (base["samples_per_s"] / base["devices"])


def format_scaling(tables: dict, acc: Accelerator) -> str:
    lines = []
    for kind, rows in tables.items():
        lines.append(f"\n{kind} scaling on {acc.name}")
        lines.append(f"{'devices':>8} {'batch':>6} {'samples/s':>10} {'efficiency':>10} {'MFU':>6} {'GiB':>6} {'days':>7}  best layout")
        for r in rows:
            if "error" in r:
                lines.append(f"{r['devices']:>8} {r['global_batch']:>6}  {r['error'][:100]}")
            else:
                days = f"{r['days']:>7.1f}" if r["days"] is not None else f"{'-':>7}"
                lines.append(f"{r['devices']:>8} {r['global_batch']:>6} {r['samples_per_s']:>10.3g} {r['efficiency']:>10.1%} "
                             f"{r['mfu']:>6.1%} {r['memory_gib']:>6.1f} {days}  {r['layout']}")
    return "\n".join(lines)


def plot_scaling(tables: dict, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_throughput, ax_eff) = plt.subplots(1, 2, figsize=(11, 4))
    for kind, rows in tables.items():
        ok = [r for r in rows if "error" not in r]
        if not ok:
            continue
        devices = [r["devices"] for r in ok]
        ax_throughput.plot(devices, [r["samples_per_s"] for r in ok], marker="o", label=f"{kind} (predicted)")
        ideal = [ok[0]["samples_per_s"] * d / ok[0]["devices"] for d in devices]
        ax_throughput.plot(devices, ideal, linestyle=":", color="grey")
        ax_eff.plot(devices, [r["efficiency"] for r in ok], marker="o", label=kind)
    for ax in (ax_throughput, ax_eff):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("devices")
        ax.legend()
    ax_throughput.set_yscale("log", base=2)
    ax_throughput.set_ylabel("samples/s (dotted: linear)")
    ax_eff.set_ylabel("efficiency per device vs smallest")
    ax_eff.set_ylim(0, 1.1)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = CommandParser(prog="sora-dist plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="1B")
    p.add_argument("--hidden", type=int, help="model width (overrides the preset)")
    p.add_argument("--depth", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--in-channels", type=int, default=16, help="latent channels of the VAE")
    p.add_argument("--text-dim", type=int, default=4096, help="text encoder width")
    p.add_argument("--latent", type=positive_int, nargs=3, metavar=("T", "H", "W"), help="latent frames, height, width")
    p.add_argument("--frames", type=positive_int, help="clip frames (with --height, --width, --vae instead of --latent)")
    p.add_argument("--height", type=positive_int)
    p.add_argument("--width", type=positive_int)
    p.add_argument("--vae", type=int, nargs=3, default=[4, 8, 8], metavar=("T", "H", "W"), help="VAE compression (default 4 8 8)")
    p.add_argument("--text-len", type=int, default=128)
    p.add_argument("--global-batch", type=positive_int, help="samples per optimizer step (default: one per device)")
    p.add_argument("--devices", type=positive_int, default=8)
    p.add_argument("--devices-per-node", type=positive_int, default=8)
    p.add_argument("--accelerator", default="h100", help="h100, h200, a100, 910b1-910b4, 910c")
    p.add_argument("--peak-tflops", type=float, help="override the part's dense bf16 peak")
    p.add_argument("--memory-gb", type=float)
    p.add_argument("--intra-bw", type=float, help="GB/s per device inside a node (NVLink, HCCS)")
    p.add_argument("--inter-bw", type=float, help="GB/s per device across nodes (InfiniBand, RoCE)")
    p.add_argument("--intra-latency-us", type=float)
    p.add_argument("--inter-latency-us", type=float)
    p.add_argument("--efficiency", type=float, help="fraction of peak the compute reaches (default 0.55) when not calibrated")
    p.add_argument("--calibration", nargs="+", default=[], help="JSON from sora-dist calibrate and bench-comm")
    for name in ("tp", "sp_ulysses", "sp_ring", "dp_replicate"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, dest=f"fix_{name}", help=f"only layouts with this {name}")
    p.add_argument("--train-tokens", type=float, help="latent tokens to train on: print the days it takes")
    p.add_argument("--train-flops", type=float, help="model FLOPs to train for (e.g. 2.6e24): print the days it takes")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--scaling", type=int, nargs="+", help="device counts for weak/strong scaling tables")
    p.add_argument("--plot", default="", help="scaling plot path (with --scaling; default plan_scaling.png)")
    p.add_argument("--json", default="")
    return p.parse_args(argv)


def accelerator_from(args) -> Accelerator:
    scale = lambda v, f: None if v is None else v * f  # noqa: E731
    return accelerator(args.accelerator, peak_flops=scale(args.peak_tflops, 1e12), memory_bytes=scale(args.memory_gb, GB),
                       intra_bw=scale(args.intra_bw, GB), inter_bw=scale(args.inter_bw, GB), intra_latency=scale(args.intra_latency_us, 1e-6),
                       inter_latency=scale(args.inter_latency_us, 1e-6), compute_efficiency=args.efficiency)


def run(args) -> dict:
    acc = accelerator_from(args)
    calibration = load_calibration(args.calibration) if args.calibration else None
    if args.scaling:
        tables = scaling_tables(args, acc, calibration, sorted(args.scaling))
        print(format_scaling(tables, acc))
        plot = Path(args.plot or "plan_scaling.png")
        params = count_parameters(build_workload(args, BF16_BYTES).model)
        plot_scaling(tables, f"{params / 1e9:.1f}B-parameter DiT, latent {latent_shape(args)}, {acc.name} (predicted)", plot)
        print(f"plot: {plot}")
        return {"scaling": tables}
    work = build_workload(args, BF16_BYTES)
    fixed = {k[4:]: v for k, v in vars(args).items() if k.startswith("fix_") and v}
    predictions = plan(work, acc, args.devices, min(args.devices_per_node, args.devices), calibration, fixed)
    best_fitting(predictions, acc)
    print(format_plan(predictions, work, acc, args.devices, min(args.devices_per_node, args.devices), args, args.top))
    return {"layouts": [{"layout": p.layout.describe(), "overrides": p.layout.overrides(), "step_s": p.step_s, "compute_s": p.compute_s,
                         "comm_s": p.comm_s, "memory": p.memory, "fits": p.fits, "mfu": p.mfu} for p in predictions[: args.top]]}


@user_command
def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    result = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items()}, **result}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    exit_process(main())
