"""Scaling sweeps: measured step times of many layouts against the performance model's predictions.

  sora-dist bench-scaling --preset S --latent 4 16 16 --global-batch 4 \\
      --layouts 1 2 "2:--parallel.sp_ulysses=2" "4:--parallel.tp=2 --parallel.sp_ulysses=2" \\
      --calibration calib.json comm2.json comm4.json --out scaling/
  sora-dist scaling-report results/*.json --calibration calib.json comm*.json --out scaling/

``bench-scaling`` runs bench-train under torchrun for each layout (``WORLD:OVERRIDES``; all in one
allocation, one after another, ``--repeats`` rounds) and writes each result's JSON; other ``--section.key=value``
arguments (``--model.hidden_size=256``) go to every run. ``scaling-report`` reads bench-train
JSON from separate jobs. Both print predicted against measured step time with the error, the
ranking of the layouts within each world size, and plot them (``report.png``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from sora_dist.config import load_config, resolve_model_config
from sora_dist.console import CommandParser, exit_process, positive_int, read_json, user_command
from sora_dist.device import peak_bf16_flops
from sora_dist.parallel.mesh import resolve_dims
from sora_dist.perf import bench_train
from sora_dist.perf.calibration import load_calibration, workload_and_layout
from sora_dist.perf.hardware import Accelerator
from sora_dist.perf.model import Calibration, predict


def parse_layout(spec: str) -> tuple[int, list[str]]:
    """'4:--parallel.tp=2 --parallel.sp_ulysses=2' -> (4, [...]); '2' -> (2, [])."""
    world, _, overrides = spec.partition(":")
    return int(world), shlex.split(overrides)


def per_rank_batch(global_batch: int, world: int, overrides: list[str], preset: str) -> int:
    """Samples per data-parallel rank for a global batch, with the trainer's own layout rules."""
    cfg = load_config(None, [f"--model.preset={preset}", *overrides])
    dims = resolve_dims(cfg.parallel, world, resolve_model_config(cfg.model, bench_train.IN_CHANNELS, bench_train.TEXT_DIM))
    if global_batch % dims.dp:
        raise SystemExit(f"--global-batch {global_batch} does not divide over {dims.dp} data-parallel ranks ({dims.describe()})")
    return global_batch // dims.dp


def run_layouts(args) -> list[Path]:
    """Each layout ``--repeats`` times, round robin (so a slow spell of a shared host falls on every
    layout, not on one); a layout's step time is the median of its runs' medians."""
    out = Path(args.out)
    (out / "repeats").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    runs: dict[int, list[dict]] = {}
    started, total = time.perf_counter(), args.repeats * len(args.layouts)
    for repeat in range(args.repeats):
        for i, spec in enumerate(args.layouts):
            runs.setdefault(i, []).append(_bench_layout(args, spec, out / "repeats" / f"run{i:02d}_r{repeat}.json", env))
            done = repeat * len(args.layouts) + i + 1
            elapsed = time.perf_counter() - started
            print(f"bench-scaling: {done}/{total} {spec or '1'}: {runs[i][-1]['step_s_median'] * 1e3:.1f} ms "
                  f"(elapsed {elapsed:.0f} s, ETA {elapsed / done * (total - done):.0f} s)", flush=True)
    paths = []
    for i, results in runs.items():
        medians = [r["step_s_median"] for r in results]
        path = out / f"run{i:02d}_w{results[0]['world_size']}.json"
        path.write_text(json.dumps({**results[0], "step_s_median": statistics.median(medians), "step_s_repeats": medians}, indent=2))
        paths.append(path)
    return paths


def _bench_layout(args, spec: str, path: Path, env: dict) -> dict:
    """One bench-train run of a ``WORLD:OVERRIDES`` layout under torchrun; its JSON result."""
    world, overrides = parse_layout(spec)
    batch = per_rank_batch(args.global_batch, world, [*args.common, *overrides], args.preset)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world), "-m", "sora_dist.perf.bench_train",
           "--preset", args.preset, "--latent", *map(str, args.latent), "--batch", str(batch), "--text-len", str(args.text_len),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--json", str(path), *args.common, *overrides]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if result.returncode != 0:
        raise SystemExit(f"bench-train failed for {spec!r}:\n{result.stderr[-3000:]}")
    return json.loads(path.read_text())


def compare(results: list[dict], calibration: Calibration) -> list[dict]:
    """Predicted and measured step time of each bench-train result."""
    rows = []
    for r in results:
        work, layout = workload_and_layout(r)
        acc = measured_part(r, calibration)
        p = predict(work, layout, acc, r.get("local_world_size", r["world_size"]), calibration)
        measured = r["step_s_median"]
        rows.append({"world_size": r["world_size"], "layout": layout.describe(), "global_batch": work.global_batch,
                     "predicted_s": p.step_s, "measured_s": measured, "measured_repeats_s": r.get("step_s_repeats", [measured]), "error": p.step_s / measured - 1,
                     "compute_s": p.compute_s, "optimizer_s": p.optimizer_s, "comm_s": p.comm_s, "host_s": p.host_s, "skew_s": p.skew_s})
    return rows


def measured_part(result: dict, calibration: Calibration) -> Accelerator:
    """The device a result ran on, as the model sees it: its peak where known (MFU), links and
    rate from the calibration. Collectives on a host without streams (cpu) are not overlapped."""
    peak = peak_bf16_flops(result["device"]) or calibration.flops_rate or 1.0
    # Memory capacity does not enter a step time; links not in the calibration fall back to 10 GB/s.
    return Accelerator(result["device"], peak, memory_bytes=1e15, memory_bw=calibration.memory_bw or 1e10, intra_bw=1e10, inter_bw=1e10,
                       overlap=not result["device"].startswith("cpu"), platform="measured")


RANKED = 3
"""How many of the best layouts per world size the ranking compares (the issue's target)."""


def rankings(rows: list[dict], top: int = RANKED) -> dict[int, dict[str, list]]:
    """Per world size with several layouts: layouts ordered by predicted and by measured time, and
    the ``contradictions`` of the predicted best ``top``: pairs (a, b) where a is predicted faster
    than b but every run of b measured faster than every run of a. Layouts whose runs overlap are
    not ordered by the measurement, so an order the two sides disagree on there is no
    contradiction; with one run per layout every disagreement is one."""
    out = {}
    for world in sorted({r["world_size"] for r in rows}):
        same = [r for r in rows if r["world_size"] == world]
        if len(same) > 1:
            predicted = sorted(same, key=lambda r: r["predicted_s"])
            contradictions = [[a["layout"], b["layout"]] for i, a in enumerate(predicted[:top]) for b in predicted[i + 1:]
                              if max(b["measured_repeats_s"]) < min(a["measured_repeats_s"])]
            out[world] = {"predicted": [r["layout"] for r in predicted],
                          "measured": [r["layout"] for r in sorted(same, key=lambda r: r["measured_s"])],
                          "contradictions": contradictions}
    return out


def format_report(rows: list[dict]) -> str:
    lines = [f"{'ranks':>5} {'layout':<40} {'compute':>8} {'comm':>6} {'host':>6} {'skew':>6} {'predicted ms':>12} {'measured ms':>11} {'error':>7}  runs (ms)"]
    for r in rows:
        runs = " ".join(f"{s * 1e3:.0f}" for s in r["measured_repeats_s"]) if len(r["measured_repeats_s"]) > 1 else ""
        lines.append(f"{r['world_size']:>5} {r['layout']:<40} {(r['compute_s'] + r['optimizer_s']) * 1e3:>8.0f} {sum(r['comm_s'].values()) * 1e3:>6.0f} "
                     f"{r['host_s'] * 1e3:>6.0f} {r['skew_s'] * 1e3:>6.0f} {r['predicted_s'] * 1e3:>12.1f} {r['measured_s'] * 1e3:>11.1f} {r['error']:>+7.1%}  {runs}")
    errors = [abs(r["error"]) for r in rows]
    lines.append(f"median |error| {statistics.median(errors):.1%}, max |error| {max(errors):.1%} over {len(rows)} layouts")
    for world, order in rankings(rows).items():
        top = min(RANKED, len(order["measured"]))
        same = order["predicted"][:top] == order["measured"][:top]
        lines.append(f"{world} ranks: best {top} measured {order['measured'][:top]}; predicted {'the same' if same else order['predicted'][:top]}")
        if not same:
            against = "; ".join(f"{b} measured faster than {a} in every run" for a, b in order["contradictions"])
            lines.append(f"  {'contradicted: ' + against if against else 'the orders differ only between layouts whose runs overlap'}")
    return "\n".join(lines)


def plot_report(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(rows)), 4))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["measured_s"] * 1e3 for r in rows], width=0.4, label="measured")
    ax.bar([i + 0.2 for i in x], [r["predicted_s"] * 1e3 for r in rows], width=0.4, label="predicted")
    ax.set_xticks(list(x), [f"{r['world_size']}: {r['layout']}" for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("step time (ms)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(paths: list[Path], calibration_paths: list[str], out: Optional[Path]) -> list[dict]:
    results = [read_json(p, "bench-train result", "sora-dist bench-train --json") for p in paths]
    rows = compare(results, load_calibration(calibration_paths))
    print(format_report(rows))
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows, "rankings": rankings(rows)}, indent=2))
        plot_report(rows, out / "report.png")
        print(f"report: {out / 'report.json'}, plot {out / 'report.png'}")
    return rows


def report_main(argv: Optional[list[str]] = None) -> int:
    """sora-dist scaling-report RESULTS... --calibration ... --out DIR"""
    return main(["--report", *(sys.argv[1:] if argv is None else argv)])


@user_command
def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    reporting = argv[:1] == ["--report"]
    parser = CommandParser(prog="sora-dist scaling-report" if reporting else "sora-dist bench-scaling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibration", nargs="+", default=[], help="sora-dist calibrate and bench-comm JSON")
    parser.add_argument("--out", default="", help="folder for the runs' JSON, report.json and report.png")
    if reporting:
        parser.add_argument("results", nargs="+", help="bench-train JSON files")
        args = parser.parse_args(argv[1:])
        report(args.results, args.calibration, Path(args.out) if args.out else None)
        return 0
    parser.add_argument("--preset", default="S")
    parser.add_argument("--latent", type=positive_int, nargs=3, default=[4, 16, 16])
    parser.add_argument("--text-len", type=int, default=128)
    parser.add_argument("--global-batch", type=positive_int, default=4)
    parser.add_argument("--layouts", nargs="+", required=True, help="WORLD or WORLD:OVERRIDES, e.g. '4:--parallel.tp=2'")
    parser.add_argument("--steps", type=positive_int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="runs of every layout, round robin; the median of their medians counts")
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for each rank (cpu)")
    parser.add_argument("--timeout", type=int, default=900)
    args, args.common = parser.parse_known_args(argv)
    args.out = args.out or "scaling"
    paths = run_layouts(args)
    report(paths, args.calibration, Path(args.out))
    return 0


if __name__ == "__main__":
    exit_process(main())
