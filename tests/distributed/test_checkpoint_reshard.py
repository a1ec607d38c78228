"""A checkpoint saved on 4 ranks with one layout resumes on 2 ranks with another and on 1 rank:
model, optimizer and EMA state equal what was saved, and every sample of the epoch is trained on
exactly once across the resume. DeepSpeed resumes on its own world size and refuses another."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from warm_ranks import run_ranks

WORKER = Path(__file__).with_name("reshard_worker.py")


def overrides(data_dir, out_dir):
    return [
        f"--data.path={data_dir}", f"--train.out_dir={out_dir}", "--data.num_workers=1", "--model.hidden_size=64",
        "--model.depth=2", "--model.num_heads=4", "--logging.tensorboard=false", "--logging.log_every=1",
        "--checkpoint.every_steps=100", "--train.steps=3", "--data.tokens_per_batch=512", "--data.max_batch_size=8",
    ]


def worker(nproc, mode, out, args, expect_ok=True):
    if nproc == 1:
        result = subprocess.run([sys.executable, str(WORKER), mode, str(out), *args], capture_output=True, text=True, timeout=600,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    else:
        result = run_ranks(nproc, [str(WORKER), mode, str(out), *args], timeout=600)
    if expect_ok:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def saved(synthetic_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    args = overrides(synthetic_dir, root / "run")
    worker(4, "save", root / "save.pt", args + ["--parallel.tp=2"])  # FSDP2 2 x TP 2
    return root, args, torch.load(root / "save.pt", weights_only=False)


@pytest.mark.parametrize("nproc, layout", [(2, ["--parallel.sp_ulysses=2"]), (2, ["--parallel.engine=ddp"]), (1, [])], ids=["ulysses2", "ddp2", "single"])
def test_resume_on_another_layout(saved, nproc, layout):
    root, args, before = saved
    out = root / f"load{nproc}{len(layout)}.pt"
    worker(nproc, "load", out, args + layout)
    after = torch.load(out, weights_only=False)
    assert after["step"] == before["step"] == 3
    assert set(after["state"]) == set(before["state"])
    assert any(k.startswith("optim.") for k in before["state"]) and any(k.startswith("ema.") for k in before["state"])
    for key, value in before["state"].items():
        torch.testing.assert_close(after["state"][key], value, rtol=0, atol=0, msg=key)
    trained = [p for positions in before["trained"].values() for p in positions]
    rest = [p for positions in after["rest"].values() for p in positions]
    assert len(trained) == len(set(trained)) > 0 and len(rest) == len(set(rest))  # no repeats on either side
    assert not set(trained) & set(rest)
    assert sorted(trained + rest) == list(range(96))  # the synthetic set: every sample exactly once


def deepspeed_round_trip(tmp_path, args) -> None:
    """Save and resume on 2 ranks (every DeepSpeed file read weights-only); the model must match."""
    worker(2, "save", tmp_path / "save.pt", args)
    worker(2, "load", tmp_path / "load.pt", args)
    before, after = torch.load(tmp_path / "save.pt", weights_only=False), torch.load(tmp_path / "load.pt", weights_only=False)
    for key, value in before["state"].items():
        if key.startswith("model."):
            torch.testing.assert_close(after["state"][key], value, rtol=0, atol=0, msg=key)


def test_deepspeed_zero3_resumes_exactly(synthetic_dir, tmp_path):
    deepspeed_round_trip(tmp_path, overrides(synthetic_dir, tmp_path / "run") + ["--parallel.engine=deepspeed", "--parallel.zero_stage=3", "--optim.ema_decay=0"])


def test_deepspeed_resumes_on_its_world_size_and_refuses_another(synthetic_dir, tmp_path):
    args = overrides(synthetic_dir, tmp_path / "run") + ["--parallel.engine=deepspeed", "--parallel.zero_stage=2"]
    deepspeed_round_trip(tmp_path, args)
    refused = worker(4, "load", tmp_path / "load4.pt", args, expect_ok=False)
    assert refused.returncode != 0
    assert "saved by DeepSpeed on 2 ranks; this run has 4" in refused.stderr + refused.stdout
