"""``sora-dist decode``: latents back to watchable clips with the VAE that encoded them, for the
round trip of a dataset and for sampled latents."""

from __future__ import annotations

import logging
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np

from sora_dist.data.encoders import VideoVAE
from sora_dist.data.format import Sample, decode_sample, read_manifest
from sora_dist.data.media import write_clip

log = logging.getLogger("sora_dist")


def iter_samples(root: str | Path) -> Iterator[Sample]:
    """Every sample of a dataset in manifest order, read straight from the tars (no workers)."""
    root = Path(root)
    for shard in read_manifest(root).shards:
        url = str(root / shard["name"])
        with tarfile.open(url) as tar:
            group: dict = {}
            for member in tar:
                key, _, ext = member.name.partition(".")
                if group and key != group["__key__"]:
                    yield decode_sample(group)
                    group = {}
                group.setdefault("__key__", key)
                group["__url__"] = url
                group[ext] = tar.extractfile(member).read()
            if group:
                yield decode_sample(group)


def decode_to_file(vae: VideoVAE, latent: np.ndarray, path: str | Path, fps: float) -> tuple[Path, tuple[int, ...]]:
    """One normalized latent (C, T, h, w) -> an .mp4 or .gif; returns the path and the frames' shape."""
    frames = vae.decode(latent)
    return write_clip(frames, path, fps), frames.shape


def decode_dataset(data: str | Path, vae: VideoVAE, out: str | Path, num: int, suffix: str = ".mp4") -> list[Path]:
    """Decode the first ``num`` samples of a dataset into OUT/<key>.mp4 (or .gif)."""
    manifest = read_manifest(data)
    if manifest.vae and manifest.vae != vae.name:
        log.warning("%s was encoded with %s; decoding with %s", data, manifest.vae, vae.name)
    written = []
    for sample in iter_samples(data):
        if len(written) == num:
            break
        path, shape = decode_to_file(vae, sample.latent, Path(out) / f"{sample.key}{suffix}", sample.meta.get("fps", 8.0))
        log.info("decoded %s: latent %s -> %d frames of %dx%d -> %s", sample.key, list(sample.latent.shape), shape[0], shape[2], shape[1], path)
        written.append(path)
    return written
