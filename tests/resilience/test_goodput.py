"""Goodput accounting across attempts: lost work is the step time after the checkpoint a restart
resumed from, recovery is the gap between attempts, and the categories add up to the wall time."""

import pytest

from sora_dist.resilience.goodput import GoodputLedger, format_summary, read_attempts, summarize


def attempt(n, started, updated, startup, step, wait, ckpt, banked, resumed, last):
    return {"attempt": n, "started_at": started, "updated_at": updated, "resumed_from_step": resumed, "last_step": last,
            "seconds": {"startup": startup, "step": step, "data_wait": wait, "checkpoint": ckpt}, "banked": banked}


def test_lost_work_recovery_and_goodput_of_a_restarted_run():
    first = attempt(0, 0.0, 100.0, 10.0, 80.0, 5.0, 5.0, {"10": 40.0, "20": 70.0}, 0, 24)
    second = attempt(1, 130.0, 200.0, 10.0, 55.0, 3.0, 2.0, {"30": 20.0}, 20, 40)
    summary = summarize([first, second])
    seconds = summary["seconds"]
    assert seconds["lost"] == pytest.approx(10.0)  # 80 s of steps, 70 s banked at step 20
    assert seconds["recovery"] == pytest.approx(30.0)
    assert summary["productive_s"] == pytest.approx(80.0 + 55.0 - 10.0)
    assert summary["goodput"] == pytest.approx(125.0 / 200.0)
    assert summary["steps_lost"] == [4]
    parts = summary["productive_s"] + sum(seconds[k] for k in ("lost", "data_wait", "checkpoint", "startup", "recovery", "other"))
    assert parts == pytest.approx(summary["wall_s"])
    assert "goodput 62.5%" in format_summary(summary)


def test_a_resume_from_an_older_checkpoint_loses_everything_after_it():
    first = attempt(0, 0.0, 50.0, 5.0, 40.0, 0.0, 1.0, {"10": 20.0, "20": 38.0}, 0, 22)
    second = attempt(1, 60.0, 90.0, 5.0, 25.0, 0.0, 0.0, {}, 10, 30)  # step-20 was broken: resumed at 10
    assert summarize([first, second])["seconds"]["lost"] == pytest.approx(20.0)


def test_ledger_records_attempts_and_a_fresh_run_replaces_them(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    ledger = GoodputLedger(tmp_path, enabled=True)
    ledger.started_training(0)
    ledger.add("step", 2.0)
    ledger.checkpointed(5)
    assert [a["banked"] for a in read_attempts(tmp_path / "goodput")] == [{"5": 2.0}]
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    restarted = GoodputLedger(tmp_path, enabled=True)
    restarted.started_training(5)
    assert [a["attempt"] for a in read_attempts(tmp_path / "goodput")] == [0, 1]
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    fresh = GoodputLedger(tmp_path, enabled=True)
    fresh.started_training(0)  # a new run in the same folder, not a restart
    assert [a["attempt"] for a in read_attempts(tmp_path / "goodput")] == [0]
