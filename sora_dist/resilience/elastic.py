"""Restarts at another world size: what changed, and a clear stop when the layout cannot follow.

torchrun's elastic mode (``--nnodes MIN:MAX --max-restarts K``, see launch/) restarts the workers
after a failure on the nodes that are left (or that joined). The trainer then resolves its layout
for the new world size (``parallel.dp_shard: -1`` absorbs the change), resumes from the newest
complete checkpoint with the global data position, and logs here what changed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from sora_dist.config import ParallelConfig, load_config
from sora_dist.errors import ConfigError
from sora_dist.parallel.mesh import MESH_DIMS, resolve_dims


def restart_counts() -> tuple[int, int]:
    """How often torchrun has restarted these workers, and SLURM requeued this job (0, 0 at first)."""
    return tuple(int(os.environ.get(name, "0") or 0) for name in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))


def restart_context() -> str:
    """A phrase naming this restart (torchrun's or SLURM's count), or '' on a first launch."""
    torchrun, slurm = restart_counts()
    if torchrun:
        return f"torchrun restart {torchrun} (of --max-restarts {os.environ.get('TORCHELASTIC_MAX_RESTARTS', '?')})"
    return f"SLURM requeue {slurm}" if slurm else ""


def shared_store_warning() -> Optional[str]:
    """What to set when torchrun shares one rendezvous store with the workers of every attempt
    (its default): a restarted worker may read a peer's address from the attempt before and fail
    at process-group set-up (seen here in 4 of 5 restarts on torch 2.13). None when restarts are
    off or the store is not shared."""
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if not shared or int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) == 0:
        return None
    return ("torchrun shares its rendezvous store with every restart's workers, which can make a restart fail at process-group "
            "set-up (Gloo connectFullMesh ... Connection refused; NCCL alike): set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for "
            "torchrun, as launch/*.sh do")


def explain_layout_error(err: ConfigError, world_size: int, cfg: ParallelConfig) -> ConfigError:
    """After a restart, a layout error is about the new world size: say so, and how to avoid it."""
    context = restart_context()
    if not context:
        return err
    fixed = cfg.dp_replicate * cfg.sp_ring * cfg.sp_ulysses * cfg.tp
    return ConfigError(
        f"{err} [after {context}, the job has {world_size} ranks: the fixed degrees dp_replicate*sp_ring*sp_ulysses*tp = "
        f"{fixed} must divide every world size the elastic range allows; choose NNODES=MIN:MAX and NPROC so that "
        f"every node count times NPROC is a multiple of {fixed}]")


def layout_change(checkpoint: Path, dims, model_cfg) -> Optional[str]:
    """What differs between the layout that saved ``checkpoint`` and ``dims``, or None."""
    try:
        saved_world = json.loads((checkpoint / "rng.json").read_text())["world_size"]
        saved = resolve_dims(load_config(checkpoint / "config.yaml").parallel, saved_world, model_cfg)
    except (OSError, KeyError, ValueError, ConfigError):
        return None
    changes = [f"{name} {old} -> {new}" for name, old, new in zip(MESH_DIMS, saved.degrees, dims.degrees) if old != new]
    if saved_world == dims.world_size and not changes:
        return None
    return (f"layout changed since {checkpoint.name} was saved: world size {saved_world} -> {dims.world_size}"
            + (f" ({', '.join(changes)})" if changes else "")
            + f"; the global batch per step changes with the data-parallel degree ({saved.dp} -> {dims.dp} ranks)")
