"""Checkpoints of other projects in and out of sora_dist (Wan 2.x: sora_dist.interop.wan)."""
