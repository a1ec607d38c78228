"""Chaos suite: one real training job per fault on this machine, the fault injected while it runs,
and what it cost, read from the job's own records.

  sora-dist fault-drill --out runs/chaos [--faults sigstop-rank,disk-full] [--repeat 20] [--jobs 2]

Every job trains the demo model on 2 gloo ranks over a 64-sample synthetic set (4 shards) for 30
steps (kill-node 40), past the end of epoch 0, with a checkpoint every 5 steps (keep_last 2), the
sample ledger on, the step watchdog at 10x the median step (at least 5 s) and torchrun restarting
failed workers once (``launch/single_node.sh``, or torchrun with the same settings where a fault
must be installed inside the process, see inject.py). torchrun gives a worker it stops 5 s to exit
before SIGKILL (``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``; its default, 30 s, would add 25 s to a frozen
rank's recovery; on a cluster set it to the time a SIGTERM'd save needs). ``--jobs 2`` runs two
faults' jobs at once (slow-rank always alone: it pins processes to cores); a report's recovery
times come from ``--jobs 1``, where no job shares the cores with another. The faults:

  none              undisturbed: the reference for the final loss
  kill-node         SIGKILL of one of two elastic "nodes" (agent and workers), after step 14
  sigstop-rank      SIGSTOP of rank 1 after step-10 is saved: a frozen process
  disk-full         after step-10 the checkpoint disk fills (a filler file); freed after two failed saves
  truncated-shard   step-15's shard file cut short, then rank 1 killed: the restart must resume step-10
  garbled-metadata  step-15's .metadata overwritten with noise of the same size, then rank 1 killed
  empty-metadata    step-15's .metadata emptied, then rank 1 killed
  renamed-tensor    a tensor renamed inside step-15's .metadata, its checksum rewritten to match
  flipped-bytes     64 bytes inverted inside step-15's shard file (same size), then rank 1 killed
  crafted-metadata  step-15's .metadata replaced by a pickle that would create a file when loaded
  corrupt-data      one sample's latent bytes garbled inside a data shard before the start
  nan-step          the model's output on rank 1 in step 12 is NaN (first attempt only)
  slow-rank         rank 1 shares its core with two busy processes from step 3 on

Per fault: seconds from the injection to the first log line that names it (noticed), to the first
step of the attempt that recovered (for a full disk: the next complete checkpoint), restarts,
steps lost (trained, then redone after a resume), how many samples of epoch 0 the kept steps
trained once, more than once and never, the final loss against the undisturbed job's, and
whether the job finished by itself (exit 0 at its last step).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import pickle
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from sora_dist.checkpoint.files import COMPLETE, file_digest
from sora_dist.checkpoint.manager import checkpoint_size
from sora_dist.console import CommandParser, exit_process, positive_int, user_command
from sora_dist.data import make_synthetic
from sora_dist.data.ledger import read_ledger
from sora_dist.resilience.audit import epoch_coverage, kept_samples, last_step
from sora_dist.resilience.goodput import read_attempts
from sora_dist.resilience.inject import disk_used
from sora_dist.resilience.jobs import Job, free_port, kill_tree, worker_pid

REPO = Path(__file__).resolve().parents[2]
SAMPLES, PER_SHARD, STEPS, EVERY, NPROC = 64, 16, 30, 5, 2
NODE_STEPS = 40
"""kill-node's steps: after the loss of a node the one left trains epoch 0's rest at half the pace."""
SHUTDOWN_TIMEOUT_S = 5
ALONE = {"slow-rank"}
"""Faults whose job must have the machine to itself (--jobs above 1 runs the others in pairs)."""
POLL_S, JOB_TIMEOUT_S = 0.02, 300


def train_args(run: Path, data: Path, *extra: str, steps: int = STEPS) -> list[str]:
    return [
        "--config", str(REPO / "configs" / "demo.yaml"), f"--data.path={data}", f"--train.out_dir={run}", "--data.num_workers=0",
        "--model.hidden_size=64", "--model.depth=2", "--train.max_minutes=0", "--logging.tensorboard=false", "--logging.log_every=5",
        f"--train.steps={steps}", "--train.sample_at_end=false", "--train.sample_every=0", f"--checkpoint.every_steps={EVERY}",
        "--checkpoint.keep_last=2", "--checkpoint.resume=auto", "--checkpoint.save_final=false", "--logging.sample_ledger=true",
        "--data.tokens_per_batch=256", "--data.max_batch_size=4", "--optim.warmup_steps=5", "--fault.step_timeout_min_s=5",
        "--fault.health_check=false", *extra,  # the health check is no fault here, and 2 shared cores would make it one
    ]


def job_env(**extra: str) -> dict:
    bin_dir = Path(sys.executable).parent  # this Python's torchrun
    return {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(SHUTDOWN_TIMEOUT_S), **extra}


@dataclasses.dataclass
class Context:
    """One fault's job and its folders, for the fault's outside action."""

    fault: str
    folder: Path
    data: Path
    disk_bytes: int
    """Size of the small checkpoint disk of disk-full: room for keep_last + 1 checkpoints."""
    job: Optional[Job] = None
    disk: str = ""
    """How the small disk is made: 'tmpfs' (mounted) or 'seam' (inject.py); '' for no small disk."""
    hogs: list = dataclasses.field(default_factory=list)

    @property
    def run(self) -> Path:
        return self.folder / "run"

    @property
    def checkpoints(self) -> Path:
        return self.folder / "disk" if self.fault == "disk-full" else self.run / "checkpoints"

    def wait_until(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not condition():
            if self.job.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chaos {self.fault}: {what} never happened (see {self.folder / 'job.log'})")
            time.sleep(POLL_S)

    def worker(self, rank: int) -> int:
        pid = worker_pid(self.job.proc, rank)
        if pid is None:
            raise RuntimeError(f"chaos {self.fault}: no trainer process of rank {rank} below the job")
        return pid

    def saved(self, step: int) -> bool:
        return (self.checkpoints / f"step-{step}" / COMPLETE).is_file()

    def free_bytes(self) -> int:
        if self.disk == "tmpfs":
            return shutil.disk_usage(self.checkpoints).free
        return self.disk_bytes - disk_used(self.checkpoints)


# -- outside actions: each returns the Unix time the fault was injected ---------------------------


def freeze_rank(ctx: Context) -> float:
    ctx.wait_until(lambda: ctx.saved(10), "step-10 saved")
    os.kill(ctx.worker(1), signal.SIGSTOP)
    return time.time()


def fill_disk(ctx: Context) -> float:
    ctx.wait_until(lambda: ctx.saved(10), "step-10 saved")
    filler = ctx.checkpoints / "filler"
    size = checkpoint_size(ctx.checkpoints / "step-10")
    with open(filler, "wb") as f:  # leave half a checkpoint free
        os.posix_fallocate(f.fileno(), 0, max(1, ctx.free_bytes() - size // 2))
    filled = time.time()
    ctx.wait_until(lambda: ctx.job.count(r"rank0\] checkpoint step \d+ failed") >= 2, "two failed saves")
    filler.unlink()
    return filled


def damage(kind: str) -> Callable[[Context], float]:
    def act(ctx: Context) -> float:
        ctx.wait_until(lambda: ctx.saved(15), "step-15 saved")
        DAMAGES[kind](ctx.checkpoints / "step-15", ctx.folder)
        os.kill(ctx.worker(1), signal.SIGKILL)  # a crash: torchrun restarts from the damaged checkpoint
        return time.time()

    return act


def slow_rank(ctx: Context) -> float:
    ctx.wait_until(lambda: last_step(ctx.run) >= 3, "step 3")
    cores = sorted(os.sched_getaffinity(0))
    for rank in range(NPROC):
        os.sched_setaffinity(ctx.worker(rank), {cores[rank % len(cores)]})
    ctx.hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    for hog in ctx.hogs:
        os.sched_setaffinity(hog.pid, {cores[1 % len(cores)]})
    return time.time()


def nan_time(ctx: Context) -> float:
    """In-process fault: it struck when step 11 ended (step 12 began) on the first rank to end it.
    Each rank writes its own ledger: the first to record step 11 may be either."""
    def step_11_ended() -> Optional[float]:
        times = [r["time"] for records in read_ledger(ctx.run).get(0, {}).values() for r in records if r["step"] == 11]
        return min(times, default=None)

    ctx.wait_until(lambda: step_11_ended() is not None, "step 11")
    return step_11_ended()


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


def _rename_tensor(checkpoint: Path) -> None:
    metadata = checkpoint / ".metadata"
    metadata.write_bytes(metadata.read_bytes().replace(b"model.x_embedder.weight", b"model.x_embedder.weighs"))
    _resign(checkpoint, ".metadata")


def _resign(checkpoint: Path, name: str) -> None:
    """Rewrite the file's checksum to match: damage that only the load itself can find."""
    manifest = json.loads((checkpoint / COMPLETE).read_text())
    manifest["files"][name] = file_digest(checkpoint / name)
    (checkpoint / COMPLETE).write_text(json.dumps(manifest))


class _Crafted:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def _craft(checkpoint: Path, folder: Path) -> None:
    (checkpoint / ".metadata").write_bytes(pickle.dumps(_Crafted(str(folder / "crafted-code-ran"))))
    _resign(checkpoint, ".metadata")


DAMAGES = {
    "truncated-shard": lambda c, f: (c / "__0_0.distcp").write_bytes((c / "__0_0.distcp").read_bytes()[:1000]),
    "garbled-metadata": lambda c, f: (c / ".metadata").write_bytes(os.urandom((c / ".metadata").stat().st_size)),
    "empty-metadata": lambda c, f: (c / ".metadata").write_bytes(b""),
    "renamed-tensor": lambda c, f: _rename_tensor(c),
    "flipped-bytes": lambda c, f: _flip(c / "__0_0.distcp"),
    "crafted-metadata": _craft,
}


def corrupt_sample(data: Path) -> None:
    """Garble the bytes of the first sample's latent inside shard-000001.tar (same size)."""
    shard = data / "shard-000001.tar"
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".latent.npy"))
    raw = bytearray(shard.read_bytes())
    raw[member.offset_data : member.offset_data + member.size] = b"\x00" * member.size
    shard.write_bytes(bytes(raw))


@dataclasses.dataclass(frozen=True)
class Fault:
    how: str
    noticed: str
    """A log line that shows the fault was noticed (regex)."""
    act: Optional[Callable[[Context], float]] = None
    inject: tuple[str, ...] = ()
    """An in-process fault (inject.py arguments); else a plain launch through launch/single_node.sh."""
    extra: tuple[str, ...] = ()


FAULTS: dict[str, Fault] = {
    "none": Fault("nothing: the reference job", r"^$"),
    "kill-node": Fault("SIGKILL of one of two elastic nodes (agent and workers) after step 14", r"exitcode|Error|failed"),
    "sigstop-rank": Fault("SIGSTOP of rank 1 after step-10 is saved", r"step watchdog: rank", freeze_rank),
    "disk-full": Fault("checkpoint disk filled after step-10, freed after two failed saves", r"checkpoint step \d+ failed", fill_disk,
                       extra=("--checkpoint.max_failed_saves=5",)),
    **{kind: Fault(f"step-15 {kind.replace('-', ' ')}, then rank 1 killed", r"is damaged", damage(kind)) for kind in DAMAGES},
    "corrupt-data": Fault("one sample's latent bytes zeroed inside shard-000001.tar", r"skipped corrupt input"),
    "nan-step": Fault("NaN output on rank 1 in step 12 (first attempt)", r"non-finite training signal", nan_time, ("nan", "1", "12")),
    "slow-rank": Fault("rank 1 on a core with two busy processes from step 3", r"straggler: rank 1", slow_rank),
}


def launch(ctx: Context, fault: Fault) -> Job:
    args = train_args(ctx.run, ctx.data, *fault.extra, *([f"--checkpoint.dir={ctx.checkpoints}"] if ctx.disk else []))
    inject = ["disk", str(ctx.checkpoints), str(ctx.disk_bytes)] if ctx.disk == "seam" else list(fault.inject)
    env = job_env(NPROC=str(NPROC), MAX_RESTARTS="1")
    if not inject:
        return Job(["bash", str(REPO / "launch" / "single_node.sh"), *args], ctx.folder / "job.log", env)
    cmd = ["torchrun", "--standalone", "--nproc-per-node", str(NPROC), "--max-restarts", "1",
           "-m", "sora_dist.resilience.inject", *inject, "--", *args]
    return Job(cmd, ctx.folder / "job.log", {**env, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})  # as launch/*.sh set it


def small_disk(folder: Path, size: int) -> str:
    """Mount a tmpfs of ``size`` bytes on ``folder`` where this machine allows it ('tmpfs'), else
    'seam': the trainer's file writes get the disk's limit (inject.py)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    except OSError:  # no mount command at all
        return "seam"
    return "tmpfs" if mounted.returncode == 0 else "seam"


def measure(ctx: Context, code: Optional[int], injected: Optional[float], reference_loss: Optional[float]) -> dict:
    attempts = read_attempts(ctx.run / "goodput")
    kept, redone = kept_samples(ctx.run)
    coverage = epoch_coverage(kept, 0, SAMPLES)
    noticed = ctx.job.first(FAULTS[ctx.fault].noticed, injected) if injected else None
    if ctx.fault == "disk-full":
        recovered = ctx.job.first(r"checkpoint step \d+ saved", noticed or 0)
    elif len(attempts) > 1:
        recovered = attempts[-1]["first_step_at"]
    else:
        recovered = None
    metrics = [json.loads(line) for line in (ctx.run / "metrics.jsonl").read_text().splitlines()] if (ctx.run / "metrics.jsonl").exists() else []
    loss = metrics[-1]["loss"] if metrics else None
    return {
        "fault": ctx.fault, "how": FAULTS[ctx.fault].how + (f" ({ctx.disk})" if ctx.disk else ""),
        "noticed_s": None if noticed is None else round(noticed - injected, 2),
        "recovered_s": None if recovered is None or injected is None else round(recovered - injected, 2),
        "restarts": len(attempts) - 1, "steps_lost": max(redone.values(), default=0),
        "resumed_from": [a["resumed_from_step"] for a in attempts[1:]],
        "epoch0_once": len(coverage["once"]), "epoch0_repeated": len(coverage["repeated"]), "epoch0_never": len(coverage["never"]),
        "final_loss": loss, "loss_vs_reference": None if loss is None or not reference_loss else round(loss / reference_loss - 1, 4),
        "finished": code == 0 and bool(attempts) and attempts[-1]["last_step"] == (NODE_STEPS if ctx.fault == "kill-node" else STEPS),
        "exit_code": code, "crafted_code_ran": (ctx.folder / "crafted-code-ran").exists(),
    }


def run_fault(name: str, folder: Path, data: Path, reference: Optional[dict]) -> dict:
    """Run one fault's job in ``folder`` (made afresh) and measure it against ``reference`` (the
    undisturbed job's row and checkpoint size; None for the undisturbed job itself)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    fault = FAULTS[name]
    ctx = Context(name, folder, data, disk_bytes=(reference or {}).get("disk_bytes", 0))
    loss = reference["final_loss"] if reference else None
    if name == "corrupt-data":
        shutil.copytree(data, folder / "data")
        ctx.data = folder / "data"
        corrupt_sample(ctx.data)
    if name == "kill-node":
        return kill_node(ctx, loss)
    if name == "disk-full":
        ctx.disk = small_disk(ctx.checkpoints, ctx.disk_bytes)
    injected, problem = None, ""
    try:
        ctx.job = launch(ctx, fault)
        try:
            injected = ctx.job.started if name == "corrupt-data" else fault.act(ctx) if fault.act else None
        except Exception as err:  # a fault that could not be injected is a failed row, not a failed suite
            problem = f"{type(err).__name__}: {err}"
        code = ctx.job.wait(JOB_TIMEOUT_S)
    finally:
        if ctx.job is not None and ctx.job.proc.poll() is None:
            kill_tree(ctx.job.proc)
        for hog in ctx.hogs:
            hog.kill()
        if ctx.disk == "tmpfs":
            subprocess.run(["umount", "-l", str(ctx.checkpoints)], capture_output=True)
    return {**measure(ctx, code, injected, loss), **({"problem": problem} if problem else {})}


def kill_node(ctx: Context, reference_loss: Optional[float]) -> dict:
    """Two torchrun agents of launch/multi_node.sh (NNODES=1:2, one rank each) form one elastic
    job; the second node's agent and workers are SIGKILLed after step 14; the first re-forms alone."""
    port, args = free_port(), train_args(ctx.run, ctx.data, steps=NODE_STEPS)

    def node(name: str) -> Job:
        env = job_env(NNODES="1:2", NPROC="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), JOB_ID=f"chaos-{port}", MAX_RESTARTS="2",
                      MONITOR_INTERVAL="1", LAST_CALL_TIMEOUT="5", JOIN_TIMEOUT="120", KEEP_ALIVE_INTERVAL="5")
        return Job(["bash", str(REPO / "launch" / "multi_node.sh"), *args], ctx.folder / f"node-{name}.log", env)

    survivor = node("a")  # hosts the rendezvous store: it must survive
    time.sleep(2)
    victim = node("b")
    ctx.job, injected, problem = survivor, None, ""
    try:
        try:
            ctx.wait_until(lambda: last_step(ctx.run) >= 14, "step 14")
            injected = time.time()
            kill_tree(victim.proc)
        except RuntimeError as err:
            problem = str(err)
        code = survivor.wait(JOB_TIMEOUT_S)
    finally:
        for job in (survivor, victim):
            if job.proc.poll() is None:
                kill_tree(job.proc)
    result = measure(ctx, code, injected, reference_loss)
    result["world_sizes"] = [a["world_size"] for a in read_attempts(ctx.run / "goodput")]
    return {**result, **({"problem": problem} if problem else {})}


def environment() -> str:
    return (f"{time.strftime('%Y-%m-%d %H:%M %Z')}, {platform.node()}: {len(os.sched_getaffinity(0))} cores, Python "
            f"{platform.python_version()}, torch {torch.__version__}, gloo on CPU")


def run_suite(out: Path, faults: list[str], repeat: int = 1, jobs: int = 1, progress: Callable[[str], None] = print) -> dict:
    """The undisturbed job, then every fault ``repeat`` times, ``jobs`` at a time (those in ALONE
    one at a time, after the others); returns the rows, in the order asked, and the environment."""
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    if not data.exists():
        make_synthetic(data, SAMPLES, seed=0, samples_per_shard=PER_SHARD)
    started = time.time()
    reference = run_fault("none", out / "none", data, None)
    one_checkpoint = checkpoint_size(out / "none" / "run" / "checkpoints" / f"step-{STEPS}")
    reference["disk_bytes"] = 3 * one_checkpoint * 13 // 10  # keep_last 2 + the one being written, and 30%
    todo = [(r, name) for r in range(repeat) for name in faults if name != "none"]
    rows: dict[tuple[int, str], dict] = {}

    def run(r: int, name: str) -> None:
        rows[r, name] = run_fault(name, out / (name if repeat == 1 else f"{name}-{r}"), data, reference)
        elapsed = time.time() - started
        progress(f"chaos {len(rows)}/{len(todo)}: {name}: {'finished' if rows[r, name]['finished'] else 'DID NOT FINISH'} "
                 f"({elapsed:.0f} s so far, ETA {elapsed / (len(rows) + 1) * (len(todo) - len(rows)):.0f} s)")

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        for future in [pool.submit(run, r, name) for r, name in todo if name not in ALONE]:
            future.result()
    for r, name in todo:
        if name in ALONE:
            run(r, name)
    return {"environment": environment(), "seconds": round(time.time() - started, 1), "rows": [reference, *(rows[key] for key in todo)]}


def _cell(value, unit: str = "") -> str:
    return "—" if value is None else f"{value}{unit}"


def format_table(result: dict) -> str:
    lines = [f"Chaos suite, {result['environment']}; {result['seconds']:.0f} s in all.", "",
             "| fault | injected | noticed after | recovered after | restarts | steps lost | epoch 0 once / twice+ / never | final loss (vs undisturbed) | finished |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        change = "" if row["loss_vs_reference"] is None else f" ({row['loss_vs_reference']:+.2%})"
        loss = "—" if row["final_loss"] is None else f"{row['final_loss']:.4f}{change}"
        lines.append(f"| {row['fault']} | {row['how']} | {_cell(row['noticed_s'], ' s')} | {_cell(row['recovered_s'], ' s')} | "
                     f"{row['restarts']} | {row['steps_lost']} | {row['epoch0_once']} / {row['epoch0_repeated']} / {row['epoch0_never']} | "
                     f"{loss} | {'yes' if row['finished'] else 'NO'} |")
    return "\n".join(lines)


@user_command
def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = CommandParser(prog="sora-dist fault-drill", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the jobs, their data and logs (a source checkout's launch/ runs them)")
    parser.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, of: {', '.join(FAULTS)} (default: all)")
    parser.add_argument("--repeat", type=positive_int, default=1, help="run each fault this many times (e.g. 20 for sigstop-rank)")
    parser.add_argument("--jobs", type=positive_int, default=1, help="faults run at once (2 halves the suite's time; a report's recovery times want 1)")
    parser.add_argument("--json", default="", help="also write the rows to this file")
    parser.add_argument("--report", default="", help="also write the table as markdown to this file")
    args = parser.parse_args(argv)
    faults = [name.strip() for name in args.faults.split(",") if name.strip()]
    unknown = [name for name in faults if name not in FAULTS]
    if unknown:
        parser.error(f"unknown faults {unknown}; known: {', '.join(FAULTS)}")
    result = run_suite(args.out, faults, args.repeat, args.jobs)
    table = format_table(result)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.report:
        Path(args.report).write_text(table + "\n")
    return 0 if all(row["finished"] for row in result["rows"]) else 1


if __name__ == "__main__":
    exit_process(main())
