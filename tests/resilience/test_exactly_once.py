"""Exactly-once across sequences of kills and resumes, checked from outside the loader.

Each launch trains the real trainer on warm ranks (tests/warm_ranks.py: torchrun's environment,
without its agent) with the sample ledger on; the test SIGKILLs every rank from here once the
ledger shows a chosen step (mid-interval, or at a
checkpoint's step, before or after it is saved), then relaunches on another layout or engine, or
on the same one (an exact replay). The last launch trains past the end of the epoch. The run's own
records then say which samples the kept steps trained: every sample of the epoch exactly once,
and the final checkpoint's data position agrees.
"""

import json
import time
from pathlib import Path

import pytest

from sora_dist.checkpoint import newest_complete
from sora_dist.checkpoint.state import decode_data_state
from sora_dist.resilience.audit import epoch_coverage, kept_samples, last_step
from warm_ranks import Ranks

REPO = Path(__file__).parents[2]
EVERY = 4
FSDP, DDP = ["--parallel.engine=fsdp"], ["--parallel.engine=ddp"]
HSDP = ["--parallel.engine=fsdp", "--parallel.dp_replicate=2"]
RING = ["--parallel.sp_ring=2"]

# (ranks, layout, kill once the ledger reaches this step; None: train to the end)
SEQUENCES = {
    # The finding: a re-layout resume, then resumes on the unchanged layout (exact replays).
    "relayout-then-replays": [(4, FSDP, 10), (2, DDP, 17), (2, DDP, 24), (2, DDP, None)],
    # Four resumes over engines and layouts: killed mid-interval, at a checkpoint's step, on one rank.
    "four-layouts": [(4, FSDP, 6), (4, HSDP, 12), (2, RING, 21), (2, RING, 29), (1, [], None)],
}
STEPS = {"relayout-then-replays": 60, "four-layouts": 110}
WORKERS = {"relayout-then-replays": 1, "four-layouts": 0}  # DataLoader workers: the same in every launch, so replays happen


def train_args(data_dir, out_dir, steps, layout, workers):
    return [
        "--config", str(REPO / "configs" / "demo.yaml"), f"--data.path={data_dir}", f"--train.out_dir={out_dir}",
        f"--data.num_workers={workers}", "--model.hidden_size=64", "--model.depth=2", "--train.max_minutes=0",
        "--logging.tensorboard=false", "--logging.log_every=5", f"--train.steps={steps}", "--train.sample_at_end=false",
        "--train.sample_every=0", "--checkpoint.resume=auto", f"--checkpoint.every_steps={EVERY}", "--checkpoint.keep_last=2",
        "--logging.sample_ledger=true", "--data.tokens_per_batch=256", "--data.max_batch_size=4", "--optim.warmup_steps=2",
        "--fault.health_check=false", "--checkpoint.save_final=false", *layout,
    ]


def launch(nproc, args, kill_at, out, timeout=300):
    """One job of the sequence; SIGKILL of every rank once the ledger reaches ``kill_at`` (None)."""
    log = open(out / f"launch-{len(list(out.glob('launch-*.log')))}.log", "w")
    job = Ranks(nproc, ["-m", "sora_dist.train", *args], [(log, log)] * nproc)
    deadline = time.monotonic() + timeout
    while (code := job.poll()) is None and time.monotonic() < deadline:
        if kill_at is not None and last_step(out) >= kill_at:
            job.kill()
            return None
        time.sleep(0.05)
    if code is None:
        job.kill()
        return "timed out"
    return code


@pytest.mark.parametrize("name", SEQUENCES)
def test_every_sample_of_the_epoch_is_trained_once_across_kills_and_layouts(synthetic_dir, tmp_path, name):
    for i, (nproc, layout, kill_at) in enumerate(SEQUENCES[name]):
        code = launch(nproc, train_args(synthetic_dir, tmp_path, STEPS[name], layout, WORKERS[name]), kill_at, tmp_path)
        logs = "\n".join(p.read_text()[-3000:] for p in sorted(tmp_path.glob("launch-*.log")))
        assert code in (None, 0), logs
        if i:
            assert "resumed from" in (tmp_path / f"launch-{i}.log").read_text(), logs
    modes = "\n".join(p.read_text() for p in sorted(tmp_path.glob("launch-*.log")))
    assert "exact replay" in modes and "skipping every sample" in modes  # both kinds of resume happened
    kept, _ = kept_samples(tmp_path)
    assert max(epoch for epoch, _ in kept) >= 1, "the last launch trains past the end of epoch 0"
    coverage = epoch_coverage(kept, 0, 96)
    assert (len(coverage["repeated"]), len(coverage["never"])) == (0, 0), coverage
    # The final checkpoint's own data position agrees: epoch 0 is done on every position.
    final = newest_complete(tmp_path / "checkpoints")
    state = decode_data_state(json.loads((final / "data.json").read_text()), 96)
    assert 0 not in state["consumed"] or state["consumed"][0].all()
