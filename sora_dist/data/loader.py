"""Streaming reader of latent shards: split by data-parallel rank and worker, shuffled, grouped
into shape buckets whose batch size follows a token budget, with text padded and masked.

Workers never raise on bad input: a corrupt sample or truncated shard becomes a ``DataReport``
that the main process counts, logs by path and, with ``data.on_corrupt=stop``, turns into a
clear ``DataError``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import queue
import random
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sora_dist.config import DataConfig
from sora_dist.data.format import Manifest, Sample, decode_sample, read_manifest
from sora_dist.errors import CorruptSampleError, DataError

log = logging.getLogger(__name__)


@dataclass
class Batch:
    latents: torch.Tensor
    """(B, C, T, h, w) float16 as stored, one latent shape per batch; ``to()`` makes it float32."""
    text: torch.Tensor
    """(B, L, D) float16, zero-padded to the longest caption in the batch; ``to()`` makes it float32."""
    text_mask: torch.Tensor
    """(B, L) bool, True for real text tokens."""
    keys: list[str]
    captions: list[str]
    uids: list[int] = field(default_factory=list)
    """Dataset positions of the samples (see Sample.uid), for the resumable data position."""
    epoch: int = 0

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Batch":
        """The batch with ``fn`` applied to each of its tensors."""
        return dataclasses.replace(self, latents=fn(self.latents), text=fn(self.text), text_mask=fn(self.text_mask))

    def to(self, device: torch.device) -> "Batch":
        """On ``device``, in float32. Batches travel from the workers, and to the device, in
        float16: half the bytes through shared memory and over PCIe (bench-loader measures it).
        From pinned memory (see ``LatentLoader``) the copies are asynchronous."""
        moved = self.map(lambda t: t.to(device, non_blocking=True))
        return dataclasses.replace(moved, latents=moved.latents.float(), text=moved.text.float())


@dataclass
class DataReport:
    """Problems a worker met since its last batch: one message per skipped sample or shard."""

    corrupt: list[str] = field(default_factory=list)
    uids: list[int] = field(default_factory=list)
    """Dataset positions of the skipped samples, where known (not for unreadable tar data)."""


def collate(samples: list[Sample], max_text_len: int) -> Batch:
    texts = [s.text[:max_text_len] for s in samples]
    length = max(t.shape[0] for t in texts)
    text = np.zeros((len(samples), length, texts[0].shape[1]), dtype=np.float16)
    mask = np.zeros((len(samples), length), dtype=bool)
    for i, t in enumerate(texts):
        text[i, : t.shape[0]], mask[i, : t.shape[0]] = t, True
    return Batch(
        latents=torch.from_numpy(np.stack([s.latent for s in samples])),
        text=torch.from_numpy(text),
        text_mask=torch.from_numpy(mask),
        keys=[s.key for s in samples],
        captions=[s.meta.get("caption", "") for s in samples],
        uids=[s.uid for s in samples],
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

    def __init__(self, root: Path, manifest: Manifest, cfg: DataConfig, patch_size, epoch: int, dp_rank: int, dp_size: int, skip: Optional[np.ndarray] = None):
        self.root, self.manifest, self.cfg = root, manifest, cfg
        self.patch_size, self.epoch = tuple(patch_size), epoch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.skip = skip  # bool per dataset position: already trained on this epoch (resume)
        offsets = np.cumsum([0] + [s["samples"] for s in manifest.shards])
        self.shard_offset = {str(root / s["name"]): int(o) for s, o in zip(manifest.shards, offsets)}
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
        position: dict[str, int] = {}
        for raw in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=self._on_tar_error)):
            if self._problems:
                yield DataReport(self._problems)
                self._problems = []
            url = raw.get("__url__", "?")
            index = position.get(url, 0)
            position[url] = index + 1
            uid = self.shard_offset.get(url, -1) + index
            if self.skip is not None and self.skip[uid]:
                continue  # trained on before the resume: not decoded, not seen twice
            try:
                sample = decode_sample(raw)
                self._check(sample, url)
            except CorruptSampleError as err:
                yield DataReport([str(err)], [uid])
                continue
            sample.uid = uid
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


_END = object()


def run_ahead(items: Iterator, depth: int, stage: Callable = lambda item: item) -> Iterator:
    """Yield ``items`` as a background thread produces them, up to ``depth`` ahead, each passed
    through ``stage`` on that thread. An exception on the thread is raised here.

    The loader uses it for the training process's half of the handover from the DataLoader
    workers: taking a batch off the worker queue (unpickling, mapping its shared memory) and
    copying it out of that memory, into pinned memory on an accelerator. On the training thread
    this cost about 1.5 ms per DiT-XL 256px batch (sora-dist bench-loader); here it overlaps the
    step, as PyTorch's pin-memory thread does, and the training thread takes a ready batch.
    """
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer(stage(item)):
                    return
            offer(_END)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which raises it
            offer(err)

    thread = threading.Thread(target=produce, name="sora-dist-loader", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        # An abandoned stream: the thread stops after its current item, and is waited for, so
        # that it lets go of ``items`` now. A DataLoader iterator left alive past this point
        # keeps its workers, which ignore SIGTERM (see _ignore_stop_signals), and
        # multiprocessing's exit handler would wait on them forever.
        stop.set()
        thread.join()


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM/SIGUSR1 to the trainer: schedulers and torchrun signal every
    process, and a worker dying first would abort the step the trainer wants to checkpoint."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class LatentLoader:
    """Batches of one data-parallel rank, epoch after epoch, forever, with a resumable position.

    The trainer calls ``mark_consumed`` for every batch it trained on. ``state_dict`` (a
    collective over the data-parallel group) records, per epoch, which dataset positions are
    done (trained on by any rank, or skipped as corrupt), each rank's epoch and batch count, and
    the positions each epoch's stream was started without (``stream_skip``: set by a resume in
    the middle of that epoch). ``load_state_dict`` resumes:
    - on the same layout and data settings, by replaying each rank's deterministic stream (the
      same ``stream_skip`` included) and dropping the batches it already trained on, so training
      continues bit for bit;
    - on any other layout, by skipping every position already done, so no sample of the epoch is
      lost or seen twice;
    - either way from the oldest epoch that has samples left: an epoch never ends while its
      bitmap has samples left.
    """

    def __init__(self, cfg: DataConfig, patch_size, dp_rank: int = 0, dp_size: int = 1, pin_memory: bool = False):
        self.cfg, self.patch_size = cfg, tuple(patch_size)
        self.pin_memory = pin_memory  # on an accelerator: batches arrive in page-locked memory
        self.root = Path(cfg.path)
        self.manifest = read_manifest(self.root)
        self.dp_rank, self.dp_size = dp_rank, dp_size
        shards = len(self.manifest.shards)
        if shards < dp_size:
            raise DataError(
                f"{self.root} has {shards} shards but the run has {dp_size} data-parallel ranks: each rank reads whole "
                f"shards, so {dp_size - shards} would get none. Re-encode with at least {dp_size} shards "
                f"(sora-dist encode --samples-per-shard {max(1, self.manifest.num_samples // dp_size)}), or use fewer "
                "data-parallel ranks (more sequence or tensor parallelism)"
            )
        # A worker without a shard would only idle: start no more workers than this rank has shards.
        self.workers = min(cfg.num_workers, len(range(dp_rank, shards, dp_size)))
        self.epoch = 0
        self.skipped = 0
        self.consumed: dict[int, np.ndarray] = {}  # epoch -> bool per dataset position: done
        self.stream_skip: dict[int, np.ndarray] = {}  # epoch -> positions its stream leaves out
        self.batches_in_epoch = 0
        self._replay = 0  # batches of self.epoch to drop on a same-layout resume

    def _report(self, report: DataReport, epoch: int) -> None:
        # A corrupt sample is done with for the epoch: a resume skips it like a trained one.
        self._done(epoch)[report.uids] = True
        for message in report.corrupt:
            self.skipped += 1
            if self.cfg.on_corrupt == "stop":
                raise DataError(f"corrupt input (data.on_corrupt=stop): {message}. Set data.on_corrupt=skip to skip such samples")
            log.warning("skipped corrupt input (%d so far): %s", self.skipped, message)

    def epoch_batches(self, epoch: int, skip: Optional[np.ndarray] = None) -> Iterator[Batch]:
        dataset = LatentDataset(self.root, self.manifest, self.cfg, self.patch_size, epoch, self.dp_rank, self.dp_size, skip)
        workers = self.workers
        if workers:
            # Workers hand batches over in shared memory. The default strategy passes one file
            # descriptor per tensor through a socket round trip; naming the shared-memory files
            # instead cut the cost of taking over a 3-sample XL-256 batch from 2.9 to 1.8 ms
            # (sora-dist bench-loader). torch's shm manager removes the files if a process dies.
            torch.multiprocessing.set_sharing_strategy("file_system")
        loader = DataLoader(
            dataset, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None,
            worker_init_fn=_ignore_stop_signals if workers else None,
        )
        def stage(item: Union[Batch, DataReport]) -> Union[Batch, DataReport]:
            # Copy a worker's batch out of its shared-memory files, so that they are released
            # here: the last process to drop such a file frees its pages, which took the training
            # thread 0.9 ms per XL-256 batch. Pinned copies also make the copy to the device async.
            if not isinstance(item, Batch) or not (self.pin_memory or workers):
                return item
            return item.map(torch.Tensor.pin_memory if self.pin_memory else torch.Tensor.clone)

        # iter() here, on the calling thread, so the workers are forked from it, not from a helper.
        for item in run_ahead(iter(loader), depth=2, stage=stage):
            if isinstance(item, DataReport):
                self._report(item, epoch)
            else:
                item.epoch = epoch
                yield item

    def __iter__(self) -> Iterator[Batch]:
        for epoch in itertools.count(self.epoch):
            if epoch != self.epoch:
                self.epoch, self.batches_in_epoch = epoch, 0
            replay, self._replay = self._replay, 0
            skip = self.stream_skip.get(epoch)
            produced = 0
            for batch in self.epoch_batches(epoch, skip):
                produced += 1
                if replay:
                    replay -= 1
                    continue
                yield batch
            if not produced and skip is None:  # a whole epoch of nothing: the next would be the same
                raise DataError(
                    f"data-parallel rank {self.dp_rank} read no sample in epoch {epoch} from its shards "
                    f"{shard_order(self.manifest, self.cfg.seed, epoch)[self.dp_rank :: self.dp_size]} of {self.root}: "
                    f"they are empty or every sample was corrupt ({self.skipped} skipped); check them with `sora-dist inspect`"
                )

    def _done(self, epoch: int) -> np.ndarray:
        if epoch not in self.consumed:
            self.consumed[epoch] = np.zeros(self.manifest.num_samples, dtype=bool)
        return self.consumed[epoch]

    def mark_consumed(self, batch: Batch) -> None:
        """Record that the trainer took an optimizer step on ``batch``."""
        self._done(batch.epoch)[batch.uids] = True
        if batch.epoch == self.epoch:
            self.batches_in_epoch += 1

    def signature(self) -> dict:
        """What must match for a bit-exact replay of each rank's stream."""
        keys = ("seed", "num_workers", "shuffle_buffer", "tokens_per_batch", "max_batch_size", "max_text_len")
        return {"dp_size": self.dp_size, "patch_size": list(self.patch_size), **{k: getattr(self.cfg, k) for k in keys}}

    def state_dict(self, group=None) -> dict:
        """The global position (a collective over ``group``, the data-parallel ranks). Epochs that
        every rank has left and that are done are forgotten: they cannot matter to a resume."""
        distributed = dist.is_available() and dist.is_initialized()
        per_rank = torch.zeros(2 * self.dp_size, dtype=torch.int64)
        per_rank[2 * self.dp_rank : 2 * self.dp_rank + 2] = torch.tensor([self.epoch, self.batches_in_epoch])
        epochs = torch.tensor([min(self.consumed, default=self.epoch), max(self.consumed, default=self.epoch)])
        if distributed:
            dist.all_reduce(per_rank, group=group)  # disjoint slots: a sum gathers them
            low, high = epochs.clone(), epochs.clone()
            dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
            dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
            epochs = torch.tensor([low[0], high[1]])
        rank_epoch_batches = per_rank.view(-1, 2).tolist()
        current = min(epoch for epoch, _ in rank_epoch_batches)
        bitmaps = {}
        for epoch in range(int(epochs[0]), int(epochs[1]) + 1):
            mine = torch.from_numpy(self.consumed.get(epoch, np.zeros(self.manifest.num_samples, dtype=bool)).astype(np.uint8))
            if distributed:
                dist.all_reduce(mine, op=dist.ReduceOp.MAX, group=group)
            if epoch >= current or not mine.all():
                bitmaps[epoch] = mine.numpy().astype(bool)
            else:
                self.consumed.pop(epoch, None)
        # Every rank holds the same stream_skip (a resume sets it from the global bitmap).
        stream_skip = {e: mask for e, mask in self.stream_skip.items() if e >= current}
        return {"signature": self.signature(), "rank_epoch_batches": rank_epoch_batches, "consumed": bitmaps, "stream_skip": stream_skip}

    def load_state_dict(self, state: dict) -> str:
        """Resume from ``state_dict()``; returns 'replay' or 'skip' (see the class docstring)."""
        self.consumed = {int(e): np.asarray(m, dtype=bool).copy() for e, m in state["consumed"].items()}
        unfinished = [e for e, mask in sorted(self.consumed.items()) if not mask.all()]
        oldest_left = unfinished[0] if unfinished else max(self.consumed, default=-1) + 1
        rank_epochs = [epoch for epoch, _ in state["rank_epoch_batches"]]
        if state["signature"] == self.signature() and oldest_left >= min(rank_epochs):
            self.stream_skip = {int(e): np.asarray(m, dtype=bool).copy() for e, m in state["stream_skip"].items()}
            self.epoch, self.batches_in_epoch = state["rank_epoch_batches"][self.dp_rank]
            self._replay = self.batches_in_epoch
            return "replay"
        self.stream_skip = {e: mask.copy() for e, mask in self.consumed.items() if e >= oldest_left}
        self.epoch, self.batches_in_epoch, self._replay = oldest_left, 0, 0
        return "skip"
