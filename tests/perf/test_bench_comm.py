"""bench-comm: nccl-tests' bandwidth definitions, and every mesh dimension of a layout measured
under torchrun on 2 and 4 gloo ranks."""

import json
import re
from pathlib import Path

import pytest

from sora_dist.perf.bench_comm import bus_factor, message_sizes, parse_bytes
from warm_ranks import run_ranks

SKEW_WORKER = Path(__file__).with_name("skew_worker.py")


def test_bus_bandwidth_factors_are_nccl_tests_definitions():
    # nccl-tests doc/PERFORMANCE.md: allreduce 2(n-1)/n; allgather, reducescatter, alltoall (n-1)/n; sendrecv 1.
    assert bus_factor("all_reduce", 8) == pytest.approx(1.75)
    assert bus_factor("all_reduce", 2) == pytest.approx(1.0) == bus_factor("all_reduce_functional", 2)
    for op in ("all_gather", "reduce_scatter", "all_to_all"):
        assert bus_factor(op, 4) == pytest.approx(0.75)
    assert bus_factor("send_recv", 16) == 1.0
    with pytest.raises(ValueError, match="unknown collective"):
        bus_factor("broadcast", 2)


def test_sizes_climb_by_four_from_1k_and_parse_human_units():
    assert message_sizes(1024, 64 * 1024) == [1024, 4096, 16384, 65536]
    assert parse_bytes("256M") == 256 * 1024**2 and parse_bytes("1GiB") == 1024**3 and parse_bytes("4096") == 4096


def run_bench(tmp_path, nproc: int, layout: list[str]) -> dict:
    out = tmp_path / f"comm{nproc}.json"
    result = run_ranks(nproc, ["-m", "sora_dist.perf.bench_comm", "--max-bytes", "16K", "--iters", "2", "--warmup", "1", "--skew-bursts-ms", "5", "10",
                               "--skew-rounds", "1", "--json", str(out), *layout], timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "busbw" in result.stdout and "rank skew" in result.stdout  # the table
    return json.loads(out.read_text())


@pytest.mark.parametrize("nproc, layout, dims", [
    (2, ["--after-compute-ms", "5"], {"dp_shard": 2}),
    (4, ["--parallel.tp=2", "--parallel.sp_ring=2"], {"sp_ring": 2, "tp": 2}),
    (4, ["--parallel.dp_replicate=2", "--parallel.sp_ulysses=2"], {"dp_replicate": 2, "sp_ulysses": 2}),
])
def test_every_mesh_dimension_of_a_layout_is_measured(tmp_path, nproc, layout, dims):
    r = run_bench(tmp_path, nproc, layout)
    assert r["backend"] == "gloo" and r["world_size"] == nproc and r["date"] and r["device"] == "cpu"
    assert r["after_compute_ms"] == (5.0 if "--after-compute-ms" in layout else 0.0)
    rows = r["rows"]
    assert {row["dim"]: row["group_size"] for row in rows} == dims
    for dim in dims:
        expected_ops = {"all_gather", "reduce_scatter", "all_reduce", "all_to_all"} | {"sp_ring": {"send_recv"}, "tp": {"all_reduce_functional"}}.get(dim, set())
        assert {row["op"] for row in rows if row["dim"] == dim} == expected_ops
    assert sorted({row["bytes"] for row in rows}) == [1024, 4096, 16384]
    assert [s["burst_ms"] for s in r["skew"]] == [5.0, 10.0] and all(s["delay_us"] >= 0 and s["wait_us"] >= 0 for s in r["skew"])
    for row in rows:
        algbw = row["bytes"] / (row["time_us"] * 1e-6)
        assert row["algbw_gbps"] == pytest.approx(algbw / 1e9)
        assert row["busbw_gbps"] == pytest.approx(algbw * bus_factor(row["op"], row["group_size"]) / 1e9)


@pytest.mark.parametrize("extra_ms, late, delay_ms", [(0.0, "alternating", 0.0), (40.0, "alternating", 20.0), (40.0, "persistent", 0.0)])
def test_rank_skew_is_the_delay_a_late_rank_adds_to_every_burst(tmp_path, extra_ms, late, delay_ms):
    # Bursts that sleep 10 ms, one rank's for 40 ms more. Ranks late in turn: with an all-reduce
    # after every burst the pair takes 50 ms a burst, against 30 ms when they never meet (each
    # rank is late at half the bursts), so the delay is 20 ms. Rank 1 late every time: it needs
    # 50 ms a burst either way, so the delay is 0; that is a slow rank, not skew. Either way the
    # rank on time waits 40 ms at every burst and the other none, a mean wait of 20 ms.
    result = run_ranks(2, [str(SKEW_WORKER), str(tmp_path / "skew"), str(extra_ms), late], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads((tmp_path / "skew.json").read_text())
    assert measured["delay_ms"] == pytest.approx(delay_ms, abs=6.0)
    assert measured["wait_ms"] == pytest.approx(extra_ms / 2, abs=6.0)


def test_the_ulysses_wait_probe_times_every_all_to_all_of_a_step_on_every_rank():
    # A 1-block model: 4 all-to-alls in the self-attention's forward (q, k, v in, output back) and
    # 4 in its backward, as the performance model counts them.
    probe = Path(__file__).resolve().parents[2] / "scripts" / "probe_ulysses_waits.py"
    result = run_ranks(2, [str(probe), "--preset", "debug", "--model.hidden_size=64", "--model.depth=1", "--model.num_heads=4", "--latent", "2", "8", "8",
                           "--batch", "2", "--steps", "2", "--warmup", "1", "--parallel.sp_ulysses=2"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # Each rank's report is one write, though it may land inside a line rank 0's table is printing.
    reports = re.findall(r"rank (\d): (\d+) all-to-alls a step; per all-to-all: waiting for the peers median [\d.]+ ms", result.stdout)
    assert sorted(reports) == [("0", "8"), ("1", "8")]
