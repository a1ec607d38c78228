"""sora_dist: distributed training of Sora-style video diffusion transformers."""

__version__ = "0.1.0"
