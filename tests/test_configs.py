"""The shipped cluster configs train what the docs claim: every one trains with the mask strategy
(the trainer's log names the given-frame cases), states its parallel, checkpoint and fault
settings, and its layout is the one ``sora-dist plan`` ranks first for the hardware its own
comment names (the plan command is read from the config)."""

import logging
import re
from pathlib import Path

import pytest
import yaml

from sora_dist import trainer
from sora_dist.config import load_config
from sora_dist.perf import plan

REPO = Path(__file__).parents[1]
CLUSTER_CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml") if p.name != "demo.yaml")
COMPARED = ("engine", "dp_replicate", "sp_ring", "sp_ulysses", "tp", "activation_checkpointing", "reshard_after_forward")


def plan_command(config: Path) -> list[str]:
    """The arguments of the `sora-dist plan` command in the config's parallel-section comment."""
    text = config.read_text()
    match = re.search(r"^ *# sora-dist plan (.+?)\n(?: *#   (.+?)\n)?", text, flags=re.M)
    assert match, f"{config.name} names no sora-dist plan command"
    return " ".join(part for part in match.groups() if part).split()


def test_there_are_cluster_configs():
    assert {p.name for p in CLUSTER_CONFIGS} >= {"dit_xl.yaml", "dit_1b.yaml", "dit_3b.yaml", "sora_10b_1080p.yaml"}


@pytest.mark.parametrize("config", CLUSTER_CONFIGS, ids=lambda p: p.stem)
def test_a_cluster_config_trains_every_application_and_states_its_settings(config):
    cfg = load_config(config, [])
    assert cfg.mask.enabled and cfg.mask.choices()["text_to_video"] < 0.8
    sections = yaml.safe_load(config.read_text())
    assert {"parallel", "checkpoint", "fault", "mask"} <= set(sections)


@pytest.mark.parametrize("config", CLUSTER_CONFIGS, ids=lambda p: p.stem)
def test_the_planner_ranks_the_config_layout_first(config, capsys):
    best = plan.run(plan.parse_args([*plan_command(config), "--top", "1"]))["layouts"][0]
    planned = load_config(config, best["overrides"]).parallel
    ours = load_config(config, []).parallel
    assert {k: getattr(ours, k) for k in COMPARED} == {k: getattr(planned, k) for k in COMPARED}, best["layout"]
    assert planned.dp_shard == -1 and ours.dp_shard == -1  # the planner's data-parallel degree fills the rest


def test_a_short_run_of_a_cluster_config_logs_its_given_frame_cases(synthetic_dir, tmp_path, caplog):
    cfg = load_config(REPO / "configs" / "dit_xl.yaml", [
        f"--data.path={synthetic_dir}", f"--train.out_dir={tmp_path}", "--data.num_workers=0", "--model.preset=debug",
        "--train.steps=2", "--train.sample_shape=[2,8,8]", "--logging.tensorboard=false", "--logging.log_every=1",
        "--checkpoint.async_save=false", "--parallel.device=cpu", "--optim.warmup_steps=1"])
    with caplog.at_level(logging.INFO, logger="sora_dist"):
        summary = trainer.train(cfg)
    assert summary["steps"] == 2
    assert ("mask strategy: text-to-video 70%, image-to-video 10%, extend forward 5%, extend backward 5%, connect 5%, "
            "random frames 5% of clips") in caplog.text
