"""``sora-dist encode``: videos, images and captions -> latent shards, on one or many ranks.

The input list (``media.list_inputs``) is cut into chunks of ``samples_per_shard`` inputs; chunk
i becomes ``shard-i.tar``, encoded by rank ``i % world_size``. A finished chunk leaves a small
record in ``OUT/_encode/`` (written after its shard, atomically), so a restarted job skips it.
When every rank is done, rank 0 merges the records into one ``manifest.json`` and
``encode_report.json``: kept and skipped counts, and every skipped input with its reason.

Bad inputs (unreadable or corrupt files, no frames, clips shorter than every bucket, missing
captions) are skipped and reported; they never stop the job. Models run in bf16 on GPU/NPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tarfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from sora_dist import device as device_lib
from sora_dist.data.clips import read_stages
from sora_dist.data.encoders import TextEncoder, VideoVAE
from sora_dist.data.format import EMPTY_CAPTION, Manifest, Sample, shape_key, shard_name
from sora_dist.data.jobs import Progress, barrier, check_job, join_ranks, leave_ranks
from sora_dist.data.media import Bucket, InputItem, SkipInput, check_buckets, list_inputs, read_clip
from sora_dist.data.writer import add_sample, write_manifest
from sora_dist.errors import ConfigError, DataError, require_extra

log = logging.getLogger("sora_dist")

STATE_DIR = "_encode"
REPORT_NAME = "encode_report.json"
DEFAULT_BUCKETS = ["1x256x256", "1x256x448", "1x448x256", "33x256x256", "33x256x448", "33x448x256"]


@dataclass
class EncodeConfig:
    input: str
    """A folder of videos/images (caption in <name>.txt beside each) or a .csv / .jsonl of path, caption."""
    out: str
    """Dataset folder to write: shards, manifest.json, encode_report.json."""
    vae: str
    """diffusers VAE: local folder or hub name (AutoencoderKL, AutoencoderKLWan, ...HunyuanVideo, ...CogVideoX)."""
    text_encoder: str
    """transformers text encoder with its tokenizer: local folder or hub name (T5, UMT5, CLIP text)."""
    vae_subfolder: str = ""
    """Subfolder of ``vae`` holding it, e.g. 'vae' inside a pipeline repository."""
    text_encoder_subfolder: str = ""
    """Subfolder of ``text_encoder`` holding the model, e.g. 'text_encoder'."""
    tokenizer_subfolder: str = ""
    """Subfolder holding the tokenizer, e.g. 'tokenizer'; defaults to the model's."""
    max_text_length: int = 256
    """Captions are truncated to this many tokens."""
    buckets: list[str] = field(default_factory=lambda: list(DEFAULT_BUCKETS))
    """FRAMESxHEIGHTxWIDTH sizes; 1-frame buckets take images, the others videos."""
    fps: float = 16.0
    """Frames are sampled at this rate (or the source's, if lower); 0 keeps the source rate."""
    samples_per_shard: int = 64
    """Inputs per chunk; each chunk is one shard and the unit of resumption."""
    batch_size: int = 16
    """Inputs decoded and text-encoded together."""
    device: str = "auto"
    """auto, cuda, npu or cpu (SORA_DIST_DEVICE overrides)."""

    def validate(self) -> list[Bucket]:
        if self.samples_per_shard < 1 or self.batch_size < 1:
            raise ConfigError(f"samples_per_shard={self.samples_per_shard} and batch_size={self.batch_size} must be >= 1")
        if self.fps < 0:
            raise ConfigError(f"fps={self.fps} must be >= 0 (0 keeps each video's own rate)")
        if not self.buckets:
            raise ConfigError("buckets is empty: give at least one FRAMESxHEIGHTxWIDTH size")
        return sorted({Bucket.parse(b) for b in self.buckets})


def _fingerprint(cfg: EncodeConfig, items: list[InputItem]) -> dict[str, Any]:
    """What fixes the chunk -> shard mapping and the content; a restart must match it."""
    digest = hashlib.sha256(json.dumps([(i.path, i.caption, i.span) if i.span else (i.path, i.caption) for i in items]).encode()).hexdigest()
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out", "device", "batch_size")}
    return {"inputs": len(items), "inputs_sha256": digest, **settings}


def write_empty_caption(text: TextEncoder, out: Path) -> None:
    """The text encoder's states for the empty prompt, as ``Manifest.empty_caption`` names them:
    what models with padded caption context (Wan) see for a dropped caption and for guidance."""
    states, _ = text.encode([""])[0]
    tmp = out / (EMPTY_CAPTION + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, states)
    os.replace(tmp, out / EMPTY_CAPTION)


def _record_path(state: Path, chunk: int) -> Path:
    return state / f"chunk-{chunk:06d}.json"


class Encoder:
    """One rank's models and the chunk loop."""

    def __init__(self, cfg: EncodeConfig, buckets: list[Bucket], dev: device_lib.Device):
        dtype = torch.float32 if dev.kind == "cpu" else torch.bfloat16
        self.cfg, self.buckets = cfg, buckets
        self.vae = VideoVAE(cfg.vae, cfg.vae_subfolder, dev.torch_device, dtype)
        self.text = TextEncoder(cfg.text_encoder, cfg.text_encoder_subfolder, cfg.tokenizer_subfolder, cfg.max_text_length, dev.torch_device, dtype)
        check_buckets(buckets, self.vae.spatial, self.vae.temporal, causal=self.vae.is_video)

    def _samples(self, items: list[InputItem], skipped: list[dict]) -> list[Sample]:
        clips = []
        for item in items:
            try:
                if not item.caption:
                    raise SkipInput("missing caption", "empty caption, or no caption file / column")
                clips.append((item, read_clip(item.path, self.buckets, self.cfg.fps or None, item.span)))
            except SkipInput as skip:
                skipped.append({"index": item.index, "path": item.path, "reason": skip.kind, "detail": skip.detail})
        texts = self.text.encode([item.caption for item, _ in clips]) if clips else []
        samples = []
        for (item, clip), (states, pooled) in zip(clips, texts):
            meta = {"caption": item.caption, "source": item.path, **item.meta, **clip.meta, "vae": self.cfg.vae, "text_encoder": self.cfg.text_encoder}
            samples.append(Sample(key=f"{item.index:09d}", latent=self.vae.encode(clip.frames), text=states, meta=meta, pooled=pooled))
        return samples

    def encode_chunk(self, chunk: int, items: list[InputItem], out: Path, state: Path) -> dict[str, Any]:
        """Write shard ``chunk`` (if any input survives) and then its record."""
        shard = out / shard_name(chunk)
        tmp = shard.with_suffix(".tar.tmp")
        shapes: Counter[str] = Counter()
        skipped: list[dict] = []
        dims: Optional[tuple[int, int]] = None
        with tarfile.open(tmp, "w") as tar:
            for start in range(0, len(items), self.cfg.batch_size):
                for sample in self._samples(items[start : start + self.cfg.batch_size], skipped):
                    add_sample(tar, sample)
                    shapes[shape_key(sample.latent.shape[1:])] += 1
                    dims = (sample.latent.shape[0], sample.text.shape[1])
        kept = sum(shapes.values())
        if kept:
            os.replace(tmp, shard)
        else:
            tmp.unlink()
        record = {
            "chunk": chunk, "shard": shard.name if kept else None, "samples": kept, "shapes": dict(shapes),
            "latent_channels": dims[0] if dims else None, "text_dim": dims[1] if dims else None,
            "manifest_fields": {**self.vae.manifest_fields(), **self.text.manifest_fields()}, "skipped": skipped,
        }
        path = _record_path(state, chunk)
        path.with_suffix(".tmp").write_text(json.dumps(record))
        os.replace(path.with_suffix(".tmp"), path)
        return record


def merge(out: Path, num_chunks: int, curation: Optional[list[dict[str, Any]]] = None) -> dict[str, Any]:
    """Rank 0, after every rank is done: one manifest and one report from the chunk records."""
    state = out / STATE_DIR
    missing = [c for c in range(num_chunks) if not _record_path(state, c).is_file()]
    if missing:
        raise DataError(f"{len(missing)} chunks of {out} are unfinished (first: {missing[0]}); rerun the same encode command to finish them")
    records = [json.loads(_record_path(state, c).read_text()) for c in range(num_chunks)]
    skipped = [s for r in records for s in r["skipped"]]
    kept = sum(r["samples"] for r in records)
    report = {
        "kept": kept, "skipped": len(skipped), "by_reason": dict(Counter(s["reason"] for s in skipped).most_common()),
        "skipped_inputs": sorted(skipped, key=lambda s: s["index"]),
    }
    (out / REPORT_NAME).write_text(json.dumps(report, indent=1))
    with_samples = [r for r in records if r["samples"]]
    if not with_samples:
        raise DataError(f"no input could be encoded into {out}: see {out / REPORT_NAME} for every input's reason")
    dims = {(r["latent_channels"], r["text_dim"]) for r in with_samples}
    assert len(dims) == 1, f"chunks disagree on latent channels / text width: {dims}"
    shapes: Counter[str] = Counter()
    for r in with_samples:
        shapes.update(r["shapes"])
    latent_channels, text_dim = dims.pop()
    manifest = Manifest(
        latent_channels=latent_channels, text_dim=text_dim,
        shards=[{"name": r["shard"], "samples": r["samples"]} for r in with_samples],
        shapes=dict(sorted(shapes.items())), curation=curation or [], **with_samples[0]["manifest_fields"],
    )
    write_manifest(out, manifest)
    return report


def run_encode(cfg: EncodeConfig) -> Optional[dict[str, Any]]:
    """Encode on this process's rank (torchrun sets RANK / WORLD_SIZE); rank 0 returns the report."""
    require_extra("encode")
    buckets = cfg.validate()
    rank, world = join_ranks()
    items = list_inputs(cfg.input)
    if not items:
        raise ConfigError(f"encode input {cfg.input} holds no videos or images")
    out = Path(cfg.out)
    state = out / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    check_job(state, _fingerprint(cfg, items), rank)

    num_chunks = math.ceil(len(items) / cfg.samples_per_shard)
    mine = [c for c in range(rank, num_chunks, world) if not _record_path(state, c).is_file()]
    if rank == 0:
        log.info("encode: %d inputs in %d chunks over %d ranks; %d chunks left on rank 0", len(items), num_chunks, world, len(mine))
    if mine:
        dev = device_lib.detect(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
        encoder = Encoder(cfg, buckets, dev)
        if rank == 0:
            write_empty_caption(encoder.text, out)
        progress, kept = Progress("encode (rank 0)", len(mine), "chunks"), 0
        for done, chunk in enumerate(mine, 1):
            kept += encoder.encode_chunk(chunk, items[chunk * cfg.samples_per_shard : (chunk + 1) * cfg.samples_per_shard], out, state)["samples"]
            if rank == 0:
                progress.update(done, f"{kept} samples kept")
    barrier()
    report = merge(out, num_chunks, read_stages(cfg.input)) if rank == 0 else None
    if report is not None:
        reasons = ", ".join(f"{reason} {count}" for reason, count in report["by_reason"].items()) or "none"
        log.info("encode: kept %d, skipped %d (%s) -> %s; report %s", report["kept"], report["skipped"], reasons, out, out / REPORT_NAME)
    leave_ranks()
    return report
