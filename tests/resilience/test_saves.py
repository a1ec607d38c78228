"""Saves that survive faults: a SIGKILL at any moment of a save, blocking or async, leaves a newest
complete checkpoint that the next launch resumes from; folders that cannot be written, or a disk
too small for a checkpoint, stop the run before training with the folder, host and fix named."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sora_dist.checkpoint import newest_complete
from sora_dist.cli import main
from sora_dist.config import load_config
from sora_dist.errors import ConfigError
from sora_dist.trainer import train

REPO = Path(__file__).parents[2]
WORKER = Path(__file__).with_name("save_kill_worker.py")


def train_args(data_dir, out_dir, *extra):
    return [
        "--config", str(REPO / "configs" / "demo.yaml"), f"--data.path={data_dir}", f"--train.out_dir={out_dir}",
        "--data.num_workers=0", "--model.hidden_size=64", "--model.depth=2", "--train.max_minutes=0",
        "--logging.tensorboard=false", "--optim.warmup_steps=2", "--logging.log_every=1", "--train.sample_at_end=false",
        "--checkpoint.resume=auto", "--checkpoint.every_steps=3", "--checkpoint.keep_last=1", *extra,
    ]


@pytest.mark.parametrize("mode, moment, survivor", [
    ("blocking", "before-shards", 3),
    ("blocking", "mid-shards", 3),
    ("blocking", "before-complete", 3),
    ("blocking", "before-rename", 3),
    ("blocking", "after-rename", 6),
    ("blocking", "mid-prune", 6),
    ("async", "mid-shards", 3),
    ("async", "before-complete", 3),
])
def test_a_kill_during_a_save_leaves_a_checkpoint_to_resume_from(synthetic_dir, tmp_path, caplog, mode, moment, survivor):
    args = train_args(synthetic_dir, tmp_path, f"--checkpoint.async_save={'true' if mode == 'async' else 'false'}")
    killed = subprocess.run([sys.executable, str(WORKER), moment, "--", *args, "--train.steps=6"], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert killed.returncode == -9, killed.stderr[-3000:]  # it died at the moment, not before or after
    newest = newest_complete(tmp_path / "checkpoints")
    assert newest is not None and newest.name == f"step-{survivor}"
    with caplog.at_level(logging.INFO, logger="sora_dist"):
        assert main(["train", *args, "--train.steps=8"]) == 0
    assert f"resumed from {newest} at step {survivor}" in caplog.text
    assert newest_complete(tmp_path / "checkpoints").name == "step-8"
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))  # the interrupted save was cleaned up


def config(data_dir, out_dir, *extra):
    return load_config(None, train_args(data_dir, out_dir, "--train.steps=2", *extra)[2:])


@pytest.mark.parametrize("where", ["read-only", "parent-is-a-file"])
def test_an_unwritable_run_folder_is_named_before_training(synthetic_dir, tmp_path, where):
    if where == "read-only":
        out = Path("/proc/sora-dist-test/run")  # procfs refuses new folders, even to root
    else:
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "run"
    with pytest.raises(ConfigError, match=rf"train.out_dir={out} is not writable on host .*Choose folders every node can write"):
        train(config(synthetic_dir, out))


def test_an_unwritable_checkpoint_folder_is_named_before_training(synthetic_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"checkpoint.dir=/proc/sora-dist-test/ckpt is not writable"):
        train(config(synthetic_dir, tmp_path, "--checkpoint.dir=/proc/sora-dist-test/ckpt"))


def test_a_disk_too_small_for_a_checkpoint_is_named_before_training(synthetic_dir, tmp_path, monkeypatch):
    import shutil

    import sora_dist.resilience.storage as storage

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda path: usage._replace(free=1000))  # a full disk
    with pytest.raises(ConfigError, match=r"checkpoint.dir=.* has 1000 B free on host .* with checkpoint.keep_last=1 the run keeps 1 "
                                          r"checkpoints and writes one more before pruning \(0 there now\), so 2 more of"):
        train(config(synthetic_dir, tmp_path))


def full_disk_at(monkeypatch, steps, after_bytes=20_000):
    """The checkpoint disk runs out of space part-way into the saves of ``steps``: a write into their
    files fails with ENOSPC after ``after_bytes``, as a disk that fills mid-save does."""
    import errno

    from sora_dist.checkpoint import files

    original = files._HashingStream.write

    def write(self, data):
        name = getattr(self._stream, "name", "")
        if any(f"step-{step}.tmp" in name for step in steps) and self.size + len(memoryview(data).cast("B")) > after_bytes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
        return original(self, data)

    monkeypatch.setattr(files._HashingStream, "write", write)


def test_a_disk_that_fills_mid_save_costs_that_checkpoint_not_the_run(synthetic_dir, tmp_path, caplog, monkeypatch):
    full_disk_at(monkeypatch, steps=(6, 9))
    with caplog.at_level(logging.INFO, logger="sora_dist"):
        assert main(["train", *train_args(synthetic_dir, tmp_path, "--checkpoint.keep_last=2"), "--train.steps=12"]) == 0
    failures = [line for line in caplog.text.splitlines() if "failed in" in line]
    assert len(failures) == 2 and "checkpoint step 6 failed in" in failures[0] and "checkpoint step 9 failed in" in failures[1]
    assert "No space left on device writing __0_0.distcp" in failures[0] and "training goes on" in failures[0]
    assert "the newest complete checkpoint is" in failures[0] and failures[0].rstrip().endswith("step-3)")
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("step-")) == ["step-12", "step-3"]
    monkeypatch.undo()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sora_dist"):
        assert main(["train", *train_args(synthetic_dir, tmp_path), "--train.steps=14"]) == 0
    assert f"resumed from {checkpoints / 'step-12'} at step 12" in caplog.text


def test_saves_failing_in_a_row_stop_the_run_naming_the_newest_checkpoint(synthetic_dir, tmp_path, caplog, monkeypatch):
    full_disk_at(monkeypatch, steps=(6, 9, 12))
    with caplog.at_level(logging.INFO, logger="sora_dist"):
        code = main(["train", *train_args(synthetic_dir, tmp_path, "--checkpoint.max_failed_saves=2"), "--train.steps=20"])
    assert code == 2
    line = next(line for line in caplog.text.splitlines() if "CheckpointError" in line)
    assert "2 checkpoint saves in a row failed (checkpoint.max_failed_saves=2), the last at step 9" in line
    assert f"the newest complete checkpoint is {tmp_path / 'checkpoints' / 'step-3'}" in line
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
