"""Write the demo's published figures from a run of the shipped demo config, so they cannot drift
from it: REPORT/loss.png, REPORT/sample.png (a row per sampled clip, each with the blob's measured
direction and speed), REPORT/demo.json and REPORT/README.md (the table the docs show).

  time sora-dist train --config configs/demo.yaml --train.out_dir=runs/demo-report
  python scripts/demo_report.py runs/demo-report docs/reports/2026-12-07-demo --wall-s 224

The run must be a demo-config run (``configs/demo.yaml``, overrides of its output folder or data
path only); ``--wall-s`` is the command's wall time as ``time`` measured it, install excluded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from sora_dist.config import load_config
from sora_dist.metrics import read_history, summarize
from sora_dist.resilience.goodput import format_summary, read_attempts
from sora_dist.resilience.goodput import summarize as summarize_goodput


def environment() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.machine())
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}, torch {torch.__version__}"


def report(run: Path, wall_s: float | None) -> dict:
    cfg = load_config(run / "config.yaml")
    history = read_history(run / "metrics.jsonl")
    goodput = summarize_goodput(read_attempts(run / "goodput"))
    demo_out_dir = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml").train.out_dir
    out_dir = "" if cfg.train.out_dir == demo_out_dir else f" --train.out_dir={cfg.train.out_dir}"
    return {"date": time.strftime("%Y-%m-%d"), "environment": environment(), "wall_s": wall_s, "run": cfg.train.out_dir,
            "command": f"sora-dist train --config configs/demo.yaml{out_dir}",
            "steps": history[-1]["step"], "steps_asked": cfg.train.steps, "max_minutes": cfg.train.max_minutes,
            "loss": summarize(history), "goodput": goodput["goodput"], "goodput_line": format_summary(goodput),
            "samples": json.loads((run / "samples.json").read_text())}


def markdown(result: dict) -> str:
    loss, wall = result["loss"], result["wall_s"]
    rows = "\n".join(f"| {s['application'].replace('_', '-')} | {s['prompt']} | {s['direction'] or 'nowhere'} | {s['speed']:.2f} |"
                     for s in result["samples"])
    return f"""# The CPU demo, {result['date']}

Environment: {result['environment']}.
Written by `scripts/demo_report.py` from a run of the shipped `configs/demo.yaml`:

```bash
time {result['command']}
python scripts/demo_report.py {result['run']} docs/reports/{result['date']}-demo --wall-s SECONDS
```

| | |
|---|---|
| wall time (`time`, install excluded) | {'not given' if wall is None else f'{wall:.0f} s'} |
| steps | {result['steps']} of {result['steps_asked']} (`train.max_minutes: {result['max_minutes']:g}`) |
| loss, mean of the first tenth of the logs | {loss['first_loss']:.3f} |
| loss, mean of the last tenth | {loss['last_loss']:.3f} |
| goodput | {result['goodput']:.1%} |

{result['goodput_line']}

![loss](loss.png)

The clips sampled at the end (EMA weights, 30 Euler steps, guidance 1.5; latent channels 0-2 as
RGB), each with the blob's measured direction and speed (brightness centroid, first to last frame;
true speed 1 px/frame):

| application | prompt | moved | px/frame along the caption |
|---|---|---|---|
{rows}

![sample](sample.png)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="the demo run's folder")
    parser.add_argument("out", type=Path, help="the report folder to write")
    parser.add_argument("--wall-s", type=float, help="the train command's wall time in seconds")
    args = parser.parse_args()
    result = report(args.run, args.wall_s)
    args.out.mkdir(parents=True, exist_ok=True)
    for picture in ("loss.png", "sample.png"):
        shutil.copy(args.run / picture, args.out / picture)
    (args.out / "demo.json").write_text(json.dumps(result, indent=2))
    (args.out / "README.md").write_text(markdown(result))
    print(f"wrote {args.out}/README.md, demo.json, loss.png, sample.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
