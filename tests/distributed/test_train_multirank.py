"""The real trainer under torchrun on gloo. Layouts with one data-parallel rank (TP, Ulysses,
ring and their products) stream the same batches and draw the same noise as a single process,
so their loss curves must match it step by step; data-parallel layouts must train and write
weights a single-device model loads."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sora_dist.config import load_config
from sora_dist.build import build_single_device_model
from warm_ranks import run_ranks

REPO = Path(__file__).parents[2]
STEPS = 5


def common(data_dir, out_dir):
    return [
        "--config", str(REPO / "configs" / "demo.yaml"), f"--data.path={data_dir}", f"--train.out_dir={out_dir}",
        "--data.num_workers=0", "--model.hidden_size=64", "--model.depth=2", "--train.max_minutes=0",
        "--logging.tensorboard=false", "--optim.warmup_steps=2", "--logging.log_every=1", f"--train.steps={STEPS}",
        "--train.sample_at_end=false",
    ]


def run(args, nproc, timeout=300):
    if nproc == 1:
        cmd = [sys.executable, "-m", "sora_dist.cli", "train", *args]
    else:
        return _ok(run_ranks(nproc, ["-m", "sora_dist.train", *args], timeout=timeout))
    return _ok(subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"}))


def _ok(result):
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def losses(out_dir):
    return [json.loads(line)["loss"] for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single_losses(synthetic_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    run(common(synthetic_dir, out), 1)
    return losses(out)


@pytest.mark.parametrize(
    "nproc, layout",
    [
        (2, ["--parallel.sp_ulysses=2"]),
        (2, ["--parallel.sp_ring=2"]),
        (2, ["--parallel.tp=2"]),
        (4, ["--parallel.tp=2", "--parallel.sp_ulysses=2"]),
        (4, ["--parallel.tp=2", "--parallel.sp_ring=2"]),
    ],
    ids=["ulysses2", "ring2", "tp2", "tp2_ulysses2", "tp2_ring2"],
)
def test_model_parallel_training_follows_single_process(synthetic_dir, tmp_path, single_losses, nproc, layout):
    result = run(common(synthetic_dir, tmp_path) + layout, nproc)
    assert "layout dp_replicate=1 x dp_shard=1" in result.stderr  # the start-up line names the layout
    assert losses(tmp_path) == pytest.approx(single_losses, rel=1e-4)


@pytest.mark.parametrize(
    "layout",
    [["--parallel.sp_ulysses=2"], ["--parallel.engine=ddp"], ["--parallel.engine=deepspeed", "--parallel.zero_stage=2", "--parallel.sp_ulysses=2"]],
    ids=["fsdp2_ulysses2", "ddp4", "zero2_ulysses2"],
)
def test_data_parallel_training_learns_and_saves_whole_weights(synthetic_dir, tmp_path, single_losses, layout):
    result = run(common(synthetic_dir, tmp_path) + layout + ["--train.steps=12"], 4)
    history = losses(tmp_path)
    assert len(history) == 12 and history[-1] < history[0]
    assert "optimizer state" in result.stderr and "per rank" in result.stderr
    cfg = load_config(tmp_path / "config.yaml")
    model = build_single_device_model(cfg, 4, 32, torch.device("cpu"))
    model.load_state_dict(load_file(tmp_path / "model.safetensors"))  # strict: every weight, unsharded


def test_async_checkpoints_on_two_ranks_complete_and_resume(synthetic_dir, tmp_path):
    """An async save finishes from a background thread while training runs collectives: it must
    use its own process group (a shared gloo group aborts with a collective mismatch)."""
    args = common(synthetic_dir, tmp_path) + ["--checkpoint.every_steps=2", "--checkpoint.async_save=true", "--checkpoint.resume=auto"]
    run(args, 2)
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "latest").read_text() == f"step-{STEPS}"
    assert all((checkpoints / name / "COMPLETE").is_file() for name in ("step-4", f"step-{STEPS}"))
    result = run([*args[:-1], "--checkpoint.resume=auto", f"--train.steps={STEPS + 2}"], 2)
    assert f"resumed from {checkpoints / f'step-{STEPS}'} at step {STEPS}" in result.stderr
    assert sorted(json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines())[-2:] == [STEPS + 1, STEPS + 2]


def test_sigterm_to_torchrun_leaves_a_complete_checkpoint(synthetic_dir, tmp_path):
    """torchrun (like SLURM) signals every process, DataLoader workers included: the workers must
    leave the signal to the trainer, which finishes its step, saves and exits."""
    import signal
    import time

    from sora_dist.checkpoint import is_complete

    args = common(synthetic_dir, tmp_path) + ["--train.steps=100000", "--data.num_workers=1", "--parallel.sp_ulysses=2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "sora_dist.train", *args]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert process.poll() is None and time.time() < deadline, process.stdout.read()[-3000:]
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert "stop signal received: saving a checkpoint" in output, output[-3000:]
    latest = tmp_path / "checkpoints" / (tmp_path / "checkpoints" / "latest").read_text()
    assert is_complete(latest) == (True, "")


def test_bf16_mixed_precision_follows_fp32(synthetic_dir, tmp_path, single_losses):
    """bf16 autocast with FSDP2's bf16-parameter / fp32-reduction policy on 2 ranks: same curve
    as fp32 within bf16 rounding."""
    result = run(common(synthetic_dir, tmp_path) + ["--train.mixed_precision=bf16", "--parallel.sp_ulysses=2"], 2)
    assert "precision torch.bfloat16" in result.stderr
    assert losses(tmp_path) == pytest.approx(single_losses, rel=2e-2)


def test_fsdp_policy_casts_parameters_and_reduces_in_fp32(tmp_path):
    """Inside forward the sharded weights arrive as bf16; the gradients that stay are fp32."""
    script = tmp_path / "policy.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "from sora_dist.build import stop_distributed\n"
        "from sora_dist.console import exit_process\n"
        "from sora_dist.config import ParallelConfig\n"
        "from sora_dist.models import DiTConfig, VideoDiT\n"
        "from sora_dist.parallel import apply_fsdp, build_mesh, resolve_dims\n"
        "dist.init_process_group('gloo')\n"
        "cfg = DiTConfig(in_channels=4, text_dim=8, hidden_size=32, depth=2, num_heads=2)\n"
        "dims = resolve_dims(ParallelConfig(), 2, cfg)\n"
        "model = VideoDiT(cfg)\n"
        "seen = []\n"
        "model.blocks[0].mlp.fc1.register_forward_pre_hook(lambda m, a: seen.append(m.weight.dtype))\n"
        "apply_fsdp(model, build_mesh(dims, 'cpu'), dims, torch.bfloat16, True)\n"
        "x = torch.randn(1, 4, 1, 4, 4)\n"
        "out = model(x, torch.ones(1), torch.randn(1, 3, 8), torch.ones(1, 3, dtype=torch.bool))\n"
        "out.float().square().mean().backward()\n"
        "assert seen == [torch.bfloat16], seen\n"
        "assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())\n"
        "stop_distributed()\n"
        "exit_process(0)  # FSDP still holds the group: its gloo threads must not outlive the interpreter\n"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
