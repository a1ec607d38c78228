"""``sora-dist caption``: a clip list (curate's JSONL) -> the same list with a new, dense caption
per clip, written by a vision-language model.

- Frames: ``frames`` per clip (or ``fps`` a second, up to ``frames``), spread evenly over its
  span, longer side ``frame_size``, decoded
  in DataLoader worker processes while the model generates, so the accelerator does not wait on
  the CPU; the report gives the share of time it did wait.
- Model: a local transformers VLM (``--model``: folder or hub name) or an OpenAI-compatible
  server (``--model http://host:8000/v1``: vLLM, SGLang) taking ``concurrency`` requests at once.
- Text: the usual openings ("The video shows", "In this video, ...") are stripped and the first
  letter capitalised; with ``--score-words motion aesthetic`` the clip's scores are appended as
  words ("Motion: slow.") so that training can condition on them.
- Ranks and resumption as in ``encode``: clips go in chunks of ``chunk_size``, chunk i to rank
  i % world_size; a finished chunk leaves ``OUT.parts/chunk-N.json`` and a restart skips it.
  Rank 0 merges the chunks in the input's order into OUT and ``OUT.report.json``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from sora_dist.data.clips import read_clip_list, read_still, sample_span, versions, write_clip_list, write_json
from sora_dist.data.jobs import Progress, barrier, check_job, join_ranks, leave_ranks
from sora_dist.data.language import Request, connect, is_url
from sora_dist.data.media import IMAGE_SUFFIXES
from sora_dist.errors import ConfigError, DataError, require_extra

log = logging.getLogger("sora_dist")

INSTRUCTION = (
    "Describe this video in one detailed paragraph of about 80 words, in the order things happen: the main subjects and "
    "their appearance, what they do and how they move, the setting, lighting and colours, and how the camera moves. "
    "State only what is visible. Do not begin with 'The video shows'."
)

# Openings captioners favour that say nothing about the clip; stripped from the start.
OPENINGS = re.compile(
    r"^\s*(?:(?:in|throughout)\s+(?:this|the)\s+(?:video|clip|footage|scene|image|frames?)\s*,?\s*"
    r"|(?:this|the)\s+(?:video|clip|footage|scene|image|sequence|frames?)\s+(?:shows|depicts|features|captures|showcases|presents|displays|"
    r"is\s+showing|begins\s+with|opens\s+with)\s*(?:that\s+)?:?\s*)",
    re.IGNORECASE,
)

# score -> (upper edges of each word's range, the words); appended as "Motion: slow."
SCORE_WORDS = {
    "motion": ([0.002, 0.01, 0.03, 0.08], ["static", "slow", "moderate", "fast", "very fast"]),
    "aesthetic": ([4.0, 5.0, 5.5, 6.5], ["poor", "fair", "good", "very good", "excellent"]),
    "brightness": ([0.15, 0.35, 0.7, 0.9], ["very dark", "dark", "normal", "bright", "very bright"]),
}


def clean_caption(text: str) -> str:
    """Strip the openings, quotes and whitespace; capitalise the first letter."""
    text = " ".join(text.split()).strip().strip('"').strip()
    previous = None
    while previous != text:
        previous, text = text, OPENINGS.sub("", text, count=1)
    return text[:1].upper() + text[1:] if text else ""


def score_words(scores: dict[str, Any], names: list[str]) -> str:
    words = []
    for name in names:
        value = scores.get(name)
        if value is None:
            continue
        edges, labels = SCORE_WORDS[name]
        words.append(f"{name.capitalize()}: {labels[sum(value >= e for e in edges)]}.")
    return " ".join(words)


@dataclass
class CaptionConfig:
    input: str
    """The clip list to caption (curate's or caption's JSONL)."""
    out: str
    """The captioned clip list to write; working files go to OUT.parts/."""
    model: str
    """A transformers VLM (local folder or hub name), or the URL of an OpenAI-compatible server."""
    endpoint_model: str = ""
    """With a URL: the served model's name (default: the first the server lists)."""
    api_key_env: str = "OPENAI_API_KEY"
    """With a URL: the environment variable holding the API key (none needed for a local vLLM)."""
    instruction: str = INSTRUCTION
    frames: int = 8
    """Frames per clip, spread evenly over its span (the most, with ``fps``)."""
    fps: float = 0.0
    """Sample this many frames per second of the clip instead (at least 1, at most ``frames``); 0: always ``frames``."""
    frame_size: int = 448
    """Longer side of each frame, pixels."""
    batch_size: int = 4
    """Clips per generate call (local model)."""
    concurrency: int = 8
    """Requests in flight (endpoint)."""
    workers: int = 2
    """Decoding processes (0: decode in the main process)."""
    max_new_tokens: int = 200
    score_words: list[str] = field(default_factory=list)
    """Scores appended to each caption as words: motion, aesthetic, brightness."""
    chunk_size: int = 32
    """Clips per chunk: the unit of resumption."""
    device: str = "auto"

    def validate(self) -> None:
        if min(self.frames, self.frame_size, self.batch_size, self.concurrency, self.chunk_size, self.max_new_tokens) < 1 or self.workers < 0 or self.fps < 0:
            raise ConfigError("--frames, --frame-size, --batch-size, --concurrency, --chunk-size and --max-new-tokens must be >= 1, --workers and --fps >= 0")
        unknown = sorted(set(self.score_words) - set(SCORE_WORDS))
        if unknown:
            raise ConfigError(f"--score-words {' '.join(unknown)}: known scores are {', '.join(SCORE_WORDS)}")
        if not Path(self.out).name.endswith(".jsonl"):
            raise ConfigError(f"--out {self.out} must be a .jsonl file")


class ClipFrames:
    """A map-style dataset over the clips at ``positions`` (every clip by default): item i is
    (position, frames or None, reason, decode seconds)."""

    def __init__(self, clips: list[dict[str, Any]], frames: int, size: int, fps: float = 0.0, positions: list[int] | None = None):
        self.clips, self.frames, self.size, self.fps = clips, frames, size, fps
        self.positions = list(range(len(clips))) if positions is None else positions

    def count(self, clip: dict[str, Any]) -> int:
        duration = clip.get("duration")
        if not self.fps or duration is None:
            return self.frames
        return max(1, min(self.frames, round(duration * self.fps)))

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int):
        position = self.positions[index]
        clip = self.clips[position]
        start = time.perf_counter()
        try:
            end_time = clip.get("end_time")
            if Path(clip["path"]).suffix.lower() in IMAGE_SUFFIXES:
                frames = [read_still(clip["path"], self.size)]
            else:
                frames = sample_span(clip["path"], clip.get("start_time", 0.0), math.inf if end_time is None else end_time, self.count(clip), self.size)
            reason = "" if frames else "no decodable frames in the span"
        except Exception as err:  # noqa: BLE001 - a file that changed or broke since curate
            frames, reason = [], f"{type(err).__name__}: {err}"
        return position, frames or None, reason, time.perf_counter() - start


def uncollated(batch: list) -> list:
    """DataLoader collate: the items as they are (frames of different sizes do not stack)."""
    return batch


def frame_loader(frames: ClipFrames, batch_size: int, workers: int):
    """Batches of ``frames`` items, decoded in ``workers`` processes (none: in this one).

    The workers start from a fork server, not as forks of this process: PyAV's scaler keeps a
    thread pool that a forked child inherits without its threads, so a child of a process that
    has already decoded video (curate and caption in one program, a benchmark, a test) hangs on
    its first frame. The server imports this module once; each worker forks from it.
    """
    import multiprocessing

    import torch.utils.data

    context = None
    if workers:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
    return torch.utils.data.DataLoader(frames, batch_size=batch_size, num_workers=workers, collate_fn=uncollated,
                                       prefetch_factor=2 if workers else None, multiprocessing_context=context)


def _chunk_path(state: Path, chunk: int) -> Path:
    return state / f"chunk-{chunk:06d}.json"


class Captioner:
    """One rank's model and loop over its chunks."""

    def __init__(self, cfg: CaptionConfig, clips: list[dict[str, Any]]):
        self.cfg, self.clips = cfg, clips
        self.model = connect(cfg.model, vision=True, device=cfg.device, max_new_tokens=cfg.max_new_tokens,
                             concurrency=cfg.concurrency, api_key_env=cfg.api_key_env, endpoint_model=cfg.endpoint_model)

    def run(self, chunks: list[int], state: Path, rank: int) -> None:
        cfg = self.cfg
        positions = [p for c in chunks for p in range(c * cfg.chunk_size, min((c + 1) * cfg.chunk_size, len(self.clips)))]
        batch = cfg.concurrency if is_url(cfg.model) else cfg.batch_size
        loader = frame_loader(ClipFrames(self.clips, cfg.frames, cfg.frame_size, cfg.fps, positions), batch, cfg.workers)
        pending: dict[int, dict[str, Any]] = {c: {"chunk": c, "captions": {}, "failed": {}, "seconds": {"decode": 0.0, "wait": 0.0, "model": 0.0}} for c in chunks}
        progress = Progress(f"caption (rank {rank})", len(positions), "clips")
        done, waited, generating = 0, 0.0, 0.0
        clock = time.perf_counter()
        for items in loader:
            wait = time.perf_counter() - clock
            ready = [(p, f) for p, f, _, _ in items if f is not None]
            start = time.perf_counter()
            texts = self.model.chat([Request(cfg.instruction, "Describe the video.", f) for _, f in ready]) if ready else []
            spent = time.perf_counter() - start
            captions = dict(zip([p for p, _ in ready], texts))
            for p, frames, reason, decode_seconds in items:
                record = pending[p // cfg.chunk_size]
                record["seconds"]["decode"] += decode_seconds
                record["seconds"]["wait"] += wait / len(items)
                record["seconds"]["model"] += spent / len(items)
                if frames is None:
                    record["failed"][str(p)] = reason
                else:
                    record["captions"][str(p)] = captions[p]
            done += len(items)
            waited, generating = waited + wait, generating + spent
            for chunk in [c for c, r in pending.items() if len(r["captions"]) + len(r["failed"]) == self._size(c)]:
                write_json(_chunk_path(state, chunk), pending.pop(chunk))
            progress.update(done, f"waiting on decode {waited / max(waited + generating, 1e-9):.0%} of the time")
            clock = time.perf_counter()
        assert not pending, f"chunks {sorted(pending)} were not finished"

    def _size(self, chunk: int) -> int:
        return min(self.cfg.chunk_size, len(self.clips) - chunk * self.cfg.chunk_size)


def merge(cfg: CaptionConfig, stages: list[dict], clips: list[dict[str, Any]], state: Path, num_chunks: int, seconds: float) -> dict[str, Any]:
    """Rank 0: the captioned list in the input's order, and the report."""
    missing = [c for c in range(num_chunks) if not _chunk_path(state, c).is_file()]
    if missing:
        raise DataError(f"{len(missing)} chunks of {cfg.out} are unfinished (first: {missing[0]}); rerun the same caption command")
    records = [json.loads(_chunk_path(state, c).read_text()) for c in range(num_chunks)]
    raw = {int(p): text for r in records for p, text in r["captions"].items()}
    failed = {int(p): reason for r in records for p, reason in r["failed"].items()}
    rows, empty = [], 0
    for position, clip in enumerate(clips):
        if position in failed:
            continue
        caption = clean_caption(raw[position])
        if not caption:
            empty += 1
            continue
        words = score_words(clip.get("scores", {}), cfg.score_words)
        row = {**clip, "caption": f"{caption} {words}".strip()}
        if clip.get("caption"):
            row["source_caption"] = clip["caption"]
        rows.append(row)
    totals = {k: sum(r["seconds"][k] for r in records) for k in ("decode", "wait", "model")}
    busy = totals["wait"] + totals["model"]
    report = {
        "clips": len(clips), "captioned": len(rows), "failed": len(failed), "empty_captions": empty,
        "seconds": {k: round(v, 3) for k, v in totals.items()}, "wall_seconds": round(seconds, 2),
        "clips_per_second": round(len(clips) / busy, 3) if busy else None,
        "wait_share": round(totals["wait"] / busy, 3) if busy else None,
        "failures": [{"id": clips[p].get("id", p), "path": clips[p]["path"], "reason": r} for p, r in sorted(failed.items())],
    }
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("input", "out", "device", "api_key_env")}
    stage = {"stage": "caption", "settings": settings, "versions": versions("sora-dist", "transformers", "av"),
             "counts": {k: report[k] for k in ("clips", "captioned", "failed", "empty_captions")}}
    Path(cfg.out).with_suffix(".report.json").write_text(json.dumps(report, indent=1))
    if not rows:
        raise DataError(f"no clip of {cfg.input} got a caption ({len(failed)} failed, {empty} empty): see {Path(cfg.out).with_suffix('.report.json')}")
    write_clip_list(cfg.out, [*stages, stage], rows)
    return report


def run_caption(cfg: CaptionConfig) -> Optional[dict[str, Any]]:
    """Caption on this process's rank (torchrun sets RANK / WORLD_SIZE); rank 0 returns the report."""
    require_extra("curate")
    cfg.validate()
    started = time.monotonic()
    rank, world = join_ranks()
    stages, clips = read_clip_list(cfg.input)
    if not clips:
        raise ConfigError(f"{cfg.input} holds no clips")
    out = Path(cfg.out)
    state = out.with_name(out.name + ".parts")
    state.mkdir(parents=True, exist_ok=True)
    fingerprint = {"clips": [[c["path"], c.get("start_time"), c.get("end_time")] for c in clips],
                   **{k: v for k, v in asdict(cfg).items() if k in ("model", "endpoint_model", "instruction", "frames", "fps", "frame_size", "max_new_tokens", "chunk_size")}}
    check_job(state, fingerprint, rank, record=False)
    num_chunks = math.ceil(len(clips) / cfg.chunk_size)
    mine = [c for c in range(rank, num_chunks, world) if not _chunk_path(state, c).is_file()]
    captioner = Captioner(cfg, clips) if mine else None  # a model that does not load stops the job here
    check_job(state, fingerprint, rank)
    if rank == 0:
        log.info("caption: %d clips in %d chunks over %d ranks; %d chunks left on rank 0, model %s", len(clips), num_chunks, world, len(mine), cfg.model)
    if captioner is not None:
        captioner.run(mine, state, rank)
    barrier()
    report = merge(cfg, stages, clips, state, num_chunks, time.monotonic() - started) if rank == 0 else None
    if report is not None:
        log.info("caption: %d of %d clips captioned (%d failed, %d empty) at %.2f clips/s, waiting on decode %.0f%% of the time -> %s",
                 report["captioned"], report["clips"], report["failed"], report["empty_captions"], report["clips_per_second"] or 0,
                 100 * (report["wait_share"] or 0), out)
    leave_ranks()
    return report
