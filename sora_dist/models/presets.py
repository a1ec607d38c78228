"""Named models. DiT-S/B/L/XL follow Peebles & Xie (2023); 1B, 3B and 7B are wider and use
128-channel heads like current video DiTs. Parameter counts (with a 4096-wide T5 text encoder and
4 latent channels) are checked by tests/models/test_counts.py. The wan presets are the published
Wan 2.x transformers, whole: sizes, FFN width, latent channels, umT5's 4096-wide states and Wan's
options (diffusers' conversion script and the original wan/configs; each A14B expert is a 14B
transformer). Wan 2.1's image-to-video (I2V) and first-last-frame (FLF2V) 14B models read 36
channels (16 noisy latent, 4 frame mask, 16 given-frame latent), predict 16, and read 257 CLIP
ViT-H/14 image tokens (1280 wide) per image; FLF2V adds a position table over two images. ``sora_dist.config.resolve_model_config`` turns a preset and the
config's overrides into a ``DiTConfig``."""

from __future__ import annotations

from typing import Any

WAN_OPTIONS = {"qk_norm_scope": "all_heads", "modulation": "shared", "text_context": "padded", "text_len": 512, "text_dim": 4096}

PRESETS: dict[str, dict[str, Any]] = {
    "debug": {"hidden_size": 64, "depth": 2, "num_heads": 4},
    "S": {"hidden_size": 384, "depth": 12, "num_heads": 6},
    "B": {"hidden_size": 768, "depth": 12, "num_heads": 12},
    "L": {"hidden_size": 1024, "depth": 24, "num_heads": 16},
    "XL": {"hidden_size": 1152, "depth": 28, "num_heads": 16},
    "1B": {"hidden_size": 1536, "depth": 20, "num_heads": 12},
    "3B": {"hidden_size": 2304, "depth": 26, "num_heads": 18},
    "7B": {"hidden_size": 3072, "depth": 34, "num_heads": 24},
    "wan2.1-t2v-1.3b": {"hidden_size": 1536, "depth": 30, "num_heads": 12, "ffn_dim": 8960, "in_channels": 16, **WAN_OPTIONS},
    "wan2.1-t2v-14b": {"hidden_size": 5120, "depth": 40, "num_heads": 40, "ffn_dim": 13824, "in_channels": 16, **WAN_OPTIONS},
    "wan2.1-i2v-14b": {"hidden_size": 5120, "depth": 40, "num_heads": 40, "ffn_dim": 13824, "in_channels": 36, "out_channels": 16,
                       "image_dim": 1280, **WAN_OPTIONS},
    "wan2.1-flf2v-14b": {"hidden_size": 5120, "depth": 40, "num_heads": 40, "ffn_dim": 13824, "in_channels": 36, "out_channels": 16,
                         "image_dim": 1280, "image_len": 2 * 257, **WAN_OPTIONS},
    "wan2.2-ti2v-5b": {"hidden_size": 3072, "depth": 30, "num_heads": 24, "ffn_dim": 14336, "in_channels": 48, **WAN_OPTIONS},
    "wan2.2-t2v-a14b": {"hidden_size": 5120, "depth": 40, "num_heads": 40, "ffn_dim": 13824, "in_channels": 16, **WAN_OPTIONS},
}
