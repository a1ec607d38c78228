"""Ring attention on 2 and 4 gloo ranks, on each CPU-runnable block backend, against
single-process attention over the full sequence: output and dq/dk/dv (zero on padding)."""

import json
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("ring_worker.py")
sys.path.insert(0, str(WORKER.parent))
from ring_worker import BACKENDS, TOKENS  # noqa: E402
from warm_ranks import run_ranks

TOLERANCE = {"float64": 1e-10, "float32": 1e-5, "bfloat16": 0.1}  # bf16 holds ~3 significant digits

_RESULTS: dict[int, dict] = {}


def results_for(world_size: int, tmp_path_factory) -> dict:
    if world_size not in _RESULTS:
        out = tmp_path_factory.mktemp(f"ring{world_size}") / "results.json"
        result = run_ranks(world_size, [str(WORKER), str(out)], timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        _RESULTS[world_size] = json.loads(out.read_text())
    return _RESULTS[world_size]


CASES = [f"{b}-{n}-{d}" for b in BACKENDS for n in TOKENS for d in ("float64", "float32")] + ["sdpa-21-bfloat16"]


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("case", CASES)
def test_ring_matches_full_attention(world_size, case, tmp_path_factory):
    error = results_for(world_size, tmp_path_factory)[case]
    dtype = case.rsplit("-", 1)[1]
    tolerance = 1e-5 if case.startswith("npu") and dtype == "float64" else TOLERANCE[dtype]  # NPU statistics are float32
    assert error < tolerance, f"{case} on {world_size} ranks: max error {error:.3g}"
