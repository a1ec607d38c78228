"""Run by test_backends.py under torchrun: join a process group made with the given backend string,
then run the CPU-tensor collectives of the data position and the checkpoint manager. A GPU
cluster is emulated on CPU by giving gloo the role of nccl: ``cuda:gloo`` has no backend for CPU
tensors, exactly like plain ``nccl``."""

import sys
import tempfile
from pathlib import Path

import torch.distributed as dist

from sora_dist.build import stop_distributed
from sora_dist.checkpoint import CheckpointManager
from sora_dist.config import CheckpointConfig, DataConfig
from sora_dist.data import LatentLoader
from sora_dist.console import exit_process


def main():
    backend, data_dir = sys.argv[1], sys.argv[2]
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    loader = LatentLoader(DataConfig(path=data_dir, num_workers=0), (1, 2, 2), dp_rank=rank, dp_size=world)
    loader.mark_consumed(next(iter(loader)))
    state = loader.state_dict(dist.group.WORLD)
    manager = CheckpointManager(CheckpointConfig(every_minutes=60), Path(tempfile.mkdtemp()))
    manager.due(step=1)
    gathered = [None] * world
    dist.all_gather_object(gathered, rank)
    if rank == 0:
        print("consumed", int(sum(m.sum() for m in state["consumed"].values())), "ranks", gathered, flush=True)
    stop_distributed()


if __name__ == "__main__":
    exit_process(main())
