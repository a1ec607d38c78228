"""Layouts that cannot work are rejected before any process group exists, with the fix."""

import pytest

from sora_dist.config import ParallelConfig
from sora_dist.errors import ConfigError
from sora_dist.models import DiTConfig
from sora_dist.parallel import resolve_dims

MODEL = DiTConfig(in_channels=4, text_dim=16, hidden_size=96, depth=2, num_heads=6, mlp_ratio=4.0)


def test_dp_shard_fills_the_world():
    dims = resolve_dims(ParallelConfig(tp=2, sp_ulysses=3), 24, MODEL)
    assert (dims.dp_replicate, dims.dp_shard, dims.sp, dims.tp, dims.dp) == (1, 4, 3, 2, 4)
    assert dims.world_size == 24 and "dp_shard=4" in dims.describe()


@pytest.mark.parametrize(
    "layout, world, message",
    [
        (dict(tp=2, dp_shard=3), 8, r"multiply to 6, but the world size is 8"),
        (dict(sp_ring=3), 8, r"world size 8 is not divisible by dp_replicate\*sp_ring\*sp_ulysses\*tp = 3"),
        (dict(tp=4), 4, r"model.num_heads=6 is not divisible by parallel.tp \* parallel.sp_ulysses = 4"),
        (dict(sp_ulysses=4), 4, r"num_heads=6 is not divisible .* = 4: each rank needs whole heads; .*sp_ring"),
        (dict(tp=2, sp_ulysses=2), 4, r"num_heads=6 is not divisible by parallel.tp \* parallel.sp_ulysses = 4"),
        (dict(engine="ddp", tp=2), 4, r"engine=ddp cannot combine with parallel.tp > 1"),
        (dict(engine="deepspeed", tp=2), 4, r"engine=deepspeed supports data parallel .* got tp=2"),
        (dict(engine="deepspeed", dp_replicate=2), 4, r"engine=deepspeed .* dp_replicate=2: use engine=fsdp"),
    ],
)
def test_impossible_layouts_name_the_fix(layout, world, message):
    with pytest.raises(ConfigError, match=message):
        resolve_dims(ParallelConfig(**layout), world, MODEL)


def test_mlp_width_must_split_over_tp():
    # Heads (and so the hidden size) divide by tp, but int(64 * 1.53) = 97 does not.
    model = DiTConfig(in_channels=4, text_dim=16, hidden_size=64, depth=2, num_heads=4, mlp_ratio=1.53)
    with pytest.raises(ConfigError, match=r"MLP hidden size=97 is not divisible by parallel.tp=4"):
        resolve_dims(ParallelConfig(tp=4), 4, model)
