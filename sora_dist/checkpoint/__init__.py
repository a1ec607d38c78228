"""Sharded checkpoints: the manager (save, resume, failures), what a checkpoint holds, and its
files on disk with their checksums (``files``)."""

from sora_dist.checkpoint.files import COMPLETE
from sora_dist.checkpoint.manager import (
    CheckpointManager, checkpoint_dir, finished_checkpoints, is_complete, newest_complete, saves_enabled, verify,
)
from sora_dist.checkpoint.state import TrainState, gather_to_rank0, load_weights_for_export, weight_reader

__all__ = [
    "COMPLETE", "CheckpointManager", "TrainState", "checkpoint_dir", "finished_checkpoints", "gather_to_rank0", "is_complete",
    "load_weights_for_export", "newest_complete", "saves_enabled", "verify", "weight_reader",
]
