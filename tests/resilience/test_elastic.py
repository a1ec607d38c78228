"""Elastic recovery with no human action: two "nodes" (torchrun agents of launch/multi_node.sh
with NNODES=1:2) on localhost lose one node mid-run; the survivor re-forms alone, resumes from the
newest complete checkpoint on the smaller world and trains to the end. The samples of the steps
the run kept are each trained once; the steps after the checkpoint are lost and redone."""

import os

import pytest

from sora_dist.errors import ConfigError
from sora_dist.config import ParallelConfig
from sora_dist.resilience.drill import format_report, run_drill
from sora_dist.resilience.elastic import explain_layout_error

STEPS, KILL_AT, EVERY = 30, 12, 5


def test_a_killed_node_is_survived_by_the_other_alone(tmp_path):
    result = run_drill(tmp_path, steps=STEPS, kill_at_step=KILL_AT, every_steps=EVERY, timeout_s=240)
    print(format_report(result))
    assert result["world_sizes"] == [2, 1]
    assert result["final_step"] == STEPS
    # It resumed from the newest checkpoint before the kill, and lost only the steps since.
    assert result["resumed_from_step"] == [result["killed_after_step"] // EVERY * EVERY]
    assert 0 <= result["steps_lost"][0] < EVERY
    assert result["kept_samples"] == result["distinct_kept_samples"] > 0  # exactly once
    # Both data-parallel ranks redid the lost steps. The killed node may have finished its last step
    # (its all-reduce done, so the survivor finished it too) and died before writing that record.
    redone = [result["redone_step_records"].get(dp_rank, 0) for dp_rank in (0, 1)]
    assert max(redone) == result["steps_lost"][0] and min(redone) >= result["steps_lost"][0] - 1
    assert 0 < result["recovery_s"] < 120 and 0 < result["goodput"] < 1
    log = (tmp_path / "node-a.log").read_text()
    assert "layout changed since step-" in log and "world size 2 -> 1 (dp_shard 2 -> 1)" in log
    assert "torchrun restart 1" in log


def test_a_restart_whose_world_size_the_layout_cannot_take_says_why(monkeypatch):
    error = ConfigError("world size 3 is not divisible by dp_replicate*sp_ring*sp_ulysses*tp = 2")
    assert explain_layout_error(error, 3, ParallelConfig(tp=2)) is error  # a first launch: as it was
    monkeypatch.setitem(os.environ, "TORCHELASTIC_RESTART_COUNT", "1")
    explained = str(explain_layout_error(error, 3, ParallelConfig(tp=2)))
    assert "after torchrun restart 1" in explained and "the job has 3 ranks" in explained and "multiple of 2" in explained


@pytest.mark.parametrize("launcher", ["multi_node.sh", "slurm.sbatch"])
def test_launch_scripts_offer_an_elastic_node_range_and_restarts(launcher):
    from sora_dist.resilience.drill import REPO

    text = (REPO / "launch" / launcher).read_text()
    assert "--max-restarts" in text and ("--nnodes \"$NNODES\"" in text or "--nnodes $NNODES_MIN:$SLURM_JOB_NUM_NODES" in text)
