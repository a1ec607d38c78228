"""What the command line tells a user before anything runs: every config key in ``train --help``,
the install command when an optional extra is missing, a clear stop when SLURM starts the
trainer without torchrun, and one line naming the fix, exit status 2 and no traceback for every
bad input of every command (an unknown preset, a missing file, a wrong type, an impossible size)."""

import argparse
import logging

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sora_dist.build import check_launcher
from sora_dist.cli import build_parser, main
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


NOPE = "/nonexistent/sora-dist-test"
# command -> (arguments, a fragment of the one line it must print); every kind of bad input the
# command takes: an unknown preset, a missing file, a value of the wrong type, an impossible size.
BAD_INPUTS = {
    "train": [(["--config", f"{NOPE}.yaml"], "does not exist: pass an existing YAML file"),
              (["--config", "configs/demo.yaml", "--model.preset=foo"], "model.preset='foo' is unknown: choose one of debug"),
              (["--config", "configs/demo.yaml", "--train.steps=abc"], "train.steps='abc' must be an integer"),
              (["--config", "configs/demo.yaml", "--model.num_heads=5"], "choose num_heads from"),
              (["--config", "configs/demo.yaml", "--model.preset=wan2.1-i2v-14b", f"--train.out_dir={NOPE}"], "this model reads CLIP image tokens")],
    "sample": [(["--from", NOPE, "--prompt", "x"], "does not exist"), (["--from", NOPE, "--frames", "abc"], "invalid int value: 'abc'")],
    "eval-blobs": [(["--from", NOPE], "does not exist"), (["--from", NOPE, "--per-direction", "x"], "invalid int value")],
    "export": [([NOPE, "--out", f"{NOPE}.safetensors"], "is not a complete, undamaged checkpoint")],
    "checkpoint verify": [([NOPE], "holds no step-N checkpoint: pass a checkpoint folder")],
    "make-synthetic": [(["--out", NOPE, "--samples", "abc"], "'abc' is not a whole number"), (["--out", NOPE, "--samples", "0"], "0 must be at least 1")],
    "encode": [(["--input", f"{NOPE}.jsonl", "--out", NOPE, "--vae", NOPE, "--text-encoder", NOPE], "must be a folder of videos/images or a .csv / .jsonl"),
               (["--input", NOPE, "--out", NOPE], "the following arguments are required: --vae, --text-encoder")],
    "curate": [([f"{NOPE}/*.mp4", "--out", f"{NOPE}.jsonl"], "no input files found in"), ([NOPE, "--out", f"{NOPE}.csv"], "must be a .jsonl file"),
               ([NOPE, "--out", f"{NOPE}.jsonl", "--min-seconds", "x"], "invalid float value: 'x'"),
               ([NOPE, "--out", f"{NOPE}.jsonl", "--min-seconds", "5", "--max-seconds", "1"], "need 0 < --min-seconds (5.0) <= --max-seconds (1.0)")],
    "caption": [([f"{NOPE}.jsonl", "--out", f"{NOPE}.out.jsonl", "--model", NOPE], "does not exist: pass the JSONL that sora-dist curate"),
                ([f"{NOPE}.jsonl", "--out", f"{NOPE}.out.jsonl", "--model", NOPE, "--frames", "0"], "0 must be at least 1"),
                ([f"{NOPE}.jsonl", "--out", f"{NOPE}.out.jsonl", "--model", NOPE, "--score-words", "beauty"], "--score-words beauty: known scores are")],
    "decode": [(["--data", NOPE, "--vae", NOPE, "--out", NOPE], "does not exist"), (["--data", NOPE, "--vae", NOPE, "--out", NOPE, "--num", "x"], "invalid int value")],
    "inspect": [([NOPE], "dataset folder /nonexistent/sora-dist-test does not exist")],
    "plot": [([NOPE, "--out", f"{NOPE}.png"], "metrics.jsonl does not exist: pass run folders")],
    "goodput": [([NOPE], "has no goodput records")],
    "fault-drill": [(["--out", NOPE, "--faults", "foo"], "unknown faults ['foo']"), (["--out", NOPE, "--repeat", "0"], "0 must be at least 1")],
    "bench-train": [(["--preset", "foo"], "model.preset='foo' is unknown"), (["--steps", "abc"], "'abc' is not a whole number"),
                    (["--latent", "0", "0", "0"], "0 must be at least 1")],
    "bench-kernels": [(["--json"], "argument --json: expected one argument"), (["--small", "extra"], "unrecognized arguments: extra")],
    "bench-checkpoint": [(["--preset", "foo"], "model.preset='foo' is unknown"), (["--steps", "0"], "0 must be at least 1")],
    "bench-import": [(["--depth", "0"], "0 must be at least 1"), (["--file-mib", "x"], "'x' is not a whole number")],
    "bench-wan": [(["--depth", "0"], "0 must be at least 1"), (["--dtype", "int8"], "invalid choice: 'int8'")],
    "bench-loader": [(["--profiles", "foo"], "unknown profiles ['foo']: choose from demo"), (["--profiles", "custom", "--data", NOPE], "does not exist"),
                     (["--profiles", "custom"], "the custom profile streams your dataset: give --data DIR"),
                     (["--workers", "abc"], "invalid int value: 'abc'"), (["--batches", "0"], "0 must be at least 1")],
    "bench-data": [(["--inputs", f"{NOPE}.mp4", "--repeat", "0"], "0 must be at least 1"), (["--workers", "x"], "invalid int value: 'x'")],
    "bench-comm": [(["--preset", "foo"], "model.preset='foo' is unknown"), (["--max-bytes", "lots"], "is not a size: write bytes or a size like"),
                   (["--max-bytes", "0"], "must be at least 1 byte")],
    "gpu-proof": [(["--out", NOPE, "--parts", "foo"], "invalid choice: 'foo'"), (["--out", NOPE, "--timeout", "x"], "invalid float value")],
    "calibrate": [(["--preset", "foo", "--out", NOPE], "model.preset='foo' is unknown"), (["--latent", "0", "0", "0", "--out", NOPE], "0 must be at least 1")],
    "plan": [(["--preset", "foo", "--latent", "4", "8", "8"], "model.preset='foo' is unknown"), (["--devices", "eight"], "'eight' is not a whole number"),
             (["--latent", "4", "8", "8", "--calibration", f"{NOPE}.json"], "does not exist: pass a file written by sora-dist calibrate"),
             (["--latent", "4", "8", "8", "--devices", "0"], "0 must be at least 1"), (["--latent", "4", "8", "8", "--accelerator", "tpu"], "unknown accelerator 'tpu'")],
    "bench-scaling": [(["--layouts", "2", "--preset", "foo"], "model.preset='foo' is unknown"), (["--layouts", "2", "--steps", "0"], "0 must be at least 1")],
    "scaling-report": [([f"{NOPE}.json"], "does not exist: pass a file written by sora-dist bench-train --json")],
}


def test_every_command_has_bad_input_cases():
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    commands = {"checkpoint verify" if name == "checkpoint" else name for name in subparsers.choices}
    assert set(BAD_INPUTS) == commands


@pytest.mark.parametrize("command,args,fragment", [pytest.param(c, a, f, id=f"{c.replace(' ', '-')}-{i}")
                                                   for c, cases in BAD_INPUTS.items() for i, (a, f) in enumerate(cases)])
def test_a_bad_input_gets_one_line_naming_the_fix_and_exit_2(command, args, fragment, capsys, caplog, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    caplog.set_level(logging.ERROR, logger="sora_dist")
    try:
        code = main([*command.split(), *args])  # a traceback would be an exception escaping here
    except SystemExit as stop:
        code = stop.code
    said = [line for line in capsys.readouterr().err.splitlines() if line.strip()] + [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert code == 2, said
    assert len(said) == 1 and fragment in said[0], said
