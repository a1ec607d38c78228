"""Reading videos and images for the encoder, and writing clips back out.

- ``list_inputs``: a folder (captions in ``<name>.txt`` beside each file) or a CSV / JSONL
  manifest of ``path, caption`` rows (relative paths resolve against the manifest's folder).
  Clip lists from ``curate`` / ``caption`` (``data.clips``) are such JSONL: their rows also give
  a span of the source (``start_time``, ``end_time``) and scores, which go into each sample.
- ``Bucket`` / ``choose_bucket``: each clip keeps its aspect ratio; it goes to the bucket
  resolution nearest to it in log aspect ratio, with the most frames it can fill at the target fps.
- ``read_clip``: decode (PyAV for video, Pillow for images), sample frames at the target fps,
  resize to cover the bucket and centre-crop. Anything wrong with an input raises ``SkipInput``
  with a reason for the report; it never takes the job down.
- ``write_clip``: uint8 frames to mp4 (H.264 through PyAV) or GIF (Pillow).
"""

from __future__ import annotations

import csv
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np

from sora_dist.data.clips import read_clip_list, read_still
from sora_dist.errors import ConfigError

VIDEO_SUFFIXES = {".mp4", ".webm", ".mov", ".mkv", ".avi"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


class SkipInput(Exception):
    """An input that cannot become a sample; ``kind`` groups the report's counts."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


@dataclass(frozen=True)
class InputItem:
    index: int
    """Position in the job's input list; stable across restarts, so it names the sample."""
    path: str
    caption: str
    span: Optional[tuple[float, float]] = None
    """(start, end) presentation times of the first and last frame to use; None: the whole file."""
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    """What a clip list says about the clip (its id and scores), kept in the sample's metadata."""


CLIP_FIELDS = ("id", "scores", "start_frame", "end_frame")


def _read_rows(manifest: Path) -> list[dict[str, Any]]:
    if manifest.suffix == ".jsonl":  # a plain list, or a clip list with its header
        return read_clip_list(manifest)[1]
    with manifest.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise ConfigError(f"{manifest} needs a header row with a 'path' column (and 'caption')")
        return list(reader)


def list_inputs(source: str | Path) -> list[InputItem]:
    """The job's inputs in a fixed order. Captions may be empty: those inputs are skipped and
    reported as missing a caption, not dropped silently."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES | IMAGE_SUFFIXES)
        items = []
        for i, path in enumerate(files):
            caption_file = path.with_suffix(".txt")
            caption = caption_file.read_text(errors="replace").strip() if caption_file.is_file() else ""
            items.append(InputItem(i, str(path), caption))
        return items
    if source.suffix not in (".csv", ".jsonl") or not source.is_file():
        raise ConfigError(f"encode input {source} must be a folder of videos/images or a .csv / .jsonl file of path, caption rows")
    items = []
    for i, row in enumerate(_read_rows(source)):
        if not isinstance(row, dict) or not row.get("path"):
            raise ConfigError(f"{source} row {i + 1} has no path: {row!r}")
        path = Path(row["path"])
        span = (float(row["start_time"]), float(row["end_time"])) if row.get("end_time") is not None else None
        meta = {f"clip_{k}" if k != "scores" else k: row[k] for k in CLIP_FIELDS if k in row}
        items.append(InputItem(i, str(path if path.is_absolute() else source.parent / path), str(row.get("caption") or "").strip(), span, meta))
    return items


# ---------------------------------------------------------------------------------------------
# Buckets


@dataclass(frozen=True, order=True)
class Bucket:
    frames: int
    height: int
    width: int

    @classmethod
    def parse(cls, text: str) -> "Bucket":
        """'FxHxW', e.g. '33x256x448'."""
        try:
            frames, height, width = (int(part) for part in text.lower().split("x"))
        except ValueError:
            raise ConfigError(f"bucket {text!r} must be FRAMESxHEIGHTxWIDTH, e.g. 33x256x448 (1xHxW for images)") from None
        if min(frames, height, width) < 1:
            raise ConfigError(f"bucket {text!r} must have positive sizes")
        return cls(frames, height, width)

    def __str__(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"


def check_buckets(buckets: list[Bucket], spatial: int, temporal: int, causal: bool) -> None:
    """Every bucket must map to whole latents: H and W divisible by the VAE's spatial factor,
    and for causal video VAEs F = 1 + k * temporal."""
    for b in buckets:
        if b.height % spatial or b.width % spatial:
            raise ConfigError(f"bucket {b}: height and width must be multiples of the VAE's spatial compression {spatial}")
        if causal and (b.frames - 1) % temporal:
            raise ConfigError(f"bucket {b}: this VAE needs 1 + k*{temporal} frames (e.g. {1 + temporal * max(1, (b.frames - 1) // temporal)})")


def choose_bucket(buckets: list[Bucket], width: int, height: int, available_frames: Optional[int]) -> Bucket:
    """Images (``available_frames`` None) take 1-frame buckets, videos the longest multi-frame
    bucket they fill, among the resolutions nearest to their aspect ratio."""
    if available_frames is None:
        fitting = [b for b in buckets if b.frames == 1]
        if not fitting:
            raise SkipInput("no bucket", "an image needs a 1-frame bucket (1xHxW)")
    else:
        videos = [b for b in buckets if b.frames > 1]
        if not videos:
            raise SkipInput("no bucket", "a video needs a bucket of more than one frame")
        fitting = [b for b in videos if b.frames <= available_frames]
        if not fitting:
            raise SkipInput("too short", f"{available_frames} frames at the target fps; the shortest video bucket needs {min(b.frames for b in videos)}")
    ratio = math.log(width / height)
    best = min({(b.height, b.width) for b in fitting}, key=lambda hw: (abs(math.log(hw[1] / hw[0]) - ratio), hw))
    return max(b for b in fitting if (b.height, b.width) == best)


def resize_crop(image, height: int, width: int) -> tuple[np.ndarray, list[int]]:
    """Scale a PIL image to cover (height, width), keeping its aspect ratio, and centre-crop.
    Returns uint8 (H, W, 3) and the crop box [left, top, right, bottom] in the scaled image."""
    from PIL import Image

    scale = max(height / image.height, width / image.width)
    scaled = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(scaled, Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.LANCZOS)
    left, top = (scaled[0] - width) // 2, (scaled[1] - height) // 2
    box = [left, top, left + width, top + height]
    return np.asarray(image.crop(box).convert("RGB")), box


# ---------------------------------------------------------------------------------------------
# Decoding


@dataclass
class Clip:
    frames: np.ndarray
    """uint8 (F, H, W, 3) at the bucket's size."""
    meta: dict[str, Any]


def read_image(path: str, buckets: list[Bucket]) -> Clip:
    from PIL import Image

    try:
        image = Image.fromarray(read_still(path))
    except FileNotFoundError:
        raise SkipInput("missing file", path) from None
    except Exception as err:  # noqa: BLE001 - Pillow raises many types for bad files
        raise SkipInput("unreadable", f"{type(err).__name__}: {err}") from None
    bucket = choose_bucket(buckets, image.width, image.height, None)
    frame, box = resize_crop(image, bucket.height, bucket.width)
    meta = {"source_kind": "image", "source_size": [image.width, image.height], "bucket": str(bucket), "crop": box}
    return Clip(frame[None], meta)


def _video_timing(container, stream) -> tuple[float, float]:
    """(fps, duration in seconds) from the stream's metadata, falling back to the container's."""
    fps = float(stream.average_rate or stream.guessed_rate or 0)
    if stream.duration and stream.time_base:
        duration = float(stream.duration * stream.time_base)
    elif container.duration:
        duration = container.duration / 1_000_000  # microseconds (av.time_base)
    else:
        duration = (stream.frames or 0) / fps if fps else 0.0
    return fps, duration


def read_video(path: str, buckets: list[Bucket], target_fps: Optional[float], span: Optional[tuple[float, float]] = None) -> Clip:
    """Frames at ``target_fps`` (or the source rate, whichever is lower) from the start of the
    clip (or of ``span``, presentation times of its first and last frame), as many as the chosen
    bucket holds."""
    import av
    from PIL import Image

    try:
        container = av.open(path)
    except FileNotFoundError:
        raise SkipInput("missing file", path) from None
    except Exception as err:  # noqa: BLE001 - av raises its own error tree for bad files
        raise SkipInput("unreadable", f"{type(err).__name__}: {err}") from None
    with container:
        if not container.streams.video:
            raise SkipInput("empty", "no video stream (a container written with no frames has none)")
        stream = container.streams.video[0]
        fps, duration = _video_timing(container, stream)
        width, height = stream.codec_context.width, stream.codec_context.height
        if not fps or not width or not height:
            raise SkipInput("unreadable", f"no frame rate or size in the stream (fps {fps}, {width}x{height})")
        rate = min(target_fps, fps) if target_fps else fps
        start = span[0] if span else None
        if span:
            duration = span[1] - span[0] + 1 / fps
            if span[0] > 0 and stream.time_base:
                container.seek(int(span[0] / stream.time_base), stream=stream, backward=True)
        available = int(math.floor(max(0.0, duration - 1 / fps) * rate + 1e-6)) + 1 if duration > 0 else 0
        if available == 0:
            raise SkipInput("empty", "the stream has no duration")
        bucket = choose_bucket(buckets, width, height, available)
        frames, times, box = [], [], None
        try:
            for frame in container.decode(stream):
                t = frame.time if frame.time is not None else len(times) / fps
                if start is not None:
                    if t < start - 0.5 / fps:  # before the span (decoded from the key frame before it)
                        continue
                    t -= start
                if t + 0.5 / fps < len(frames) / rate:  # before the next wanted time: not needed
                    continue
                image, box = resize_crop(Image.fromarray(frame.to_ndarray(format="rgb24")), bucket.height, bucket.width)
                frames.append(image)
                times.append(round(t, 4))
                if len(frames) == bucket.frames:
                    break
        except Exception as err:  # noqa: BLE001 - a broken stream mid-way
            raise SkipInput("unreadable", f"decoding stopped after {len(frames)} frames: {type(err).__name__}: {err}") from None
    if not frames:
        raise SkipInput("empty", "no decodable frames")
    if len(frames) < bucket.frames:
        raise SkipInput("too short", f"{len(frames)} decodable frames at {rate:g} fps; bucket {bucket} needs {bucket.frames}")
    meta = {
        "source_kind": "video", "source_size": [width, height], "source_fps": fps, "source_duration": round(duration, 4),
        **({"span": [span[0], span[1]]} if span else {}),
        "fps": rate, "frame_times": times, "bucket": str(bucket), "crop": box,
    }
    return Clip(np.stack(frames), meta)


def read_clip(path: str, buckets: list[Bucket], target_fps: Optional[float], span: Optional[tuple[float, float]] = None) -> Clip:
    suffix = Path(path).suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return read_image(path, buckets)
    if suffix in VIDEO_SUFFIXES:
        return read_video(path, buckets, target_fps, span)
    raise SkipInput("unsupported", f"{suffix or 'no suffix'}: use one of {sorted(VIDEO_SUFFIXES | IMAGE_SUFFIXES)}")


# ---------------------------------------------------------------------------------------------
# Writing


def _write_mp4(frames: Iterable[np.ndarray], path: Path, fps: float) -> None:
    """Frames as they come (an array, or a generator: a long 4K clip need not fit in memory)."""
    import av

    frames = iter(frames)
    first = next(frames)
    height, width = first.shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=round(fps))
        stream.width, stream.height, stream.pix_fmt = width - width % 2, height - height % 2, "yuv420p"
        for frame in itertools.chain([first], frames):
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame[: stream.height, : stream.width]), format="rgb24")
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_gif(frames: Iterable[np.ndarray], path: Path, fps: float) -> None:
    from PIL import Image

    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)


WRITERS: dict[str, Callable[[Iterable[np.ndarray], Path, float], None]] = {".mp4": _write_mp4, ".gif": _write_gif}


def write_clip(frames: np.ndarray | Iterable[np.ndarray], path: str | Path, fps: float = 8.0) -> Path:
    """uint8 (F, H, W, 3) frames to an .mp4 or .gif file (chosen by the suffix); an .mp4 also
    takes the frames one by one from an iterable."""
    path = Path(path)
    if path.suffix not in WRITERS:
        raise ConfigError(f"{path}: clips are written as {' or '.join(WRITERS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    WRITERS[path.suffix](frames, path, fps)
    return path
