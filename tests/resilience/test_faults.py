"""Faults injected into one rank of the real trainer on gloo: a stalled rank is caught by the step
watchdog on every rank (stacks and flight record dumped, named in the log, non-zero exit), a rank
on a shared core is named as a straggler, and the health check names a slow group and a rank that
never answers."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from sora_dist.errors import TrainingError
from sora_dist.resilience import health
from sora_dist.resilience.health import slow_groups
from sora_dist.resilience.stragglers import find_stragglers
from sora_dist.resilience.watchdog import HANG_EXIT_CODE, HangAlarm, StepWatchdog

import torch
from warm_ranks import run_ranks

REPO = Path(__file__).parents[2]
WORKER = Path(__file__).with_name("fault_worker.py")


def train_args(data_dir, out_dir, steps, *extra):
    return [
        "--config", str(REPO / "configs" / "demo.yaml"), f"--data.path={data_dir}", f"--train.out_dir={out_dir}",
        "--data.num_workers=0", "--model.hidden_size=64", "--model.depth=2", "--train.max_minutes=0",
        "--logging.tensorboard=false", "--optim.warmup_steps=2", f"--train.steps={steps}", "--train.sample_at_end=false",
        *extra,
    ]


def launch(nproc, fault, params, args, timeout=240, torchrun=False):
    """The fault worker on ``nproc`` ranks: warm ranks, or under torchrun where the test reads what
    torchrun's agent reports (a worker's exit code) or the hang alarm that travels through its store."""
    if not torchrun:
        return run_ranks(nproc, [str(WORKER), fault, *params, "--", *args], timeout=timeout)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "--max-restarts", "0",
           str(WORKER), fault, *params, "--", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_a_stalled_rank_makes_every_rank_dump_its_stacks_and_exit(synthetic_dir, tmp_path):
    args = train_args(synthetic_dir, tmp_path, 30, "--logging.log_every=5", "--fault.step_timeout_factor=4", "--fault.step_timeout_min_s=3")
    result = launch(2, "stall", ["1", "9"], args, torchrun=True)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"exitcode: {HANG_EXIT_CODE}" in output
    hangs = tmp_path / "hangs"
    stalled, waiting = (hangs / "rank-1.txt").read_text(), (hangs / "rank-0.txt").read_text()
    assert "step 9" in stalled and "phase forward and backward" in stalled
    assert "in forward" in stalled.split("Thread")[0] or "in forward" in stalled  # hung in the model's forward
    assert "distributed" in waiting  # rank 0 waits in a collective for rank 1
    assert "step watchdog: rank 1 on host" in output and "step watchdog: rank 0 on host" in output
    record = json.loads((hangs / "rank-0.fr.json").read_text())
    assert record["entries"], "the flight recorder kept rank 0's collectives"


def test_a_rank_that_stalls_in_a_save_is_caught_too(synthetic_dir, tmp_path):
    """A peer frozen during a save leaves the others waiting in the save's agreements: the save
    has its own limit (10x the median save, at least step_timeout_min_s), from the second save on."""
    args = train_args(synthetic_dir, tmp_path, 30, "--logging.log_every=5", "--fault.step_timeout_factor=10", "--fault.step_timeout_min_s=3",
                      "--checkpoint.every_steps=3")
    result = launch(2, "stall-save", ["1", "6"], args, torchrun=True)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and f"exitcode: {HANG_EXIT_CODE}" in output
    assert "step watchdog: rank 1 on host" in output and "step watchdog: rank 0 on host" in output
    assert "phase checkpoint save" in (tmp_path / "hangs" / "rank-1.txt").read_text()
    assert "step 6" in (tmp_path / "hangs" / "rank-0.txt").read_text()


def test_a_rank_whose_limit_is_not_reached_reports_on_the_alarm_of_the_stalled_one(synthetic_dir, tmp_path):
    """Rank 0 waits in a collective with no limit of its own: rank 1's watchdog raises the job's
    alarm, and rank 0 writes its stacks from where it waits before either exits."""
    args = train_args(synthetic_dir, tmp_path, 30, "--logging.log_every=5", "--fault.step_timeout_factor=4", "--fault.step_timeout_min_s=3")
    result = launch(2, "stall-alarm", ["1", "9"], args, torchrun=True)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and f"exitcode: {HANG_EXIT_CODE}" in output
    told = next(line for line in output.splitlines() if "step watchdog: rank 0 on host" in line)
    assert "(rank 1's watchdog fired)" in told and "limit inf s" in told
    waiting = (tmp_path / "hangs" / "rank-0.txt").read_text()
    assert "step 9" in waiting and "distributed" in waiting  # rank 0's stacks, still in the collective
    assert "phase forward and backward" in (tmp_path / "hangs" / "rank-1.txt").read_text()
    assert "Connection closed by peer" not in output  # no rank lost its peer before reporting


def test_the_hang_alarm_names_its_rank_per_attempt_and_waits_for_every_report():
    store = torch.distributed.HashStore()
    alarm, restarted = HangAlarm(store, 2, attempt=0), HangAlarm(store, 2, attempt=1)
    assert alarm.raised_by() is None
    alarm.raise_by(1)
    assert alarm.raised_by() == 1 and restarted.raised_by() is None  # a restarted job starts clear
    alarm.reported(1)
    waited = time.monotonic()
    alarm.wait_for_reports(0.3)  # rank 0 never reports: the wait ends at its limit
    assert time.monotonic() - waited >= 0.3
    alarm.reported(0)
    waited = time.monotonic()
    alarm.wait_for_reports(30)
    assert time.monotonic() - waited < 5


def test_a_hang_alarm_whose_store_is_gone_lets_the_report_go_on():
    class GoneStore:
        def __getattr__(self, name):
            def fail(*args):
                raise torch.distributed.DistNetworkError("store host is gone")
            return fail

    alarm = HangAlarm(GoneStore(), 2, attempt=0)
    alarm.raise_by(1)
    alarm.reported(1)
    alarm.wait_for_reports(1)
    assert alarm.raised_by() is None


def test_the_watchdog_limit_is_absolute_relative_or_the_smaller():
    dog = StepWatchdog(Path("."), 0, timeout_s=100, factor=5, min_s=2)
    assert dog.limit_s() == 100  # too few steps for a median yet
    dog.recent.extend([1.0] * 10)
    assert dog.limit_s() == 5.0
    dog.recent.extend([0.1] * 50)
    assert dog.limit_s() == 2.0  # never below min_s
    assert StepWatchdog(Path("."), 0, 0, 0, 0).limit_s() == float("inf")


def test_a_save_is_watched_from_the_second_on_with_its_own_limit():
    dog = StepWatchdog(Path("."), 0, timeout_s=100, factor=5, min_s=2)
    assert dog.save_limit_s() == float("inf")  # the first save: nothing yet says how long one takes
    with dog.saving():
        assert dog._running()[2] == float("inf")
    dog.recent_saves[-1] = 8.0
    assert dog.save_limit_s() == 40.0  # the step's absolute limit does not cap a save
    dog.recent_saves.append(0.1)
    dog.recent_saves.append(0.1)
    assert dog.save_limit_s() == 2.0


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to give one rank a core of its own")
def test_a_rank_on_a_crowded_core_is_named_as_the_straggler(synthetic_dir, tmp_path):
    # A probe of many scheduler slices: a few ms fit inside one slice of the shared core and miss the hogs.
    args = train_args(synthetic_dir, tmp_path, 20, "--logging.log_every=5", "--fault.straggler_threshold=1.5", "--fault.probe_ms=60")
    result = launch(2, "slow", ["1"], args, torchrun=True)  # timing-sensitive: kept as measured under torchrun
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["rank_probe_ms"]) == 2 and len(r["rank_data_wait_s"]) == 2 for r in records)
    flagged = [r for r in records if any(s["rank"] == 1 and s["cause"] == "device" for s in r.get("stragglers", []))]
    assert len(flagged) >= len(records) // 2, [r["rank_probe_ms"] for r in records]
    assert not any(s["rank"] == 0 for r in records for s in r.get("stragglers", []))
    assert "straggler: rank 1 on host" in result.stderr


def test_straggler_rules_name_the_slow_device_and_the_slow_loader():
    hosts = ["h0", "h1", "h2", "h3"]
    found = find_stragglers([1.0, 1.0, 2.0, 1.1], [0.0] * 4, 1.0, hosts, 1.3)
    assert [(s.rank, s.host, s.cause) for s in found] == [(2, "h2", "device")]
    found = find_stragglers([1.0] * 4, [0.01, 0.01, 0.01, 0.6], 1.0, hosts, 1.3)
    assert [(s.rank, s.cause, round(s.slowdown, 2)) for s in found] == [(3, "data", 1.59)]
    assert find_stragglers([1.0, 1.1, 0.9, 1.0], [0.01] * 4, 1.0, hosts, 1.3) == []


def test_health_check_passes_a_healthy_layout_and_logs_each_group(synthetic_dir, tmp_path):
    args = train_args(synthetic_dir, tmp_path, 2, "--parallel.tp=2", "--logging.log_every=1")
    result = launch(4, "none", [], args)
    assert result.returncode == 0, [line for line in result.stderr.splitlines() if "health check" in line]
    for dim in ("dp_shard", "tp"):
        assert f"health check: {dim} (groups of 2) all_reduce" in result.stderr


def test_health_check_names_the_hosts_of_a_slow_group(synthetic_dir, tmp_path):
    args = train_args(synthetic_dir, tmp_path, 2, "--parallel.tp=2")
    result = launch(4, "slow-link", ["2,3"], args)  # ranks 2 and 3 form one tp group
    assert result.returncode != 0
    assert "health check: groups far below their peers" in result.stderr
    line = next(l for l in result.stderr.splitlines() if "far below their peers" in l)
    tp_part = line[line.index("tp all_reduce"):]
    assert "rank 2 (" in tp_part and "rank 3 (" in tp_part and "rank 0 (" not in tp_part.split(";")[0]


def test_health_check_names_a_rank_that_never_answers(synthetic_dir, tmp_path):
    args = train_args(synthetic_dir, tmp_path, 2, "--fault.health_timeout_s=3")
    result = launch(2, "absent", ["1"], args)
    assert result.returncode != 0
    assert "not every rank answered within fault.health_timeout_s=3 s: ranks [1] are missing" in result.stderr


def test_slow_group_rule_compares_groups_of_one_dimension():
    pairs = [("tp", "all_reduce"), ("dp_shard", "all_reduce")]
    busbw = torch.tensor([[10.0, 5.0], [10.0, 5.0], [3.0, 5.0], [3.0, 5.0], [10.0, 5.0], [10.0, 5.0]])
    problems = slow_groups(pairs, busbw, [f"h{r}" for r in range(6)], 0.5)
    assert len(problems) == 1 and problems[0].startswith("tp all_reduce: rank 2 (h2, 3.00 GB/s), rank 3 (h3")


@pytest.mark.parametrize("passes,fails", [(["slow", "fine"], False), (["slow", "slow", "fine"], False), (["slow"] * 3, True)])
def test_a_group_slow_in_one_pass_is_timed_again_and_fails_only_if_slow_in_every_pass(monkeypatch, passes, fails):
    pairs = [("tp", "all_reduce")]
    tables = {"slow": torch.tensor([[10.0], [10.0], [1.0], [1.0]]), "fine": torch.tensor([[10.0], [10.0], [9.0], [9.0]])}
    measured = iter(passes)
    monkeypatch.setattr(health, "measure_groups", lambda *args: (pairs, tables[next(measured)]))
    dev, dims, hosts = SimpleNamespace(kind="cuda"), SimpleNamespace(tp=2), [f"h{r}" for r in range(4)]
    if fails:
        with pytest.raises(TrainingError, match="tp all_reduce: rank 2"):
            health.check_links(None, dims, dev, 1, 0.5, hosts)
    else:
        assert health.check_links(None, dims, dev, 1, 0.5, hosts)["tp"]["all_reduce"] >= 9.0
    assert next(measured, None) is None  # every pass was used, none more
