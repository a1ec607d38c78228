import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sora_dist import trainer
from sora_dist.build import build_single_device_model, lr_factor
from sora_dist.cli import main
from sora_dist.config import load_config
from sora_dist.errors import ConfigError, TrainingError
from sora_dist.metrics import read_history

REPO = Path(__file__).parents[1]


def short_config(data_dir, out_dir, *extra):
    return load_config(
        REPO / "configs" / "demo.yaml",
        [
            f"--data.path={data_dir}", f"--train.out_dir={out_dir}", "--data.num_workers=0",
            "--model.hidden_size=64", "--model.depth=2", "--train.max_minutes=0", "--logging.tensorboard=false",
            "--optim.warmup_steps=5", "--logging.log_every=5", *extra,
        ],
    )


@pytest.fixture(scope="module")
def finished_run(synthetic_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = short_config(synthetic_dir, out, "--train.steps=60", "--train.sample_at_end=true", "--diffusion.sample_steps=4", "--train.sample_shape=[2,8,8]")
    return cfg, out, trainer.train(cfg)


def test_short_run_learns(finished_run):
    _, out, summary = finished_run
    history = read_history(out / "metrics.jsonl")
    assert len(history) == 12 and summary["steps"] == 60
    assert summary["last_loss"] < 0.5 * summary["first_loss"], summary
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and 0 <= r["data_wait_frac"] < 1 for r in history)
    assert {"loss", "grad_norm", "lr", "samples_per_s", "tokens_per_s", "data_wait_frac", "mem_peak_gib"} <= set(history[0])


def test_run_folder_holds_config_weights_and_pictures(finished_run):
    cfg, out, _ = finished_run
    saved = load_config(out / "config.yaml")
    assert saved.model.in_channels == 4 and saved.model.text_dim == 32  # resolved from the manifest
    assert saved.model.hidden_size == 64 and saved.train.steps == 60
    model = build_single_device_model(saved, 4, 32, torch.device("cpu"))
    model.load_state_dict(load_file(out / "model.safetensors"))
    assert set(load_file(out / "ema.safetensors")) == set(model.state_dict())
    for picture in ("sample.png", "loss.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    measured = json.loads((out / "samples.json").read_text())  # the blobs' motion, measured on each sampled clip
    assert [row["application"] for row in measured] == ["text_to_video", "text_to_video", "image_to_video"]
    assert [row["captioned"] for row in measured[:2]] == ["right", "up"]
    assert all(set(row) == {"application", "prompt", "captioned", "direction", "speed"} for row in measured)


def test_sample_command_reads_a_finished_run(finished_run, tmp_path):
    _, out, _ = finished_run
    target = tmp_path / "clip"
    code = main(["sample", "--from", str(out), "--prompt", "a small blue blob moving left", "--samples", "1", "--out", str(target), "--diffusion.sample_steps=2"])
    assert code == 0 and (target / "frames.png").stat().st_size > 1000
    assert np.load(target / "latents.npy").shape[:2] == (1, 4)


def test_non_finite_loss_stops_with_a_diagnosis(synthetic_dir, tmp_path, monkeypatch):
    class Exploding:
        def loss(self, model, x0, text, mask, generator=None):
            return model(x0, torch.zeros(x0.shape[0]), text, mask).mean(dim=(1, 2, 3, 4)) * float("nan")

    monkeypatch.setattr(trainer, "build_objective", lambda *args: Exploding())
    with pytest.raises(TrainingError, match=r"non-finite training signal at step 1: loss nan.*lower optim.lr.*mixed_precision=fp32"):
        trainer.train(short_config(synthetic_dir, tmp_path, "--train.steps=3", "--train.sample_at_end=false"))


def test_layout_that_does_not_fit_the_world_is_refused(synthetic_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"world size 1 is not divisible by dp_replicate\*sp_ring\*sp_ulysses\*tp = 2"):
        trainer.train(short_config(synthetic_dir, tmp_path, "--train.steps=1", "--parallel.tp=2"))


def test_lr_schedule_warms_up_then_decays():
    factors = [lr_factor(s, warmup=10, total=110, schedule="cosine", min_ratio=0.1) for s in range(110)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert lr_factor(500, 10, 110, "constant", 0.1) == 1.0


def test_ema_averages_the_weights():
    model = torch.nn.Linear(2, 2)
    ema = trainer.EMA(model, decay=0.5)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=1000)  # decay warm-up over: min(0.5, 1001/1010) = 0.5
    torch.testing.assert_close(ema.shadow["weight"], start + 0.5)


def test_cli_reports_config_errors_cleanly(tmp_path, caplog):
    code = main(["train", "--config", str(REPO / "configs" / "demo.yaml"), "--optim.lrr=1"])
    assert code == 2
    assert "unknown config key 'optim.lrr'. Did you mean 'optim.lr'?" in caplog.text


def test_inspect_prints_manifest_and_histogram(synthetic_dir, capsys):
    assert main(["inspect", str(synthetic_dir)]) == 0
    out = capsys.readouterr().out
    manifest = json.loads((synthetic_dir / "manifest.json").read_text())
    assert "96 in 6 shards" in out
    for shape, count in manifest["shapes"].items():
        assert shape in out and str(count) in out


def test_torchrun_entry_point(synthetic_dir, tmp_path):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "-m", "sora_dist.train",
        "--config", str(REPO / "configs" / "demo.yaml"), f"--data.path={synthetic_dir}", f"--train.out_dir={tmp_path}",
        "--train.steps=3", "--train.sample_at_end=false", "--data.num_workers=0", "--logging.log_every=1", "--logging.tensorboard=false",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(read_history(tmp_path / "metrics.jsonl")) == 3


def test_the_demo_report_script_writes_the_published_figures_from_a_run(finished_run, tmp_path):
    spec = importlib.util.spec_from_file_location("demo_report", REPO / "scripts" / "demo_report.py")
    demo_report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo_report)
    _, out, summary = finished_run
    result = demo_report.report(out, wall_s=12.0)
    assert result["steps"] == summary["steps"] == 60 and len(result["samples"]) == 3
    text = demo_report.markdown(result)
    assert "| steps | 60 of 60" in text and "| wall time (`time`, install excluded) | 12 s |" in text
    assert text.count("| text-to-video |") == 2 and "| image-to-video |" in text
