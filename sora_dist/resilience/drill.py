"""Fault drill: an elastic two-"node" job on this machine loses a node, and recovers alone.

  sora-dist fault-drill --out runs/drill          (from a source checkout: it uses launch/)

Two torchrun agents (``launch/multi_node.sh`` with ``NNODES=1:2``, ``MAX_RESTARTS=2``, a 5 s last
call and ``--keep-alive-interval``) form one job on localhost and train the demo model with
checkpoints every few steps and the sample ledger on. At ``--kill-at-step`` the drill kills the second node's agent and workers (SIGKILL,
as a dead host would). The first node's workers fail in their next collective, its agent
restarts them, the rendezvous re-forms with one node, and the trainer resumes on the smaller
world from the newest complete checkpoint, with no human action. The drill then reports, from
the run's own records: recovery time (kill to the first step of the new attempt), steps lost
(trained after the checkpoint and redone), goodput across both attempts, and whether every
sample of the kept steps was trained exactly once.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from sora_dist.data.ledger import read_ledger
from sora_dist.errors import ConfigError
from sora_dist.resilience.audit import kept_samples, last_step
from sora_dist.resilience.goodput import format_summary, read_attempts, summarize

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "launch" / "multi_node.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def train_args(out: Path, steps: int, every_steps: int) -> list[str]:
    return [
        "--config", str(REPO / "configs" / "demo.yaml"), f"--data.path={out / 'data'}", f"--train.out_dir={out / 'run'}",
        "--data.num_workers=0", "--model.hidden_size=64", "--model.depth=2", "--train.max_minutes=0",
        "--logging.tensorboard=false", "--logging.log_every=5", f"--train.steps={steps}", "--train.sample_at_end=false",
        f"--checkpoint.every_steps={every_steps}", "--checkpoint.resume=auto", "--logging.sample_ledger=true",
        "--optim.warmup_steps=5",
    ]


def start_node(name: str, out: Path, port: int, nproc: int, args: list[str], keep_alive_s: int) -> subprocess.Popen:
    env = {**os.environ, "NNODES": "1:2", "NPROC": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "JOB_ID": f"drill-{port}", "MAX_RESTARTS": "2", "MONITOR_INTERVAL": "1", "LAST_CALL_TIMEOUT": "5",
           "JOIN_TIMEOUT": "120", "KEEP_ALIVE_INTERVAL": str(keep_alive_s), "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # this Python's torchrun
    log = open(out / f"node-{name}.log", "w")
    return subprocess.Popen(["bash", str(LAUNCHER), *args], env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_for(condition, timeout_s: float, what: str, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
            raise RuntimeError(f"fault drill: {what} did not happen within {timeout_s:.0f} s (logs beside the run)")
        time.sleep(0.2)


def run_drill(out: Path, steps: int = 40, kill_at_step: int = 14, every_steps: int = 5, nproc: int = 1, keep_alive_s: int = 5,
              timeout_s: float = 300) -> dict:
    """Run the drill in ``out``; returns its measurements (and raises if the job did not recover)."""
    if not LAUNCHER.is_file():
        raise ConfigError(f"the fault drill runs the launch scripts of a source checkout; {LAUNCHER} is missing")
    out.mkdir(parents=True, exist_ok=True)
    port, args = free_port(), train_args(out, steps, every_steps)
    survivor = start_node("a", out, port, nproc, args, keep_alive_s)  # hosts the rendezvous store: it must survive
    time.sleep(2)
    victim = start_node("b", out, port, nproc, args, keep_alive_s)
    try:
        wait_for(lambda: last_step(out / "run") >= kill_at_step, timeout_s, f"step {kill_at_step}", [survivor, victim])
        killed_at = time.time()
        kill_tree(victim)
        code = survivor.wait(timeout=timeout_s)
    finally:
        for proc in (survivor, victim):
            if proc.poll() is None:
                kill_tree(proc)
    if code != 0:
        raise RuntimeError(f"fault drill: the surviving node exited with {code}; see {out / 'node-a.log'}")
    attempts = read_attempts(out / "run" / "goodput")
    summary = summarize(attempts)
    kept, redone = kept_samples(out / "run")
    killed_after = max(r["step"] for records in read_ledger(out / "run")[0].values() for r in records)
    resumed = [a["resumed_from_step"] for a in attempts[1:]]
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"), "keep_alive_s": keep_alive_s, "world_sizes": [a["world_size"] for a in attempts],
        "killed_after_step": killed_after, "resumed_from_step": resumed, "final_step": attempts[-1]["last_step"],
        "recovery_s": attempts[-1]["first_step_at"] - killed_at if len(attempts) > 1 else None,
        "steps_lost": [killed_after - step for step in resumed[:1]],  # from the ledger: every step is in it
        "goodput": summary["goodput"], "goodput_summary": format_summary(summary),
        "kept_samples": len(kept), "distinct_kept_samples": len(set(kept)), "redone_step_records": redone,  # per dp rank
    }


def format_report(result: dict) -> str:
    return "\n".join([
        f"fault drill {result['date']} (rendezvous keep-alive {result['keep_alive_s']} s): world sizes per attempt {result['world_sizes']}, node killed after step "
        f"{result['killed_after_step']}, resumed from step {result['resumed_from_step']}, finished at step {result['final_step']}",
        f"recovery {result['recovery_s']:.1f} s (kill to the first step after the restart), steps lost {result['steps_lost']}",
        f"samples in kept steps: {result['kept_samples']}, distinct: {result['distinct_kept_samples']} (exactly once: "
        f"{result['kept_samples'] == result['distinct_kept_samples']})",
        result["goodput_summary"],
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sora-dist fault-drill", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the run, its data and both nodes' logs")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--kill-at-step", type=int, default=14)
    parser.add_argument("--every-steps", type=int, default=5, help="checkpoint interval")
    parser.add_argument("--nproc-per-node", type=int, default=1)
    parser.add_argument("--keep-alive-interval", type=int, default=5,
                        help="rendezvous heartbeat in s (KEEP_ALIVE_INTERVAL of launch/multi_node.sh; a dead node is dropped after 3 missed)")
    parser.add_argument("--json", default="", help="also write the measurements to this file")
    args = parser.parse_args(argv)
    result = run_drill(args.out, args.steps, args.kill_at_step, args.every_steps, args.nproc_per_node, args.keep_alive_interval)
    print(format_report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
