"""Calibration, scaling sweeps and reports on the real commands: calibrate on 1 process, sweep two
layouts under torchrun, report predicted against measured; the link fit and days-to-train."""

import json
import os
import subprocess
import sys

import pytest

from sora_dist.perf.bench_comm import bus_factor
from sora_dist.perf.calibration import fit_latency_bandwidth, load_calibration
from sora_dist.perf.plan import main as plan_main
from sora_dist.perf.scaling import format_report, rankings

TINY = ["--preset", "debug", "--latent", "2", "8", "8"]


def sora_dist(*args: str, timeout: int = 600) -> str:
    result = subprocess.run([sys.executable, "-m", "sora_dist.cli", *args], capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def test_link_fit_recovers_latency_and_bandwidth():
    latency, busbw, n = 20e-6, 40e9, 4
    rows = [{"bytes": b, "time_us": (latency + b * bus_factor("all_gather", n) / busbw) * 1e6, "busbw_gbps": 0.0}
            for b in (1024, 65536, 4 * 1024**2, 64 * 1024**2)]
    fitted_latency, fitted_bw = fit_latency_bandwidth(rows, bus_factor("all_gather", n))
    assert fitted_latency == pytest.approx(latency, rel=0.01)  # the 1 KiB message is almost all latency
    assert fitted_bw == pytest.approx(busbw, rel=0.01)


def test_rank_skew_curves_are_averaged_per_world_size_and_interpolated(tmp_path):
    comm = {"local_world_size": 4, "degrees": {}, "rows": []}
    runs = {"a.json": (4, [(25.0, 5.0), (100.0, 30.0)]), "b.json": (4, [(25.0, 7.0), (100.0, 10.0)]), "c.json": (2, [(100.0, 1.0)])}
    for name, (world, waits) in runs.items():
        skew = [{"burst_ms": b, "delay_us": w * 1e3, "wait_us": 3 * w * 1e3} for b, w in waits]  # the model reads the delay
        (tmp_path / name).write_text(json.dumps({**comm, "world_size": world, "skew": skew}))
    cal = load_calibration([str(tmp_path / name) for name in runs])
    assert [pytest.approx(point) for point in cal.skew[4]] == [(0.025, 0.006), (0.1, 0.02)]  # ms -> s, mean of the two runs
    assert cal.skew_after(4, 0.025) == pytest.approx(0.006)
    assert cal.skew_after(4, 0.0625) == pytest.approx(0.013)  # halfway between the bursts
    assert cal.skew_after(4, 0.0125) == pytest.approx(0.003)  # from (0, 0)
    assert cal.skew_after(4, 0.4) == pytest.approx(0.08)  # in proportion beyond the longest burst
    assert cal.skew_after(2, 0.1) == pytest.approx(0.001) and cal.skew_after(3, 0.1) == pytest.approx(0.001)  # nearest world
    assert cal.skew_after(1, 0.1) == 0.0 and load_calibration([]).skew_after(4, 0.1) == 0.0


def test_calibrate_sweep_and_report_predict_measured_layouts(tmp_path):
    calib = tmp_path / "calib.json"
    out = sora_dist("calibrate", *TINY, "--batches", "1", "2", "--steps", "2", "--out", str(calib))
    assert "TFLOP/s" in out
    data = json.loads(calib.read_text())
    assert data["kind"] == "calibration" and data["flops_rate"] > 0 and data["memory_bw"] > 0 and data["fresh_write_bw"] > 0
    assert len(data["runs"]) == 2 and load_calibration([str(calib)]).flops_rate == data["flops_rate"]
    wrappers = data["wrapper_host_s_per_block"]  # measured on a 1-rank mesh, per block and step
    assert set(wrappers) == {"tp", "fsdp"} and all(0 <= s < 1 for s in wrappers.values())
    assert load_calibration([str(calib)]).wrapper_host_s == wrappers

    sweep = tmp_path / "sweep"
    out = sora_dist("bench-scaling", *TINY, "--global-batch", "2", "--steps", "2", "--warmup", "1", "--threads", "1", "--repeats", "2",
                    "--layouts", "1", "2:--parallel.engine=ddp", "--calibration", str(calib), "--out", str(sweep))
    assert "ETA" in out and "median |error|" in out
    report = json.loads((sweep / "report.json").read_text())
    assert [r["world_size"] for r in report["rows"]] == [1, 2]
    for row in report["rows"]:
        assert row["predicted_s"] > 0 and row["error"] == pytest.approx(row["predicted_s"] / row["measured_s"] - 1)
        assert len(row["measured_repeats_s"]) == 2 and row["measured_s"] == pytest.approx(sum(row["measured_repeats_s"]) / 2)
    assert report["rows"][1]["comm_s"]["ddp"] > 0  # the DDP all-reduce is in the prediction
    assert (sweep / "report.png").stat().st_size > 5_000

    again = sora_dist("scaling-report", *map(str, sorted(sweep.glob("run*.json"))), "--calibration", str(calib))
    assert "single device" in again and "dp_shard=2, ddp" in again


def test_plan_says_how_many_days_a_compute_budget_takes(capsys):
    args = ["--preset", "1B", "--latent", "16", "64", "64", "--devices", "64", "--accelerator", "h100", "--top", "1", "--json", ""]
    assert plan_main([*args, "--train-flops", "1e23"]) == 0
    days = float(capsys.readouterr().out.split("days to train on #1: ")[1].split()[0])
    assert plan_main([*args, "--train-flops", "2e23"]) == 0
    assert float(capsys.readouterr().out.split("days to train on #1: ")[1].split()[0]) == pytest.approx(2 * days, rel=0.01)


def _row(layout: str, predicted_ms: float, runs_ms: list[float]) -> dict:
    runs = [ms / 1e3 for ms in runs_ms]
    return {"world_size": 2, "layout": layout, "predicted_s": predicted_ms / 1e3, "measured_s": sorted(runs)[len(runs) // 2],
            "measured_repeats_s": runs, "error": 0.0, "compute_s": 0.0, "optimizer_s": 0.0, "comm_s": {}, "host_s": 0.0, "skew_s": 0.0}


def test_ranking_counts_only_orders_the_runs_settle_as_contradictions():
    rows = [_row("a", 100, [100, 101, 102]), _row("b", 110, [115, 109, 120]), _row("c", 120, [108, 112, 111]), _row("d", 130, [140, 141, 142])]
    order = rankings(rows)[2]
    assert order["predicted"] == ["a", "b", "c", "d"] and order["measured"] == ["a", "c", "b", "d"]
    assert order["contradictions"] == []  # b and c swapped, but their runs overlap (109-120 against 108-112)
    assert "differ only between layouts whose runs overlap" in format_report(rows)

    rows[2] = _row("c", 120, [104, 105, 106])  # now every run of c beats every run of b
    assert rankings(rows)[2]["contradictions"] == [["b", "c"]]
    assert "contradicted: c measured faster than b in every run" in format_report(rows)

    single = [_row("a", 100, [100]), _row("b", 110, [99])]  # one run each: any swap is a contradiction
    assert rankings(single)[2]["contradictions"] == [["a", "b"]]


def test_a_wan_plan_prints_the_published_figure_beside_its_prediction(capsys):
    from sora_dist.perf import plan

    plan.run(plan.parse_args(["--preset", "wan2.1-t2v-14b", "--devices", "128", "--devices-per-node", "8", "--accelerator", "h100",
                              "--latent", "24", "60", "104", "--text-len", "512", "--global-batch", "128", "--top", "1"]))
    out = capsys.readouterr().out
    assert "37440 tokens" in out and "325.8 TFLOP/s per device (NVIDIA Megatron-Bridge" in out and "TFLOP/s predicted" in out
    plan.run(plan.parse_args(["--preset", "wan2.1-t2v-14b", "--devices", "8", "--accelerator", "a100", "--latent", "21", "60", "104",
                              "--text-len", "512", "--top", "1"]))
    assert "published" not in capsys.readouterr().out  # only on the accelerator it was measured on
