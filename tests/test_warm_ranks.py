"""The warm rank launcher the multi-rank tests use (tests/warm_ranks.py) behaves as torchrun's
workers do: a gloo group over the ranks, torchrun's environment, a fresh interpreter's view of
its environment, and a failed rank stops the job with its exit code."""

import json
import subprocess
import sys
import textwrap
import time

import pytest
from warm_ranks import run_ranks

RANK_SCRIPT = """
import json, os, sys
import torch, torch.distributed as dist
dist.init_process_group("gloo")
total = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(total)
import planted
print(json.dumps({"rank": dist.get_rank(), "world": dist.get_world_size(), "local": os.environ["LOCAL_RANK"], "sum": total.item(),
                  "threads": torch.get_num_threads(), "planted": planted.VALUE, "argv": sys.argv[1:], "main": __name__}))
dist.destroy_process_group()
"""


def test_ranks_form_a_group_with_torchruns_environment(tmp_path):
    (tmp_path / "rank.py").write_text(RANK_SCRIPT)
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "planted.py").write_text("VALUE = 7\n")  # found through PYTHONPATH, as a new interpreter would
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path / "lib"), "OMP_NUM_THREADS": "1"}
    result = run_ranks(3, [str(tmp_path / "rank.py"), "a", "b"], env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["rank"], r["world"], r["local"]) for r in rows] == [(0, 3, "0"), (1, 3, "1"), (2, 3, "2")]
    assert {r["sum"] for r in rows} == {6.0} and {r["threads"] for r in rows} == {1} and {r["planted"] for r in rows} == {7}
    assert all(r["argv"] == ["a", "b"] and r["main"] == "__main__" for r in rows)


def test_a_failed_rank_stops_the_others_and_gives_its_exit_code(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(textwrap.dedent("""
        import os, sys, time
        if os.environ["RANK"] == "1":
            print("rank 1 fails", file=sys.stderr)
            sys.exit(3)
        time.sleep(120)
    """))
    start = time.monotonic()
    result = run_ranks(2, [str(script)], timeout=120, grace=2)
    assert result.returncode == 3 and "rank 1 fails" in result.stderr
    assert time.monotonic() - start < 30  # rank 0 was stopped, not waited for


def test_a_job_past_its_timeout_is_stopped_and_reported(tmp_path):
    script = tmp_path / "slow.py"
    script.write_text("import time\ntime.sleep(120)\n")
    with pytest.raises(subprocess.TimeoutExpired):
        run_ranks(2, [str(script)], timeout=1, grace=1)


def test_a_module_runs_as_main_with_its_arguments(tmp_path):
    result = run_ranks(1, ["-m", "sora_dist.cli", "--help"], timeout=60)
    plain = subprocess.run([sys.executable, "-m", "sora_dist.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == plain.returncode == 0 and result.stdout == plain.stdout
