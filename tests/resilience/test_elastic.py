"""Elastic restarts: a restarted job sets up its process groups every time (torchrun's shared
rendezvous store is turned off by the launch scripts, and the trainer warns where it is on), a
world size the layout cannot take after a restart says why, and the launch scripts offer a node
range and restarts. (A killed node and a frozen rank are faults of the chaos suite, test_chaos.py.)"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sora_dist.config import ParallelConfig
from sora_dist.errors import ConfigError
from sora_dist.resilience.elastic import explain_layout_error, shared_store_warning

REPO = Path(__file__).parents[2]

# A job whose first attempt fails after its process groups are up: the restart must set them up again.
FAILS_ONCE = """
import os, sys, torch.distributed as dist
from sora_dist.build import stop_distributed
from sora_dist.console import exit_process
dist.init_process_group("gloo")
group = dist.new_group(backend="gloo")
dist.barrier(group=group)
if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
    sys.exit(3)
stop_distributed()
exit_process(0)  # `group` outlives the destroyed world: its gloo threads must not outlive the interpreter
"""


@pytest.mark.parametrize("trial", range(3))
def test_a_restart_sets_up_its_process_groups_with_a_fresh_store(tmp_path, trial):
    """Without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 the restarted workers read their peers' addresses
    from the attempt before and fail in most restarts here ("Gloo connectFullMesh failed ...
    Connection refused", or a hang); the launch scripts set it."""
    script = tmp_path / "fails_once.py"
    script.write_text(FAILS_ONCE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
                             str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_trainer_names_torchruns_shared_store_when_restarts_are_on(monkeypatch):
    monkeypatch.setitem(os.environ, "TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setitem(os.environ, "TORCHELASTIC_MAX_RESTARTS", "0")
    assert shared_store_warning() is None  # no restarts: nothing to go wrong
    monkeypatch.setitem(os.environ, "TORCHELASTIC_MAX_RESTARTS", "3")
    assert "set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in shared_store_warning()
    monkeypatch.setitem(os.environ, "TORCHELASTIC_USE_AGENT_STORE", "False")
    assert shared_store_warning() is None


def test_a_restart_whose_world_size_the_layout_cannot_take_says_why(monkeypatch):
    error = ConfigError("world size 3 is not divisible by dp_replicate*sp_ring*sp_ulysses*tp = 2")
    assert explain_layout_error(error, 3, ParallelConfig(tp=2)) is error  # a first launch: as it was
    monkeypatch.setitem(os.environ, "TORCHELASTIC_RESTART_COUNT", "1")
    explained = str(explain_layout_error(error, 3, ParallelConfig(tp=2)))
    assert "after torchrun restart 1" in explained and "the job has 3 ranks" in explained and "multiple of 2" in explained


@pytest.mark.parametrize("launcher", ["single_node.sh", "multi_node.sh", "slurm.sbatch"])
def test_launch_scripts_restart_with_a_fresh_rendezvous_store(launcher):
    text = (REPO / "launch" / launcher).read_text()
    assert "--max-restarts" in text and "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=" in text
    if launcher != "single_node.sh":
        assert "--nnodes \"$NNODES\"" in text or "--nnodes $NNODES_MIN:$SLURM_JOB_NUM_NODES" in text
