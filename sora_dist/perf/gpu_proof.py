"""One command that proves a GPU machine and records what it measured (``sora-dist gpu-proof``).

  scripts/gpu_proof.sh OUT_DIR                      # everything, on a CUDA machine
  sora-dist gpu-proof --out OUT_DIR --parts tests demo   # some parts (each fits a 10-minute slot)

Parts, each run in a fresh process so that one failure or out-of-memory does not stop the rest:
- ``env``: date, GPU, driver, torch, CUDA, cuDNN, Triton, flash-attn, Python;
- ``tests``: ``pytest tests/gpu`` (every Triton kernel, each CUDA attention backend with and
  without text masks, the block-attention kernels, varlen, bf16 training paths, compile, FSDP2
  with meta init and the nccl/gloo process group), with each test's outcome;
- ``demo``: configs/demo.yaml trained on the GPU in bf16, its loss against the CPU run's;
- ``train``: ``bench-train`` for DiT-XL at 4k tokens, 1B at 16k and 3B at 32k (full activation
  checkpointing), each with the fused kernels and torch.compile on and off;
- ``calibrate``: ``sora-dist calibrate`` on DiT-XL at 4k tokens (batches 1, 2, 4), then the
  performance model's single-device step time for every eager, fused ``train`` run against the
  measured one (1B and 3B are outside the calibration's runs: a prediction, not a fit);
- ``kernels``: ``bench-kernels`` (attention TFLOP/s per backend, fused kernels against a copy);
- ``loader``: ``bench-loader`` with the DiT-XL step times measured by ``train``.

It writes ``gpu_proof.json`` (every number) and ``gpu_proof.md`` (the tables docs/benchmarks.md shows)
into the output folder, with the run folders and logs beside them. ``--small`` shrinks every part
to seconds so the command itself is tested on CPU; without CUDA the report says so on its first
line and the GPU tests are recorded as skipped, never as passed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional

import torch

from sora_dist.console import CommandParser, exit_process, user_command

log = logging.getLogger("sora_dist")
REPO = Path(__file__).resolve().parents[2]
PARTS = ("env", "tests", "demo", "train", "calibrate", "kernels", "loader")

# (name, preset, latent T h w, extra overrides): the three sizes; 3B needs full AC on one GPU.
TRAIN_CASES = (
    ("XL 4k", "XL", (16, 32, 32), []),
    ("1B 16k", "1B", (16, 64, 64), []),
    ("3B 32k", "3B", (32, 64, 64), ["--parallel.activation_checkpointing=full"]),
)
SMALL_TRAIN_CASES = (("debug 64", "debug", (4, 8, 8), []),)
# (preset, latent, batches) that calibrate the performance model: the smallest train case.
CALIBRATION_CASE = ("XL", (16, 32, 32), (1, 2, 4))
SMALL_CALIBRATION_CASE = ("debug", (4, 8, 8), (1, 2))
# Demo loss on 2 CPU cores, mean of the first and last tenth of the logs (docs/reports/2026-12-07-demo).
CPU_DEMO_LOSS = {"first_tenth": 0.339, "last_tenth": 0.034}


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict:
    """What the numbers were measured on."""
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": _version("triton"), "flash_attn": _version("flash-attn"), "flash_attn_3": _version("flash_attn_3"),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (no CUDA device)", "driver": None,
    }
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"]
        info["driver"] = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _run(cmd: list[str], log_path: Path, timeout: float, env: Optional[dict] = None) -> tuple[int, float]:
    """Run a command with its output in ``log_path``; returns (exit code, seconds)."""
    start = time.perf_counter()
    with open(log_path, "w") as out:
        try:
            code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, timeout=timeout, env={**os.environ, **(env or {})}).returncode
        except subprocess.TimeoutExpired:
            out.write(f"\n[gpu-proof] timed out after {timeout:.0f} s\n")
            code = 124
    return code, time.perf_counter() - start


def part_tests(out: Path, args) -> dict:
    """pytest tests/gpu in a process of its own; the outcome of every test from its JUnit XML."""
    xml = out / "gpu_tests.xml"
    code, seconds = _run([sys.executable, "-m", "pytest", "tests/gpu", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={xml}"],
                         out / "gpu_tests.log", args.timeout)
    outcomes = {"passed": 0, "failed": 0, "skipped": 0}
    failures, skip_reasons = [], set()
    if xml.is_file():
        for case in ET.parse(xml).getroot().iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            problem = case.find("failure") if case.find("failure") is not None else case.find("error")
            if problem is not None:
                outcomes["failed"] += 1
                failures.append(f"{name}: {problem.get('message', '')[:300]}")
            elif case.find("skipped") is not None:
                outcomes["skipped"] += 1
                skip_reasons.add(case.find("skipped").get("message", ""))
            else:
                outcomes["passed"] += 1
    return {"exit_code": code, "seconds": seconds, **outcomes, "failures": failures, "skip_reasons": sorted(skip_reasons)}


def part_demo(out: Path, args) -> dict:
    """The demo config on this device (bf16 on a GPU), against the CPU run's loss."""
    from sora_dist.metrics import read_history, summarize

    run_dir = out / "demo"
    steps = 40 if args.small else 1000
    cmd = [sys.executable, "-m", "sora_dist.cli", "train", "--config", "configs/demo.yaml", f"--train.out_dir={run_dir}",
           f"--train.steps={steps}", "--train.max_minutes=0", f"--data.path={out / 'demo_data'}", "--logging.tensorboard=false"]
    code, seconds = _run(cmd, out / "demo.log", args.timeout)
    result = {"exit_code": code, "seconds": seconds, "steps": steps, "cpu_reference": CPU_DEMO_LOSS}
    if (run_dir / "metrics.jsonl").is_file():
        history = read_history(run_dir / "metrics.jsonl")
        summary = summarize(history)
        result.update(first_tenth=summary["first_loss"], last_tenth=summary["last_loss"], records=len(history),
                      tokens_per_s=history[-1]["tokens_per_s"], mfu=history[-1].get("mfu"))
    return result


def train_cases(small: bool):
    """(label, preset, latent, overrides, fused, compile) for every bench-train run."""
    for label, preset, latent, extra in SMALL_TRAIN_CASES if small else TRAIN_CASES:
        for fused in ("reference", "auto"):
            for compiled in (False,) if small else (False, True):  # compiling on CPU costs a minute: not in the dry run
                yield label, preset, latent, extra, fused, compiled


def part_train(out: Path, args) -> dict:
    rows = []
    for label, preset, latent, extra, fused, compiled in train_cases(args.small):
        name = f"{preset}-{'fused' if fused == 'auto' else 'reference'}-{'compile' if compiled else 'eager'}"
        json_path = out / f"train_{name}.json"
        cmd = [sys.executable, "-m", "sora_dist.perf.bench_train", "--preset", preset, "--latent", *map(str, latent),
               "--steps", "3" if args.small else "10", "--warmup", "1" if args.small else "3", "--json", str(json_path),
               f"--model.fused_backend={fused}", f"--parallel.compile={str(compiled).lower()}", *extra]
        code, seconds = _run(cmd, out / f"train_{name}.log", args.timeout)
        row = {"case": label, "preset": preset, "fused_requested": fused, "fused": fused, "compile": compiled, "exit_code": code, "seconds": seconds}
        if code == 0 and json_path.is_file():
            row.update(json.loads(json_path.read_text()))
        else:
            row["error"] = _tail(out / f"train_{name}.log")
        rows.append(row)
        log.info("gpu-proof train %-8s fused=%-9s compile=%-5s -> %s", label, fused, compiled,
                 f"{row['step_s_median'] * 1e3:.1f} ms, MFU {row['mfu']:.1%}" if row.get("mfu") else row.get("error", "done")[-200:])
    return {"rows": rows}


def part_calibrate(out: Path, args, train: dict) -> dict:
    """Calibrate the performance model on this device, then predict the single-device step time of
    the ``train`` part's eager runs with the fused kernels (the calibration's own settings)."""
    from sora_dist.perf.calibration import load_calibration
    from sora_dist.perf.scaling import compare

    preset, latent, batches = SMALL_CALIBRATION_CASE if args.small else CALIBRATION_CASE
    calib = out / "calib.json"
    cmd = [sys.executable, "-m", "sora_dist.cli", "calibrate", "--preset", preset, "--latent", *map(str, latent),
           "--batches", *map(str, batches), "--out", str(calib)]
    code, seconds = _run(cmd, out / "calibrate.log", args.timeout)
    result = {"exit_code": code, "seconds": seconds, "preset": preset, "latent": list(latent), "batches": list(batches)}
    if code != 0 or not calib.is_file():
        return {**result, "error": _tail(out / "calibrate.log")}
    data = json.loads(calib.read_text())
    result.update({k: data[k] for k in ("flops_rate", "step_overhead_s", "memory_bw", "wrapper_host_s_per_block")})
    measured = [r for r in train.get("rows", []) if r.get("step_s_median") and r["fused_requested"] == "auto" and not r["compile"]]
    result["predictions"] = [{"case": r["case"], **row} for r, row in zip(measured, compare(measured, load_calibration([str(calib)])))]
    return result


def part_kernels(out: Path, args) -> dict:
    json_path = out / "kernels.json"
    code, seconds = _run([sys.executable, "-m", "sora_dist.perf.bench_kernels", "--json", str(json_path), *(["--small"] if args.small else [])],
                         out / "kernels.log", args.timeout)
    return {"exit_code": code, "seconds": seconds, **(json.loads(json_path.read_text()) if json_path.is_file() else {"error": _tail(out / "kernels.log")})}


def loader_step_ms(train: dict) -> dict[str, float]:
    """bench-loader profiles' step times from the measured XL throughput: a 256px batch of 3 clips
    of 9x32x32 latents is 6912 tokens, a 512px batch of 1 clip of 9x64x64 is 9216."""
    best = [r for r in train.get("rows", []) if r.get("preset") == "XL" and r.get("tokens_per_s_per_device")]
    if not best:
        return {}
    tokens_per_s = max(r["tokens_per_s_per_device"] for r in best)
    return {"xl256": 6912 / tokens_per_s * 1e3, "xl512": 9216 / tokens_per_s * 1e3}


def part_loader(out: Path, args, train: dict) -> dict:
    json_path = out / "loader.json"
    step_ms = loader_step_ms(train)
    cmd = [sys.executable, "-m", "sora_dist.perf.bench_loader", "--json", str(json_path)]
    if args.small:
        cmd += ["--profiles", "demo", "xl256", "--batches", "3", "--samples", "12", "--workers", "1"]
    else:
        cmd += ["--workers", "2", "4"]
    if step_ms:
        cmd += ["--step-ms", *(f"{k}={v:.2f}" for k, v in step_ms.items())]
    code, seconds = _run(cmd, out / "loader.log", args.timeout)
    result = {"exit_code": code, "seconds": seconds, "step_ms_from_train": step_ms}
    if json_path.is_file():
        result.update(json.loads(json_path.read_text()))
    return result


def _tail(path: Path, chars: int = 1500) -> str:
    return path.read_text()[-chars:] if path.is_file() else ""


def markdown(report: dict) -> str:
    """The tables of docs/benchmarks.md's GPU proof section."""
    env = report.get("env", {})
    lines = [f"# GPU proof, {env.get('date', '?')}", ""]
    if not report.get("cuda"):
        lines += ["**No CUDA device: this is a dry run of the command, not a GPU proof.**", ""]
    lines += [f"{env.get('gpu')} | driver {env.get('driver')} | torch {env.get('torch')} | CUDA {env.get('cuda')} | cuDNN {env.get('cudnn')} "
              f"| Triton {env.get('triton')} | flash-attn {env.get('flash_attn')} | FA3 {env.get('flash_attn_3')} | Python {env.get('python')}", ""]
    if "tests" in report:
        t = report["tests"]
        lines += [f"GPU tests: {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped ({t['seconds']:.0f} s)", ""]
        lines += [f"- FAILED {f}" for f in t["failures"]] + [f"- skipped: {r}" for r in t["skip_reasons"]] + [""]
    if "demo" in report:
        d = report["demo"]
        if "last_tenth" in d:
            lines += [f"Demo ({d['steps']} steps, {d['seconds']:.0f} s): loss {d['first_tenth']:.3f} (first tenth) -> {d['last_tenth']:.3f} "
                      f"(last tenth); the CPU run: {CPU_DEMO_LOSS['first_tenth']} -> {CPU_DEMO_LOSS['last_tenth']}", ""]
        else:
            lines += [f"Demo: failed (exit {d['exit_code']})", ""]
    rows = report.get("train", {}).get("rows", [])
    if rows:
        lines += ["| model | tokens | fused kernels | compile | step (ms) | tokens/s | TFLOP/s | MFU | peak GiB |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if "step_s_median" in r:
                mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
                lines.append(f"| {r['preset']} | {r['tokens_per_sample']} | {r['fused']} | {r['compile']} | {r['step_s_median'] * 1e3:.1f} | "
                             f"{r['tokens_per_s_per_device']:.0f} | {r['tflops_per_device']:.1f} | {mfu} | {r.get('mem_peak_gib', 0):.1f} |")
            else:
                lines.append(f"| {r['preset']} | | {r['fused']} | {r['compile']} | failed (exit {r['exit_code']}) | | | | |")
        lines.append("")
    lines += _calibration_lines(report.get("calibrate", {}))
    kernels = report.get("kernels", {})
    if kernels.get("attention"):
        lines += ["| attention backend | head dim | tokens | ms | TFLOP/s |", "|---|---|---|---|---|"]
        lines += [f"| {r['backend']} | {r['head_dim']} | {r['seq']} | {r['ms']:.2f} | {r['tflops']:.1f} |" for r in kernels["attention"]] + [""]
        lines += ["| fused kernel | backend | GB/s | of copy |", "|---|---|---|---|"]
        lines += [f"| {r['op']} | {r['backend']} | {r['gb_per_s']:.0f} | {r['of_copy']:.0%} |" for r in kernels["fused"]] + [""]
    loader = report.get("loader", {})
    if loader.get("rows"):
        lines += ["| loader profile | workers | samples/s | step (ms) | data wait |", "|---|---|---|---|---|"]
        lines += [f"| {r['profile']} | {r['workers']} | {r['samples_per_s']:.0f} | {r['step_ms']:.1f} ({r['step_source']}) | {r['data_wait_frac']:.2%} |"
                  for r in loader["rows"]] + [""]
    return "\n".join(lines)


def _calibration_lines(cal: dict) -> list[str]:
    if not cal:
        return []
    if "flops_rate" not in cal:
        return [f"Calibration: failed (exit {cal['exit_code']})", ""]
    lines = [f"Calibration ({cal['preset']} latent {cal['latent']}, batches {cal['batches']}): {cal['flops_rate'] / 1e12:.3g} TFLOP/s achieved, "
             f"{cal['step_overhead_s'] * 1e3:.1f} ms fixed per step, copy {cal['memory_bw'] / 1e9:.0f} GB/s", ""]
    if not cal["predictions"]:
        return lines + ["No eager fused train runs to predict: run the train part first.", ""]
    lines += ["| model | layout | batch | predicted step (ms) | measured step (ms) | error |", "|---|---|---|---|---|---|"]
    lines += [f"| {p['case']} | {p['layout']} | {p['global_batch']} | {p['predicted_s'] * 1e3:.1f} | {p['measured_s'] * 1e3:.1f} | {p['error']:+.1%} |"
              for p in cal["predictions"]]
    return lines + [""]


def run(args) -> dict:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu_proof.json"
    report = json.loads(path.read_text()) if path.is_file() else {}  # parts run in separate calls add up
    report.update(cuda=torch.cuda.is_available(), small=args.small, env=environment(),
                  parts=sorted(set(report.get("parts", [])) | set(args.parts)))
    steps = {"tests": part_tests, "demo": part_demo, "train": part_train, "kernels": part_kernels}
    reading_train = {"calibrate": part_calibrate, "loader": part_loader}  # these use the train part's step times
    for name in (p for p in PARTS if p in args.parts and p != "env"):  # train first, in any order given
        log.info("gpu-proof: %s ...", name)
        started = time.perf_counter()
        if name in reading_train:
            report[name] = reading_train[name](out, args, report.get("train", {}))
        else:
            report[name] = steps[name](out, args)
        log.info("gpu-proof: %s done in %.0f s", name, time.perf_counter() - started)
        path.write_text(json.dumps(report, indent=2, default=str))
        (out / "gpu_proof.md").write_text(markdown(report))
    path.write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu_proof.md").write_text(markdown(report))
    return report


@user_command
def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="sora-dist gpu-proof", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for gpu_proof.json, gpu_proof.md, logs and run folders (parts add up)")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--small", action="store_true", help="seconds-sized runs, to test the command itself (CPU CI)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    report = run(args)
    print(markdown(report))
    failed = [name for name in args.parts if isinstance(report.get(name), dict) and report[name].get("exit_code", 0) != 0]
    failed += [f"train {r['case']} fused={r['fused_requested']} compile={r['compile']}" for r in report.get("train", {}).get("rows", []) if r["exit_code"]]
    if failed:
        log.error("gpu-proof: failed parts: %s (logs in %s)", ", ".join(failed), args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    exit_process(main())
