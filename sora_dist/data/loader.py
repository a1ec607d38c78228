"""Streaming reader of latent shards: split by data-parallel rank and worker, shuffled, grouped
into shape buckets whose batch size follows a token budget, with text padded and masked.

Workers never raise on bad input: a corrupt sample or truncated shard becomes a ``DataReport``
that the main process counts, logs by path and, with ``data.on_corrupt=stop``, turns into a
clear ``DataError``.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Union

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sora_dist.config import DataConfig
from sora_dist.data.format import Manifest, Sample, decode_sample, read_manifest
from sora_dist.errors import CorruptSampleError, DataError

log = logging.getLogger(__name__)


@dataclass
class Batch:
    latents: torch.Tensor
    """(B, C, T, h, w) float32, one latent shape per batch."""
    text: torch.Tensor
    """(B, L, D) float32, zero-padded to the longest caption in the batch."""
    text_mask: torch.Tensor
    """(B, L) bool, True for real text tokens."""
    keys: list[str]
    captions: list[str]

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.latents.to(device), self.text.to(device), self.text_mask.to(device), self.keys, self.captions)


@dataclass
class DataReport:
    """Problems a worker met since its last batch: one message per skipped sample or shard."""

    corrupt: list[str] = field(default_factory=list)


def collate(samples: list[Sample], max_text_len: int) -> Batch:
    texts = [s.text[:max_text_len] for s in samples]
    length = max(t.shape[0] for t in texts)
    text = np.zeros((len(samples), length, texts[0].shape[1]), dtype=np.float32)
    mask = np.zeros((len(samples), length), dtype=bool)
    for i, t in enumerate(texts):
        text[i, : t.shape[0]], mask[i, : t.shape[0]] = t, True
    return Batch(
        latents=torch.from_numpy(np.stack([s.latent for s in samples]).astype(np.float32)),
        text=torch.from_numpy(text),
        text_mask=torch.from_numpy(mask),
        keys=[s.key for s in samples],
        captions=[s.meta.get("caption", "") for s in samples],
    )


def batch_size_for(latent_shape: tuple[int, int, int], patch_size: tuple[int, int, int], cfg: DataConfig) -> int:
    """Samples per micro-batch for one shape bucket: the token budget over tokens per sample."""
    tokens = math.prod(-(-s // p) for s, p in zip(latent_shape, patch_size))
    return max(1, min(cfg.max_batch_size, cfg.tokens_per_batch // tokens))


def shard_order(manifest: Manifest, seed: int, epoch: int) -> list[str]:
    """The epoch's global shard order: the same on every rank."""
    names = [s["name"] for s in manifest.shards]
    random.Random(seed * 100_003 + epoch).shuffle(names)
    return names


class LatentDataset(IterableDataset):
    """One epoch of batches for one data-parallel rank; each worker reads its own shards."""

    def __init__(self, root: Path, manifest: Manifest, cfg: DataConfig, patch_size, epoch: int, dp_rank: int, dp_size: int):
        self.root, self.manifest, self.cfg = root, manifest, cfg
        self.patch_size, self.epoch = tuple(patch_size), epoch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self._problems: list[str] = []

    def _on_tar_error(self, exn: Exception) -> bool:
        where = next((a for a in reversed(exn.args) if isinstance(a, str) and a.endswith(".tar")), "a shard")
        self._problems.append(f"{where}: unreadable tar data ({type(exn).__name__}: {exn.args[0] if exn.args else exn})")
        return True  # keep streaming the remaining shards

    def _check(self, sample: Sample, url: str) -> None:
        channels, text_dim = sample.latent.shape[0], sample.text.shape[1]
        if (channels, text_dim) != (self.manifest.latent_channels, self.manifest.text_dim):
            raise CorruptSampleError(
                f"{url} sample {sample.key}: {channels} latent channels and text width {text_dim}, "
                f"but the manifest says {self.manifest.latent_channels} and {self.manifest.text_dim}"
            )

    def _samples(self, urls: list[str]) -> Iterator[Union[Sample, DataReport]]:
        if not urls:
            return
        for raw in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=self._on_tar_error)):
            if self._problems:
                yield DataReport(self._problems)
                self._problems = []
            try:
                sample = decode_sample(raw)
                self._check(sample, raw.get("__url__", "?"))
            except CorruptSampleError as err:
                yield DataReport([str(err)])
                continue
            yield sample
        if self._problems:
            yield DataReport(self._problems)
            self._problems = []

    def __iter__(self) -> Iterator[Union[Batch, DataReport]]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        shards = shard_order(self.manifest, self.cfg.seed, self.epoch)[self.dp_rank :: self.dp_size][worker_id::num_workers]
        rng = random.Random(hash((self.cfg.seed, self.epoch, self.dp_rank, worker_id)))
        buffer: list[Sample] = []
        buckets: dict[tuple, list[Sample]] = {}

        def add(sample: Sample) -> Iterator[Batch]:
            shape = tuple(sample.latent.shape[1:])
            bucket = buckets.setdefault(shape, [])
            bucket.append(sample)
            if len(bucket) >= batch_size_for(shape, self.patch_size, self.cfg):
                yield collate(bucket, self.cfg.max_text_len)
                buckets[shape] = []

        for item in self._samples([str(self.root / name) for name in shards]):
            if isinstance(item, DataReport):
                yield item
                continue
            buffer.append(item)
            if len(buffer) >= self.cfg.shuffle_buffer:
                yield from add(buffer.pop(rng.randrange(len(buffer))))
        rng.shuffle(buffer)
        for sample in buffer:
            yield from add(sample)
        for bucket in buckets.values():  # the epoch's partial batches
            if bucket:
                yield collate(bucket, self.cfg.max_text_len)


class LatentLoader:
    """Batches of one data-parallel rank, epoch after epoch, forever."""

    def __init__(self, cfg: DataConfig, patch_size, dp_rank: int = 0, dp_size: int = 1):
        self.cfg, self.patch_size = cfg, tuple(patch_size)
        self.root = Path(cfg.path)
        self.manifest = read_manifest(self.root)
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.epoch = 0
        self.skipped = 0

    def _report(self, report: DataReport) -> None:
        for message in report.corrupt:
            self.skipped += 1
            if self.cfg.on_corrupt == "stop":
                raise DataError(f"corrupt input (data.on_corrupt=stop): {message}. Set data.on_corrupt=skip to skip such samples")
            log.warning("skipped corrupt input (%d so far): %s", self.skipped, message)

    def epoch_batches(self, epoch: int) -> Iterator[Batch]:
        dataset = LatentDataset(self.root, self.manifest, self.cfg, self.patch_size, epoch, self.dp_rank, self.dp_size)
        workers = self.cfg.num_workers
        loader = DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None)
        for item in loader:
            if isinstance(item, DataReport):
                self._report(item)
            else:
                yield item

    def __iter__(self) -> Iterator[Batch]:
        for epoch in itertools.count(self.epoch):
            self.epoch = epoch
            yield from self.epoch_batches(epoch)
