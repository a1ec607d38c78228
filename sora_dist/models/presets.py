"""Named model sizes. DiT-S/B/L/XL follow Peebles & Xie (2023); 1B, 3B and 7B are wider and
use 128-channel heads like current video DiTs. Parameter counts (with a 4096-wide T5 text
encoder and 4 latent channels) are checked by tests/models/test_counts.py."""

from __future__ import annotations

from sora_dist.config import ModelConfig
from sora_dist.models.dit import DiTConfig

PRESETS: dict[str, dict[str, int]] = {
    "debug": {"hidden_size": 64, "depth": 2, "num_heads": 4},
    "S": {"hidden_size": 384, "depth": 12, "num_heads": 6},
    "B": {"hidden_size": 768, "depth": 12, "num_heads": 12},
    "L": {"hidden_size": 1024, "depth": 24, "num_heads": 16},
    "XL": {"hidden_size": 1152, "depth": 28, "num_heads": 16},
    "1B": {"hidden_size": 1536, "depth": 20, "num_heads": 12},
    "3B": {"hidden_size": 2304, "depth": 26, "num_heads": 18},
    "7B": {"hidden_size": 3072, "depth": 34, "num_heads": 24},
}


def resolve_model_config(cfg: ModelConfig, in_channels: int, text_dim: int) -> DiTConfig:
    """Merge the preset, explicit overrides and the dataset's channel/text widths."""
    preset = PRESETS[cfg.preset]
    return DiTConfig(
        in_channels=cfg.in_channels or in_channels,
        text_dim=cfg.text_dim or text_dim,
        hidden_size=cfg.hidden_size or preset["hidden_size"],
        depth=cfg.depth or preset["depth"],
        num_heads=cfg.num_heads or preset["num_heads"],
        mlp_ratio=cfg.mlp_ratio,
        patch_size=tuple(cfg.patch_size),
        qk_norm=cfg.qk_norm,
        rope_theta=cfg.rope_theta,
    )
