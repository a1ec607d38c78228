"""Checkpoints on one process: exact resume after SIGKILL, clean exit on SIGTERM, corrupted newest
checkpoint skipped, keep-last, async saves, export to safetensors and fine-tuning from it."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sora_dist.checkpoint import is_complete
from sora_dist.cli import main
from sora_dist.config import load_config
from sora_dist.config import resolve_model_config
from sora_dist.models import VideoDiT

REPO = Path(__file__).parents[1]


def args(data_dir, out_dir, *extra):
    return [
        "--config", str(REPO / "configs" / "demo.yaml"), f"--data.path={data_dir}", f"--train.out_dir={out_dir}",
        "--data.num_workers=1", "--model.hidden_size=64", "--model.depth=2", "--train.max_minutes=0",
        "--logging.tensorboard=false", "--optim.warmup_steps=2", "--logging.log_every=1", "--train.sample_at_end=false",
        "--checkpoint.resume=auto", *extra,
    ]


def start(cli_args):
    cmd = [sys.executable, "-m", "sora_dist.cli", "train", *cli_args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def run(cli_args):
    process = start(cli_args)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    return output


def losses_by_step(out_dir):
    """Last logged loss of every step (a resumed run logs the steps after its checkpoint again)."""
    by_step = {}
    for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        by_step[record["step"]] = record["loss"]
    return by_step


def wait_for_steps(out_dir, count, process, timeout=300):
    metrics = Path(out_dir) / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= count:
            return
        assert process.poll() is None, process.stdout.read()[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"fewer than {count} steps after {timeout} s")


@pytest.fixture(scope="module")
def uninterrupted(synthetic_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    run(args(synthetic_dir, out, "--train.steps=16", "--checkpoint.every_steps=4"))
    return out


def test_sigkill_then_auto_resume_logs_the_same_loss_at_every_step(synthetic_dir, tmp_path, uninterrupted):
    process = start(args(synthetic_dir, tmp_path, "--train.steps=16", "--checkpoint.every_steps=4"))
    wait_for_steps(tmp_path, 10, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    complete = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*") if is_complete(p)[0])
    assert complete and "step-16" not in complete
    output = run(args(synthetic_dir, tmp_path, "--train.steps=16", "--checkpoint.every_steps=4"))
    assert "resumed from" in output and "exact replay" in output
    expected, resumed = losses_by_step(uninterrupted), losses_by_step(tmp_path)
    assert sorted(resumed) == list(range(1, 17))
    assert resumed == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_sigterm_saves_a_complete_checkpoint_and_exits_zero(synthetic_dir, tmp_path):
    process = start(args(synthetic_dir, tmp_path, "--train.steps=100000"))
    wait_for_steps(tmp_path, 3, process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-3000:]
    assert "received SIGTERM" in output
    latest = (tmp_path / "checkpoints" / "latest").read_text()
    ok, why = is_complete(tmp_path / "checkpoints" / latest)
    assert ok, why
    assert int(latest.split("-")[1]) >= 3


def test_corrupted_newest_checkpoint_is_skipped_by_name(synthetic_dir, tmp_path):
    run(args(synthetic_dir, tmp_path, "--train.steps=8", "--checkpoint.every_steps=4"))
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-4", "step-8"]
    (checkpoints / "step-8" / ".metadata").write_bytes(b"\x00garbage")  # corrupted
    (checkpoints / "step-12.tmp").mkdir()  # an interrupted save: never a candidate
    output = run(args(synthetic_dir, tmp_path, "--train.steps=10", "--checkpoint.every_steps=4"))
    assert f"checkpoint {checkpoints / 'step-8'} is damaged: .metadata is 8 bytes, written as " in output
    assert f"resumed from {checkpoints / 'step-4'} at step 4" in output
    (checkpoints / "step-4" / "COMPLETE").unlink()  # interrupted save: no marker
    assert is_complete(checkpoints / "step-4") == (False, "no COMPLETE marker (the save was interrupted)")


def test_truncated_shard_file_is_detected(synthetic_dir, tmp_path):
    run(args(synthetic_dir, tmp_path, "--train.steps=4", "--checkpoint.every_steps=2"))
    newest = tmp_path / "checkpoints" / "step-4"
    data_file = next(newest.glob("*.distcp"))
    data_file.write_bytes(data_file.read_bytes()[:1000])
    ok, why = is_complete(newest)
    assert not ok and why.startswith(f"{data_file.name} is 1000 bytes, written as ")
    output = run(args(synthetic_dir, tmp_path, "--train.steps=5", "--checkpoint.every_steps=2"))
    assert f"checkpoint {newest} is damaged: {data_file.name} is 1000 bytes, written as " in output
    assert f"resumed from {tmp_path / 'checkpoints' / 'step-2'} at step 2" in output


def test_saves_by_the_minute(tmp_path, monkeypatch):
    from sora_dist.checkpoint import CheckpointManager
    from sora_dist.config import CheckpointConfig

    clock = [1000.0]
    monkeypatch.setattr("sora_dist.checkpoint.manager.time.monotonic", lambda: clock[0])
    manager = CheckpointManager(CheckpointConfig(every_minutes=5), tmp_path)
    assert manager.enabled and not manager.due(1)
    clock[0] += 299
    assert not manager.due(2)
    clock[0] += 2
    assert manager.due(3)
    assert not CheckpointManager(CheckpointConfig(), tmp_path).due(1000)  # disabled by default


def test_keep_last_and_async_saves(synthetic_dir, tmp_path, uninterrupted):
    output = run(args(synthetic_dir, tmp_path, "--train.steps=16", "--checkpoint.every_steps=2", "--checkpoint.keep_last=2", "--checkpoint.async_save=true"))
    assert "writing in the background" in output
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-14", "step-16"]
    assert (checkpoints / "latest").read_text() == "step-16"
    assert losses_by_step(tmp_path) == pytest.approx(losses_by_step(uninterrupted), rel=1e-6, abs=1e-7)


def test_export_gives_the_trained_models_outputs_and_fine_tunes(uninterrupted, synthetic_dir, tmp_path):
    checkpoint = uninterrupted / "checkpoints" / "step-16"
    for flag, reference in (([], "ema.safetensors"), (["--raw"], "model.safetensors")):
        out = tmp_path / f"export{len(flag)}.safetensors"
        assert main(["export", str(checkpoint), "--out", str(out), *flag]) == 0
        with safe_open(str(out), "pt") as f:
            model_section = json.loads(f.metadata()["model_config"])
        cfg = load_config(uninterrupted / "config.yaml")
        assert model_section["hidden_size"] == cfg.model.hidden_size
        exported = VideoDiT(resolve_model_config(cfg.model, 4, 32))
        exported.load_state_dict(load_file(out))
        trained = VideoDiT(resolve_model_config(cfg.model, 4, 32))
        trained.load_state_dict(load_file(uninterrupted / reference))  # the trainer's own final weights
        x, t, text, mask = torch.randn(2, 4, 3, 8, 8), torch.tensor([10.0, 700.0]), torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.bool)
        torch.testing.assert_close(exported(x, t, text, mask), trained(x, t, text, mask), rtol=0, atol=0)
    output = run(args(synthetic_dir, tmp_path / "finetune", "--train.steps=2", f"--checkpoint.init_from={tmp_path / 'export0.safetensors'}"))
    assert "initialized the weights from" in output
    # Fine-tuning starts where the export left off: far below a fresh model's first loss.
    assert losses_by_step(tmp_path / "finetune")[1] < 0.7 * losses_by_step(uninterrupted)[1]


def test_resume_of_a_missing_path_is_a_clear_error(synthetic_dir, tmp_path):
    process = start(args(synthetic_dir, tmp_path, "--train.steps=2", f"--checkpoint.resume={tmp_path / 'nope'}"))
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 2
    assert f"checkpoint.resume={tmp_path / 'nope'}" in output and "is not a complete checkpoint" in output


def test_sample_reads_a_checkpoint_folder_and_a_run_without_final_weights(uninterrupted, tmp_path, caplog):
    """Mid-run checkpoints sample directly (their EMA weights); a run folder without final weights
    falls back to its newest complete checkpoint. Both log progress with an ETA."""
    from sora_dist.cli import main

    partial = tmp_path / "partial"
    shutil.copytree(uninterrupted, partial, ignore=shutil.ignore_patterns("*.safetensors"))
    for source, expected in ((uninterrupted / "checkpoints" / "step-8", "step-8 (ema weights)"), (partial, "step-16 (ema weights)")):
        target = tmp_path / source.name
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="sora_dist"):
            code = main(["sample", "--from", str(source), "--samples", "1", "--out", str(target), "--diffusion.sample_steps=4"])
        assert code == 0 and (target / "frames.png").stat().st_size > 1000
        assert expected in caplog.text
        assert "sampling 1 x (8, 16, 16): 4/4 (100%)" in caplog.text and "ETA" in caplog.text
