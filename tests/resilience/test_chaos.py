"""The chaos suite in CI: every fault of the table injected into a real 2-rank training job on this
machine. Each is noticed; each job finishes by itself; at most one checkpoint interval is lost
(where the newest checkpoint is damaged, the job resumes from the one before: it loses that
interval and what was trained after the damaged save before the kill landed); the kept steps train every sample of epoch 0 exactly once (all but the corrupt one when a data
sample is corrupt); a job that resumed on its own layout ends at the undisturbed job's loss."""

import pytest

from sora_dist.resilience.chaos import DAMAGES, EVERY, FAULTS, SAMPLES, format_table, run_suite

RESTARTED = {"kill-node", "sigstop-rank", "nan-step", "truncated-shard", "garbled-metadata", "empty-metadata", "renamed-tensor",
             "flipped-bytes", "crafted-metadata"}
DAMAGED = set(DAMAGES)  # step-15 damaged, then rank 1 killed
OTHER_DATA = {"kill-node", "corrupt-data"}  # another world size or one sample fewer: another batch order


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("chaos")
    result = run_suite(out, list(FAULTS), jobs=2)  # two jobs at a time: the test checks outcomes, not recovery times
    print(format_table(result))
    return out, {row["fault"]: row for row in result["rows"]}


def test_the_table_has_every_fault(suite):
    assert set(suite[1]) == set(FAULTS)


@pytest.mark.parametrize("fault", [name for name in FAULTS if name != "none"])
def test_each_fault_is_noticed_and_survived_without_a_human(suite, fault):
    out, rows = suite
    row = rows[fault]
    assert row["finished"], row
    assert row["noticed_s"] is not None and row["noticed_s"] >= 0, row
    assert row["restarts"] == (1 if fault in RESTARTED else 0), row
    if fault in RESTARTED or fault == "disk-full":
        assert row["recovered_s"] is not None and row["recovered_s"] >= row["noticed_s"], row
    if fault in DAMAGED:
        assert row["resumed_from"] == [15 - EVERY], row  # the newest checkpoint that loads
        assert row["steps_lost"] <= 2 * EVERY, row
    else:
        assert row["steps_lost"] <= EVERY, row
    once = SAMPLES - (1 if fault == "corrupt-data" else 0)
    assert (row["epoch0_once"], row["epoch0_repeated"], row["epoch0_never"]) == (once, 0, SAMPLES - once), row
    if fault not in OTHER_DATA:
        assert row["loss_vs_reference"] == 0.0, row  # resumed exactly where it left off
    assert not row["crafted_code_ran"]


def test_a_killed_node_leaves_the_other_to_go_on_alone(suite):
    out, rows = suite
    assert rows["kill-node"]["world_sizes"] == [2, 1]
    log = (out / "kill-node" / "node-a.log").read_text()
    assert "layout changed since step-" in log and "world size 2 -> 1 (dp_shard 2 -> 1)" in log
    assert "torchrun restart 1" in log


def test_a_full_disk_costs_saves_and_no_steps(suite):
    out, rows = suite
    log = (out / "disk-full" / "job.log").read_text()
    failed = [line for line in log.splitlines() if "checkpoint step" in line and "failed in" in line and "rank0]" in line]
    assert 1 <= len(failed) and all("training goes on" in line for line in failed)
    assert rows["disk-full"]["how"].endswith(("(tmpfs)", "(seam)"))
