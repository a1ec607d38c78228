"""Writes samples into tar shards and, on close, the manifest. ``add_sample`` and
``write_manifest`` are also the building blocks of the distributed encoder, whose ranks write
their own shards and merge one manifest at the end."""

from __future__ import annotations

import io
import os
import tarfile
from collections import Counter
from pathlib import Path
from typing import Optional

from sora_dist.data.format import MANIFEST_NAME, Manifest, Sample, encode_sample, shape_key, shard_name
from sora_dist.errors import DataError


def add_sample(tar: tarfile.TarFile, sample: Sample) -> None:
    """Append one sample's members (latent, text, optional pooled, json) to an open tar."""
    for ext, payload in encode_sample(sample).items():
        info = tarfile.TarInfo(f"{sample.key}.{ext}")
        info.size, info.mode = len(payload), 0o444
        tar.addfile(info, io.BytesIO(payload))


def write_manifest(out_dir: Path, manifest: Manifest) -> None:
    """Write ``manifest.json`` atomically (tmp + rename): a reader never sees half of it."""
    tmp = out_dir / (MANIFEST_NAME + ".tmp")
    tmp.write_text(manifest.to_json())
    os.replace(tmp, out_dir / MANIFEST_NAME)


class ShardWriter:
    """Use as a context manager; every shard and the manifest appear atomically (tmp + rename)."""

    def __init__(self, out_dir: str | Path, samples_per_shard: int = 256, **manifest_fields):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.samples_per_shard = samples_per_shard
        self.manifest_fields = manifest_fields
        self.shards: list[dict] = []
        self.shapes: Counter[str] = Counter()
        self.latent_channels: Optional[int] = None
        self.text_dim: Optional[int] = None
        self._tar: Optional[tarfile.TarFile] = None
        self._count = 0

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:
            self._tar.close()

    def _path(self, index: int) -> Path:
        return self.out_dir / shard_name(index)

    def _finish_shard(self) -> None:
        assert self._tar is not None
        self._tar.close()
        index = len(self.shards)
        os.replace(self._path(index).with_suffix(".tar.tmp"), self._path(index))
        self.shards.append({"name": shard_name(index), "samples": self._count})
        self._tar, self._count = None, 0

    def write(self, sample: Sample) -> None:
        channels, text_dim = sample.latent.shape[0], sample.text.shape[1]
        if self.latent_channels is None:
            self.latent_channels, self.text_dim = channels, text_dim
        if (channels, text_dim) != (self.latent_channels, self.text_dim):
            raise DataError(
                f"sample {sample.key} has {channels} latent channels and text width {text_dim}; "
                f"this dataset has {self.latent_channels} and {self.text_dim}"
            )
        if self._tar is None:
            self._tar = tarfile.open(self._path(len(self.shards)).with_suffix(".tar.tmp"), "w")
        add_sample(self._tar, sample)
        self.shapes[shape_key(sample.latent.shape[1:])] += 1
        self._count += 1
        if self._count == self.samples_per_shard:
            self._finish_shard()

    def close(self) -> Manifest:
        if self._tar is not None:
            self._finish_shard()
        if self.latent_channels is None:
            raise DataError(f"no samples were written to {self.out_dir}")
        manifest = Manifest(
            latent_channels=self.latent_channels,
            text_dim=self.text_dim,
            shards=self.shards,
            shapes=dict(sorted(self.shapes.items())),
            **self.manifest_fields,
        )
        write_manifest(self.out_dir, manifest)
        return manifest
