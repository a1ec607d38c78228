"""``sora-dist curate``: raw videos -> a JSONL of scored clips (``data.clips`` describes the format).

Two phases, so thresholds can change without decoding anything again:

1. **Analyse** (per source file, spread over ranks: file i on rank i % world_size). Probe the
   file, decode every frame once at a small size, find the scene cuts on every frame, cut the
   scenes into clips between ``min_seconds`` and ``max_seconds`` (trimming ``trim_frames`` at
   each cut), and score each clip from frames sampled ``sample_fps`` times a second: motion,
   brightness and sharpness are measured as each sample streams by; text area, the optional
   aesthetic score and the perceptual hash on the clip's first, middle and last samples. A finished file
   leaves ``OUT.parts/source-N.json``; a restarted job skips it. A file that cannot be used
   (missing, unreadable, no video stream, too short, rotated, variable frame rate, decoding
   stops part-way) is recorded with its reason; it never stops the job.
2. **Select** (rank 0). Apply the thresholds (``--min-motion``, ``--max-text-area``, ...), drop
   near-duplicates across the whole set (perceptual hash of the first, middle and last sampled
   frame), and write the clip list, ``OUT.report.json`` (every count, per reason, per-stage
   seconds) and ``OUT.report.png`` (score histograms with the thresholds drawn). Rerunning with
   other thresholds repeats only this phase.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from sora_dist.data.clips import read_clip_list, read_span, read_still, scaled_size, versions, write_clip_list, write_json
from sora_dist.data.jobs import Progress, barrier, check_job, join_ranks, leave_ranks
from sora_dist.data.media import IMAGE_SUFFIXES, VIDEO_SUFFIXES, InputItem, SkipInput, list_inputs, write_clip
from sora_dist.data.scores import (
    AestheticScorer, TextDetector, brightness, find_cuts, flow_magnitude, frame_change, from_jpeg, near_duplicates, perceptual_hash,
    sharpness, to_jpeg,
)
from sora_dist.errors import ConfigError, DataError, require_extra

log = logging.getLogger("sora_dist")

# score name -> (config field of its lower bound, of its upper bound)
THRESHOLDS = {
    "motion": ("min_motion", "max_motion"),
    "brightness": ("min_brightness", "max_brightness"),
    "sharpness": ("min_sharpness", None),
    "text_area": (None, "max_text_area"),
    "aesthetic": ("min_aesthetic", None),
}


@dataclass
class CurateConfig:
    inputs: list[str]
    """Folders, globs, single files, or .csv / .jsonl lists of path[, caption]."""
    out: str
    """The clip list to write (JSONL); its working files go to OUT.parts/."""
    # -- scene split (phase 1)
    scene_threshold: float = 20.0
    """A frame starts a new scene when its mean absolute RGB change (0-255) is at least this ..."""
    scene_ratio: float = 3.0
    """... and this many times the mean change of the 8 frames either side (fast pans are not cuts)."""
    min_seconds: float = 2.0
    """Shorter clips are dropped ('shorter than min_seconds')."""
    max_seconds: float = 10.0
    """Longer scenes are cut into equal clips no longer than this."""
    trim_frames: int = 1
    """Frames dropped on each side of a scene cut (transition frames)."""
    split: bool = True
    """False: one clip per file (still trimmed to max_seconds)."""
    # -- scores (phase 1)
    analysis_size: int = 256
    """Frames are decoded with their longer side at this size for every score."""
    sample_fps: float = 4.0
    """Frames per second (each with its successor, for flow) sampled for the scores."""
    text_area: bool = True
    """Score text area with the PP-OCRv4 detector (rapidocr-onnxruntime)."""
    aesthetic_clip: str = ""
    """A CLIP model (transformers folder or hub name) for the aesthetic score; empty: no score."""
    aesthetic_head: str = ""
    """The aesthetic head: .safetensors / .pt state dict of linear layers on the CLIP embedding."""
    device: str = "cpu"
    """Device for the aesthetic model."""
    # -- selection (phase 2)
    min_motion: Optional[float] = None
    max_motion: Optional[float] = None
    min_brightness: Optional[float] = None
    max_brightness: Optional[float] = None
    min_sharpness: Optional[float] = None
    max_text_area: Optional[float] = None
    min_aesthetic: Optional[float] = None
    dedup_bits: int = 12
    """Clips whose three 64-bit hashes differ in at most this many bits are duplicates (-1: keep all)."""
    write_clips: str = ""
    """Also write each kept clip as an .mp4 into this folder (re-encoded H.264)."""

    def analysis_settings(self) -> dict[str, Any]:
        """The settings phase 1 depends on: a restart must match them."""
        keep = ("scene_threshold", "scene_ratio", "min_seconds", "max_seconds", "trim_frames", "split", "analysis_size",
                "sample_fps", "text_area", "aesthetic_clip", "aesthetic_head")
        return {k: v for k, v in asdict(self).items() if k in keep}

    def validate(self) -> None:
        if not self.inputs:
            raise ConfigError("curate needs at least one input: a folder, glob, video file, or .csv / .jsonl list")
        if self.min_seconds <= 0 or self.max_seconds < self.min_seconds:
            raise ConfigError(f"need 0 < --min-seconds ({self.min_seconds}) <= --max-seconds ({self.max_seconds})")
        if self.analysis_size < 16 or self.sample_fps <= 0 or self.trim_frames < 0:
            raise ConfigError(f"--analysis-size ({self.analysis_size}) must be >= 16, --sample-fps ({self.sample_fps}) > 0, --trim-frames >= 0")
        if bool(self.aesthetic_clip) != bool(self.aesthetic_head):
            raise ConfigError("the aesthetic score needs both --aesthetic-clip (a CLIP model) and --aesthetic-head (its scoring head)")
        if self.min_aesthetic is not None and not self.aesthetic_clip:
            raise ConfigError("--min-aesthetic needs the aesthetic score: give --aesthetic-clip and --aesthetic-head")
        if self.max_text_area is not None and not self.text_area:
            raise ConfigError("--max-text-area needs the text-area score: drop --no-text-area")
        if not Path(self.out).name.endswith(".jsonl"):
            raise ConfigError(f"--out {self.out} must be a .jsonl file")


def collect_inputs(sources: list[str]) -> list[InputItem]:
    """Every input in a fixed order, paths made absolute (the clip list may be read from elsewhere)."""
    items: list[InputItem] = []
    for source in sources:
        path = Path(source)
        if path.is_dir() or path.suffix in (".csv", ".jsonl"):
            found = [(Path(i.path), i.caption) for i in list_inputs(path)]
        elif any(ch in source for ch in "*?["):
            found = [(Path(p), "") for p in sorted(glob.glob(source, recursive=True))]
        else:
            found = [(path, "")]
        first = len(items)
        items.extend(InputItem(first + k, str(p.resolve()), caption) for k, (p, caption) in enumerate(found))
    return items


# ---------------------------------------------------------------------------------------------
# Phase 1: one source file


@dataclass
class Sampled:
    """What a sampled frame leaves behind: its statistics, and itself as a JPEG (a frame at the
    analysis size is ~110 KB raw, ~10 KB as JPEG: an hour of video at 4 samples a second fits)."""

    motion: float
    """Optical-flow magnitude to the next frame, pixels at the analysis size."""
    brightness: float
    sharpness: float
    jpeg: bytes


@dataclass
class Decoded:
    fps: float
    width: int
    height: int
    analysis_width: int
    times: list[float]
    changes: np.ndarray
    samples: dict[int, Sampled]
    """frame index -> its sample, every ``step`` frames."""
    sample_seconds: float
    """Of the decoding time, what measuring the samples took."""


def _open(path: str):
    import av

    if not Path(path).is_file():
        raise SkipInput("missing file", path)
    if Path(path).stat().st_size == 0:
        raise SkipInput("empty", "zero-length file")
    try:
        container = av.open(path)
    except Exception as err:  # noqa: BLE001 - av raises its own error tree for bad files
        raise SkipInput("unreadable", f"{type(err).__name__}: {err}") from None
    if not container.streams.video:
        container.close()
        raise SkipInput("no video stream", "audio-only or data-only file")
    return container


def decode(path: str, cfg: CurateConfig) -> Decoded:
    """Every frame once, at the analysis size: its time and change, and the sampled pairs."""
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        if not fps:
            raise SkipInput("unreadable", "the stream has no frame rate")
        step = max(1, round(fps / cfg.sample_fps))
        times: list[float] = []
        changes: list[float] = [0.0]
        samples: dict[int, Sampled] = {}
        previous, size, width, height, sample_seconds = None, None, 0, 0, 0.0
        try:
            for index, frame in enumerate(container.decode(stream)):
                if size is None:
                    if getattr(frame, "rotation", 0):
                        raise SkipInput("rotated", f"the file says display it rotated {frame.rotation}°; re-encode it upright "
                                                   "(ffmpeg -i IN -c:v libx264 OUT rotates on the way)")
                    width, height = frame.width, frame.height
                    size = scaled_size(width, height, cfg.analysis_size)
                image = frame.to_ndarray(width=size[0], height=size[1], format="rgb24")
                times.append(frame.time if frame.time is not None else index / fps)
                if previous is not None:
                    changes.append(frame_change(previous[::2, ::2], image[::2, ::2]))
                    if (index - 1) % step == 0:
                        clock = time.perf_counter()
                        samples[index - 1] = _sample(previous, image)
                        sample_seconds += time.perf_counter() - clock
                previous = image
        except SkipInput:
            raise
        except Exception as err:  # noqa: BLE001 - a broken stream mid-way
            raise SkipInput("corrupt", f"decoding stopped after {len(times)} frames: {type(err).__name__}: {err}") from None
    if previous is not None and (len(times) - 1) % step == 0:
        samples[len(times) - 1] = _sample(previous, previous)
    if not times:
        raise SkipInput("empty", "no decodable frames")
    _check_frame_rate(times, fps)
    return Decoded(fps, width, height, size[0], times, np.asarray(changes), samples, sample_seconds)


def _sample(frame: np.ndarray, following: np.ndarray) -> Sampled:
    return Sampled(flow_magnitude(frame, following), brightness(frame), sharpness(frame), to_jpeg(frame))


def _check_frame_rate(times: list[float], fps: float) -> None:
    """Variable frame rate breaks frame-count spans: more than 5% of intervals off by 25%."""
    intervals = np.diff(np.asarray(times))
    if len(intervals) < 4:
        return
    off = np.abs(intervals - 1 / fps) > 0.25 / fps
    if off.mean() > 0.05:
        raise SkipInput("variable frame rate", f"{off.mean():.0%} of frame intervals differ from 1/{fps:g} s by over 25%; "
                                               "convert it first (ffmpeg -i IN -fps_mode cfr OUT)")


def clip_spans(decoded: Decoded, cfg: CurateConfig) -> tuple[list[int], list[tuple[int, int, int]], int]:
    """(cut frames, [(scene, start, end)] with end exclusive, scenes too short to keep)."""
    n = len(decoded.times)
    cuts = find_cuts(decoded.changes, cfg.scene_threshold, cfg.scene_ratio, min_gap=max(1, round(decoded.fps * 0.25))) if cfg.split else []
    bounds = [0, *cuts, n]
    min_frames = max(1, math.ceil(cfg.min_seconds * decoded.fps - 1e-6))
    max_frames = max(min_frames, math.floor(cfg.max_seconds * decoded.fps + 1e-6))
    spans, too_short = [], 0
    for scene, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        start += cfg.trim_frames if start > 0 else 0
        end -= cfg.trim_frames if end < n else 0
        length = end - start
        if length < min_frames:
            too_short += 1
            continue
        pieces = math.ceil(length / max_frames)
        size = length // pieces
        spans.extend((scene, start + k * size, start + (k + 1) * size) for k in range(pieces))
    return cuts, spans, too_short


class Scorers:
    """The models phase 1 loads once per rank."""

    def __init__(self, cfg: CurateConfig):
        self.text = TextDetector() if cfg.text_area else None
        self.aesthetic = AestheticScorer(cfg.aesthetic_clip, cfg.aesthetic_head, cfg.device) if cfg.aesthetic_clip else None


def score_clip(decoded: Decoded, start: int, end: int, scorers: Scorers, seconds: Counter) -> dict[str, Any]:
    """Motion and every still score of the clip from its samples."""
    samples = [decoded.samples[i] for i in sorted(decoded.samples) if start <= i < end - 1]
    if not samples:  # a clip shorter than the sampling step: its nearest sample
        samples = [decoded.samples[min(decoded.samples, key=lambda i: abs(i - (start + end) // 2))]]
    motion = round(float(np.median([s.motion for s in samples])) * decoded.fps / decoded.analysis_width, 5)
    scored = still_scores(samples, scorers, seconds)
    return {**scored, "scores": {"motion": motion, **scored["scores"]}}


def still_scores(samples: list[Sampled], scorers: Scorers, seconds: Counter) -> dict[str, Any]:
    """Brightness, sharpness, text area, aesthetic and the hashes, from the samples (text area,
    aesthetic and hashes on the first, middle and last)."""
    clock = time.perf_counter()
    scores: dict[str, Any] = {
        "brightness": round(float(np.mean([s.brightness for s in samples])), 4),
        "sharpness": round(float(np.median([s.sharpness for s in samples])), 2),
    }
    ends = [from_jpeg(s.jpeg) for s in (samples[0], samples[len(samples) // 2], samples[-1])]
    hashes = [perceptual_hash(f) for f in ends]
    seconds["hash"] += time.perf_counter() - clock
    if scorers.text is not None:
        clock = time.perf_counter()
        scores["text_area"] = round(max(scorers.text.area(f) for f in ends), 5)
        seconds["text area"] += time.perf_counter() - clock
    if scorers.aesthetic is not None:
        clock = time.perf_counter()
        scores["aesthetic"] = round(scorers.aesthetic.score([ends[1]]), 4)
        seconds["aesthetic"] += time.perf_counter() - clock
    return {"scores": scores, "hash": [f"{h:016x}" for h in hashes]}


def analyse(item: InputItem, cfg: CurateConfig, scorers: Scorers) -> dict[str, Any]:
    """One source's record: its clips with scores, or the reason it was skipped."""
    record: dict[str, Any] = {"index": item.index, "path": item.path}
    if Path(item.path).suffix.lower() in IMAGE_SUFFIXES:
        return {**record, **analyse_image(item, cfg, scorers)}
    seconds: Counter = Counter()
    clock = time.perf_counter()
    try:
        decoded = decode(item.path, cfg)
    except SkipInput as skip:
        return {**record, "skipped": skip.kind, "detail": skip.detail, "seconds": {"decode": time.perf_counter() - clock}}
    seconds["decode"] += time.perf_counter() - clock - decoded.sample_seconds
    seconds["frame scores"] += decoded.sample_seconds
    cuts, spans, too_short = clip_spans(decoded, cfg)
    clips = []
    for number, (scene, start, end) in enumerate(spans):
        clip = {
            "id": f"{item.index:06d}-{number:03d}", "path": item.path, "start_frame": start, "end_frame": end,
            "start_time": round(decoded.times[start], 6), "end_time": round(decoded.times[end - 1], 6), "fps": round(decoded.fps, 6),
            "width": decoded.width, "height": decoded.height, "frames": end - start, "duration": round((end - start) / decoded.fps, 4),
            "scene": scene, **score_clip(decoded, start, end, scorers, seconds),
        }
        if item.caption:
            clip["caption"] = item.caption
        clips.append(clip)
    if not clips:
        record.update(skipped="too short", detail=f"{len(decoded.times)} frames at {decoded.fps:g} fps; no scene lasts --min-seconds {cfg.min_seconds}")
    return {**record, "frames": len(decoded.times), "fps": decoded.fps, "cuts": cuts, "clips": clips,
            "scenes_too_short": too_short, "seconds": dict(seconds)}


def analyse_image(item: InputItem, cfg: CurateConfig, scorers: Scorers) -> dict[str, Any]:
    """An image is a one-frame clip: every score but motion, and its hash three times (a still
    video of the same picture is its duplicate)."""
    import cv2

    clock = time.perf_counter()
    try:
        full = read_still(item.path)
    except Exception as err:  # noqa: BLE001 - Pillow raises many types for bad files
        return {"skipped": "unreadable", "detail": f"{type(err).__name__}: {err}", "seconds": {"decode": time.perf_counter() - clock}}
    height, width = full.shape[:2]
    frame = cv2.resize(full, scaled_size(width, height, cfg.analysis_size), interpolation=cv2.INTER_AREA)
    seconds: Counter = Counter({"decode": time.perf_counter() - clock})
    # No motion score (motion thresholds pass it); through JPEG as video samples go, so that a
    # still video of the same picture hashes alike.
    scored = still_scores([Sampled(0.0, brightness(frame), sharpness(frame), to_jpeg(frame))], scorers, seconds)
    clip = {"id": f"{item.index:06d}-000", "path": item.path, "kind": "image", "start_frame": 0, "end_frame": 1, "start_time": 0.0,
            "end_time": 0.0, "fps": 0.0, "width": width, "height": height, "frames": 1, "duration": 0.0, "scene": 0, **scored}
    if item.caption:
        clip["caption"] = item.caption
    return {"frames": 1, "cuts": [], "clips": [clip], "scenes_too_short": 0, "seconds": dict(seconds)}


# ---------------------------------------------------------------------------------------------
# Phase 2: selection


def failed_threshold(scores: dict[str, Any], cfg: CurateConfig) -> Optional[str]:
    """The first threshold a clip misses, as the report's reason ('motion < 0.01'), or None. A
    score a clip cannot have (an image's motion) passes."""
    for name, (low, high) in THRESHOLDS.items():
        value = scores.get(name)
        for bound, sign in ((low, "<"), (high, ">")):
            limit = getattr(cfg, bound) if bound else None
            if limit is None or value is None:
                continue
            if (value < limit) if sign == "<" else (value > limit):
                return f"{name} {sign} {limit:g}"
    return None


def select(records: list[dict[str, Any]], cfg: CurateConfig) -> tuple[list[dict[str, Any]], Counter, list[dict[str, Any]]]:
    """(kept clips, dropped-clip counts by reason, every dropped clip with its reason)."""
    dropped: Counter = Counter()
    dropped_clips: list[dict[str, Any]] = []
    survivors = []
    for clip in (c for r in records for c in r.get("clips", [])):
        reason = failed_threshold(clip["scores"], cfg)
        if reason:
            dropped[reason] += 1
            dropped_clips.append({"id": clip["id"], "reason": reason})
        else:
            survivors.append(clip)
    duplicates = near_duplicates([[int(h, 16) for h in c["hash"]] for c in survivors], cfg.dedup_bits) if cfg.dedup_bits >= 0 else {}
    for later, earlier in duplicates.items():
        dropped["duplicate"] += 1
        dropped_clips.append({"id": survivors[later]["id"], "reason": "duplicate", "of": survivors[earlier]["id"]})
    kept = [c for i, c in enumerate(survivors) if i not in duplicates]
    return kept, dropped, dropped_clips


def report(records: list[dict[str, Any]], kept: list[dict[str, Any]], dropped: Counter, dropped_clips: list[dict[str, Any]],
           seconds: float) -> dict[str, Any]:
    skipped = [r for r in records if r.get("skipped")]
    stages: Counter = Counter()
    for r in records:
        stages.update(r.get("seconds", {}))
    found = sum(len(r.get("clips", [])) for r in records)
    busy = sum(stages.values())
    return {
        "files": len(records), "files_used": len(records) - len(skipped),
        "files_skipped": dict(Counter(r["skipped"] for r in skipped).most_common()),
        "clips_found": found, "scenes_too_short": sum(r.get("scenes_too_short", 0) for r in records),
        "clips_dropped": dict(dropped.most_common()), "clips_kept": len(kept),
        "analysis_seconds": {k: round(v, 3) for k, v in stages.most_common()},
        "decode_share": round(stages["decode"] / busy, 3) if busy else None,
        "clips_per_second": round(found / busy, 3) if busy else None,
        "wall_seconds": round(seconds, 2),
        "skipped_files": [{"path": r["path"], "reason": r["skipped"], "detail": r["detail"]} for r in skipped],
        "dropped_clips": dropped_clips,
    }


def plot_report(records: list[dict[str, Any]], kept: list[dict[str, Any]], cfg: CurateConfig, path: Path) -> Path:
    """One histogram per score (all clips, and kept ones), with the thresholds as red lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clips = [c for r in records for c in r.get("clips", [])]
    names = [n for n in [*THRESHOLDS, "duration"] if any(n in c["scores"] or n == "duration" for c in clips)]
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(3.2 * max(1, len(names)), 2.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        def values(rows):
            return [c["duration"] if name == "duration" else c["scores"][name] for c in rows if name == "duration" or name in c["scores"]]
        every = values(clips)
        bins = np.histogram_bin_edges(every or [0.0], bins=20)
        ax.hist(every, bins=bins, color="0.75", label=f"all {len(every)}")
        ax.hist(values(kept), bins=bins, color="tab:blue", label=f"kept {len(kept)}")
        for bound in THRESHOLDS.get(name, (None, None)):
            limit = getattr(cfg, bound) if bound else None
            if limit is not None:
                ax.axvline(limit, color="red")
        if name == "duration":
            for limit in (cfg.min_seconds, cfg.max_seconds):
                ax.axvline(limit, color="red")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.suptitle(f"sora-dist curate: {len(clips)} clips found, {len(kept)} kept", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# The job


def _parts(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def _record_path(state: Path, index: int) -> Path:
    return state / f"source-{index:06d}.json"


def _write_clip_files(kept: list[dict[str, Any]], folder: Path, rank: int, world: int) -> None:
    for number, clip in enumerate(kept):
        target = folder / f"{clip['id']}.mp4"
        if number % world != rank or target.is_file() or clip.get("kind") == "image":
            continue
        partial = target.with_name(target.stem + ".partial.mp4")  # renamed when whole: a killed job's half file is redone
        write_clip((f for _, f in read_span(clip["path"], clip["start_time"], clip["end_time"])), partial, clip["fps"])
        os.replace(partial, target)


def run_curate(cfg: CurateConfig) -> Optional[dict[str, Any]]:
    """Curate on this process's rank (torchrun sets RANK / WORLD_SIZE); rank 0 returns the report."""
    require_extra("curate")
    cfg.validate()
    started = time.monotonic()
    rank, world = join_ranks()
    items = collect_inputs(cfg.inputs)
    if not items:
        raise ConfigError(f"no input files found in {' '.join(cfg.inputs)}")
    unknown = [i.path for i in items if Path(i.path).suffix.lower() not in VIDEO_SUFFIXES | IMAGE_SUFFIXES]
    if unknown:
        log.info("curate: %d inputs have no video suffix (%s...); they are probed anyway", len(unknown), unknown[0])
    out = Path(cfg.out)
    state = _parts(out)
    state.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(json.dumps([(i.path, i.caption) for i in items]).encode()).hexdigest()
    fingerprint = {"inputs": len(items), "inputs_sha256": digest, **cfg.analysis_settings()}
    check_job(state, fingerprint, rank, record=False)
    mine = [i for i in items[rank::world] if not _record_path(state, i.index).is_file()]
    scorers = Scorers(cfg) if mine else None  # a scoring model that does not load stops the job here
    check_job(state, fingerprint, rank)
    if rank == 0:
        log.info("curate: %d files over %d ranks; %d left on rank 0 -> %s", len(items), world, len(mine), out)
    if scorers is not None:
        progress, clips = Progress("curate (rank 0)", len(mine), "files"), 0
        for done, item in enumerate(mine, 1):
            record = analyse(item, cfg, scorers)
            write_json(_record_path(state, item.index), record)
            clips += len(record.get("clips", []))
            if rank == 0:
                progress.update(done, f"{clips} clips found")
    barrier()
    result = None
    if rank == 0:
        missing = [i.index for i in items if not _record_path(state, i.index).is_file()]
        if missing:
            raise DataError(f"{len(missing)} files of {out} are unfinished (first: input {missing[0]}); rerun the same curate command")
        result = finish(items, state, out, cfg, time.monotonic() - started)
    barrier()
    if cfg.write_clips:  # each rank writes its share of the kept clips
        _write_clip_files(read_clip_list(out)[1], Path(cfg.write_clips), rank, world)
    leave_ranks()
    return result


def finish(items: list[InputItem], state: Path, out: Path, cfg: CurateConfig, seconds: float) -> dict[str, Any]:
    """Phase 2 on rank 0: select, write the clip list, the report and its picture."""
    records = [json.loads(_record_path(state, i.index).read_text()) for i in items]
    kept, dropped, dropped_clips = select(records, cfg)
    if not kept:
        summary = report(records, kept, dropped, dropped_clips, seconds)
        (out.with_suffix(".report.json")).write_text(json.dumps(summary, indent=1))
        raise DataError(f"curate kept no clip of {len(items)} files: see {out.with_suffix('.report.json')} for every reason")
    if cfg.write_clips:
        for clip in (c for c in kept if c.get("kind") != "image"):
            clip["clip_path"] = str((Path(cfg.write_clips) / f"{clip['id']}.mp4").resolve())
    summary = report(records, kept, dropped, dropped_clips, seconds)
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("inputs", "out", "device")}
    stage = {"stage": "curate", "settings": settings, "versions": versions("sora-dist", "av", "opencv-python-headless", "rapidocr-onnxruntime"),
             "counts": {k: summary[k] for k in ("files", "files_used", "files_skipped", "clips_found", "clips_dropped", "clips_kept")}}
    write_clip_list(out, [stage], kept)
    (out.with_suffix(".report.json")).write_text(json.dumps(summary, indent=1))
    plot_report(records, kept, cfg, out.with_suffix(".report.png"))
    skipped = ", ".join(f"{k} {v}" for k, v in summary["files_skipped"].items()) or "none"
    dropped_text = ", ".join(f"{k} {v}" for k, v in summary["clips_dropped"].items()) or "none"
    log.info("curate: %d files (skipped: %s) -> %d clips found, dropped: %s; kept %d -> %s (report %s)", len(items), skipped,
             summary["clips_found"], dropped_text, len(kept), out, out.with_suffix(".report.png"))
    return summary
