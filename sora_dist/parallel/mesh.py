"""Parallel degrees, their validation, and the one DeviceMesh.

Mesh dimensions, outermost first: dp_replicate, dp_shard, sp_ring, sp_ulysses, tp. TP is
innermost (fastest links), then Ulysses all-to-all, then ring, then data parallel. Flattened
sub-meshes serve the rest of the code:
  dp     (dp_replicate, dp_shard)                    data loading and random draws
  sp     (sp_ring, sp_ulysses)                       one sample's tokens
  fsdp   (dp_shard, sp_ring, sp_ulysses)             FSDP's shard dimension
  dp_sp  (dp_replicate, dp_shard, sp_ring, sp_ulysses)  gradient averaging of DDP / DeepSpeed, loss
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from sora_dist.config import ParallelConfig
from sora_dist.errors import ConfigError
from sora_dist.models import DiTConfig

MESH_DIMS = ("dp_replicate", "dp_shard", "sp_ring", "sp_ulysses", "tp")


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    sp_ring: int
    sp_ulysses: int
    tp: int
    engine: str

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def sp(self) -> int:
        return self.sp_ring * self.sp_ulysses

    @property
    def world_size(self) -> int:
        return self.dp * self.sp * self.tp

    @property
    def degrees(self) -> tuple[int, ...]:
        return tuple(getattr(self, name) for name in MESH_DIMS)

    def describe(self) -> str:
        return " x ".join(f"{name}={getattr(self, name)}" for name in MESH_DIMS) + f" ({self.engine})"


def resolve_dims(cfg: ParallelConfig, world_size: int, model: DiTConfig) -> ParallelDims:
    """Fill dp_shard=-1 and check that the layout can work, before any process group exists."""
    fixed = cfg.dp_replicate * cfg.sp_ring * cfg.sp_ulysses * cfg.tp
    dp_shard = cfg.dp_shard
    if dp_shard == -1:
        if world_size % fixed:
            raise ConfigError(
                f"world size {world_size} is not divisible by dp_replicate*sp_ring*sp_ulysses*tp = {fixed}: "
                f"change the parallel degrees or the number of processes"
            )
        dp_shard = world_size // fixed
    dims = ParallelDims(cfg.dp_replicate, dp_shard, cfg.sp_ring, cfg.sp_ulysses, cfg.tp, cfg.engine)
    if dims.world_size != world_size:
        raise ConfigError(
            f"parallel degrees {dict(zip(MESH_DIMS, dims.degrees))} multiply to {dims.world_size}, "
            f"but the world size is {world_size}: make them multiply to {world_size} (dp_shard=-1 fills the rest)"
        )
    heads_split = dims.tp * dims.sp_ulysses
    if model.num_heads % heads_split:
        raise ConfigError(
            f"model.num_heads={model.num_heads} is not divisible by parallel.tp * parallel.sp_ulysses = {heads_split}: "
            f"each rank needs whole heads; lower tp or sp_ulysses (use sp_ring for more sequence parallelism)"
        )
    for name, size in (("model.hidden_size", model.hidden_size), ("MLP hidden size", model.mlp_hidden)):
        if size % dims.tp:
            raise ConfigError(f"{name}={size} is not divisible by parallel.tp={dims.tp}: choose tp dividing it")
    if dims.engine == "ddp" and dims.tp > 1:
        raise ConfigError("parallel.engine=ddp cannot combine with parallel.tp > 1 (DDP does not handle DTensor parameters): use engine=fsdp")
    if dims.engine == "deepspeed" and (dims.tp > 1 or dims.dp_replicate > 1):
        raise ConfigError(
            f"parallel.engine=deepspeed supports data parallel (dp_shard) with sequence parallel only; "
            f"got tp={dims.tp}, dp_replicate={dims.dp_replicate}: use engine=fsdp for TP or HSDP"
        )
    return dims


class ParallelMesh:
    """The root DeviceMesh plus its flattened sub-meshes, kept here because slicing a flattened
    dimension back out of the root mesh is deprecated. ``mesh[name]`` returns either."""

    FLATTENED = {
        "dp": ("dp_replicate", "dp_shard"),
        "sp": ("sp_ring", "sp_ulysses"),
        "fsdp": ("dp_shard", "sp_ring", "sp_ulysses"),
        "dp_sp": ("dp_replicate", "dp_shard", "sp_ring", "sp_ulysses"),
    }

    def __init__(self, root: DeviceMesh):
        self.root = root
        self.flat = {name: root[dims]._flatten(name) for name, dims in self.FLATTENED.items()}

    def __getitem__(self, name: str) -> DeviceMesh:
        return self.flat[name] if name in self.flat else self.root[name]

    def hsdp(self) -> DeviceMesh:
        """2-D (dp_replicate, fsdp) mesh for HSDP: the one place a flattened dim is sliced from
        the root (FSDP2 needs both dims in one mesh), so its deprecation warning is silenced."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return self.root["dp_replicate", "fsdp"]


def build_mesh(dims: ParallelDims, device_type: str) -> ParallelMesh:
    """The world's DeviceMesh with the flattened sub-meshes named in the module docstring."""
    return ParallelMesh(init_device_mesh(device_type, dims.degrees, mesh_dim_names=MESH_DIMS))


def local_bytes(tensors) -> int:
    """Bytes of the local shards of parameters or optimizer states on this rank."""
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total
