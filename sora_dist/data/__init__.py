"""Latent shards: format, writer, synthetic data, and the streaming reader."""

from sora_dist.data.format import Manifest, Sample, decode_sample, encode_sample, read_manifest
from sora_dist.data.loader import Batch, LatentLoader, batch_size_for, collate
from sora_dist.data.synthetic import make_synthetic
from sora_dist.data.writer import ShardWriter

__all__ = [
    "Manifest", "Sample", "decode_sample", "encode_sample", "read_manifest",
    "Batch", "LatentLoader", "batch_size_for", "collate", "make_synthetic", "ShardWriter",
]
