"""At the end of a run the whole weights are gathered to rank 0's CPU one tensor at a time; the
other ranks hold nothing (on 3B/7B models a whole copy per accelerator would not fit)."""

import json
from pathlib import Path

import pytest
from warm_ranks import run_ranks

WORKER = Path(__file__).with_name("weights_worker.py")


@pytest.mark.parametrize("layout", [[], ["--parallel.tp=2"]], ids=["fsdp2", "tp2"])
def test_whole_weights_land_on_rank0_cpu_only(tmp_path, layout):
    result = run_ranks(2, [str(WORKER), str(tmp_path / "r"), *layout], timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"r.{r}.json").read_text()) for r in (0, 1))
    assert rank0["gathered"] and not rank1["gathered"]
    assert rank0["devices"] == ["cpu"] and rank0["keys_match"] and rank0["max_error"] == 0.0
    assert rank0["local_is_sharded"]  # the check is about sharded weights, not a replicated copy
