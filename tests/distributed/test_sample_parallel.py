"""Distributed sampling equals single-device sampling: every sampling layout on 2 and 4 gloo
ranks (sample_worker.py). tests/test_sample.py runs ``torchrun -m sora_dist.sample`` end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("sample_worker.py")
sys.path.insert(0, str(WORKER.parent))
from sample_worker import LAYOUTS  # noqa: E402
from warm_ranks import run_ranks

TOLERANCE = 1e-4  # fp32; a wrong split or a swapped guidance half is off by > 1e-2
_RESULTS: dict[int, dict] = {}


def torchrun(world_size: int, *args: str) -> subprocess.CompletedProcess:
    result = run_ranks(world_size, list(args), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def results_for(world_size: int, tmp_path_factory) -> dict:
    if world_size not in _RESULTS:
        out = tmp_path_factory.mktemp(f"sample{world_size}") / "results.json"
        torchrun(world_size, str(WORKER), str(out))
        _RESULTS[world_size] = json.loads(out.read_text())
    return _RESULTS[world_size]


@pytest.mark.parametrize("world_size, layout", [(w, name) for w, layouts in LAYOUTS.items() for name in layouts])
def test_sampling_layout_equals_single_device(world_size, layout, tmp_path_factory):
    error = results_for(world_size, tmp_path_factory)[layout]
    assert not isinstance(error, dict), f"{layout}: {error}"
    assert error < TOLERANCE, f"{layout}: relative difference {error:.3g}"
