"""What the command line tells a user before anything runs: every config key in ``train --help``,
the install command when an optional extra is missing, and a clear stop when SLURM starts the
trainer without torchrun."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sora_dist.build import check_launcher
from sora_dist.cli import main
from sora_dist.config import Config
from sora_dist.errors import ConfigError

REPO = Path(__file__).parents[1]


def test_train_help_lists_every_section_and_key(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for section, values in Config().to_dict().items():
        assert f"\n{section}:\n" in text
        for key in values:
            assert f"--{section}.{key}=" in text
    assert "--optim.lr=0.0001" in text and "Peak learning rate of AdamW." in text
    assert "sora_dist/config.py" in text


def test_missing_encode_extra_names_the_install_command(tmp_path, monkeypatch, caplog):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "av" else real(name, *a))
    code = main(["encode", "--input", str(tmp_path), "--out", str(tmp_path / "out"), "--vae", "x", "--text-encoder", "y"])
    assert code == 2
    assert "av is not installed; this command needs the [encode] extra: pip install -e '.[encode]'" in caplog.text


@pytest.mark.parametrize("environ, ok", [
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "2"}, False),
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "2"}, True),
    ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, True),
    ({}, True),
])
def test_slurm_without_torchrun_is_refused(environ, ok):
    if ok:
        check_launcher(environ)
    else:
        with pytest.raises(ConfigError, match=r"4 tasks but none was started by torchrun.*launch/slurm.sbatch"):
            check_launcher(environ)


def test_plain_srun_of_the_trainer_stops_before_training(tmp_path):
    """What `srun --ntasks=2 sora-dist train ...` would start: each task sees SLURM's variables only."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(SLURM_NTASKS="2", SLURM_PROCID="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "sora_dist.cli", "train", "--config", str(REPO / "configs" / "demo.yaml"), f"--train.out_dir={tmp_path}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2 and "none was started by torchrun" in result.stderr
    assert not (tmp_path / "metrics.jsonl").exists()
