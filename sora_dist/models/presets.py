"""Named model sizes. DiT-S/B/L/XL follow Peebles & Xie (2023); 1B, 3B and 7B are wider and
use 128-channel heads like current video DiTs. Parameter counts (with a 4096-wide T5 text
encoder and 4 latent channels) are checked by tests/models/test_counts.py.
``sora_dist.config.resolve_model_config`` turns a preset and the config's overrides into a
``DiTConfig``."""

from __future__ import annotations

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
