"""Clip lists: the JSONL that ``curate`` writes, ``caption`` extends and ``encode`` reads.

The first line is a header, ``{"sora_dist": {"stages": [...]}}``: one entry per stage that
wrote the file (its command, settings and library versions), so every threshold a dataset was
made with travels with it. Every other line is one clip, a span of a source video::

    {"id": "000003-002", "path": "raw/a.mp4", "start_frame": 48, "end_frame": 120,
     "start_time": 2.0, "end_time": 4.958, "fps": 24.0, "width": 1280, "height": 720,
     "frames": 72, "duration": 3.0, "scores": {"motion": 0.031, ...}, "caption": "..."}

``start_frame`` / ``end_frame`` count decoded frames (end exclusive); ``start_time`` /
``end_time`` are the presentation times of the first and last frame, which is what
``read_span`` seeks by, so spans stay exact on any frame rate.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from sora_dist.errors import ConfigError

HEADER_KEY = "sora_dist"


def read_clip_list(path: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(header stages, clip rows) of a clip list; a plain JSONL of path rows has no stages."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: pass the JSONL that sora-dist curate (or caption) wrote")
    stages, rows = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} line {number} is not JSON ({err}): each line must be an object with a path (and caption)") from err
        if not isinstance(row, dict):
            raise ConfigError(f"{path} line {number} is not a JSON object")
        if HEADER_KEY in row:
            stages.extend(row[HEADER_KEY].get("stages", []))
        else:
            rows.append(row)
    return stages, rows


def read_stages(path: str | Path) -> list[dict[str, Any]]:
    """The header's stages of a clip list (its first line); [] for any other input."""
    path = Path(path)
    if path.suffix != ".jsonl" or not path.is_file():
        return []
    with path.open() as f:
        first = f.readline()
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        return []
    return row[HEADER_KEY].get("stages", []) if isinstance(row, dict) and HEADER_KEY in row else []


def write_clip_list(path: str | Path, stages: list[dict[str, Any]], rows: list[dict[str, Any]]) -> Path:
    """Header and rows, written to a temporary file and renamed: a reader never sees half a list."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(json.dumps({HEADER_KEY: {"stages": stages}}) + "\n")
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return path


def write_json(path: Path, value: Any) -> None:
    """A small JSON record, atomically (the unit of resumption of curate and caption)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def versions(*packages: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in packages:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def scaled_size(width: int, height: int, longest: int) -> tuple[int, int]:
    """(width, height) with the longer side at most ``longest``, even sizes, aspect ratio kept."""
    scale = min(1.0, longest / max(width, height))
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def read_still(path: str, longest: Optional[int] = None) -> np.ndarray:
    """An image (a one-frame clip) upright, as uint8 H x W x 3, its longer side at most
    ``longest``. Pillow's errors propagate: callers say what a bad file means to them."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")  # .convert loads: truncation fails here
    if longest:
        image = image.resize(scaled_size(image.width, image.height, longest), Image.Resampling.LANCZOS)
    return np.asarray(image)


def read_span(path: str, start_time: Optional[float] = None, end_time: Optional[float] = None,
              longest: Optional[int] = None) -> Iterator[tuple[float, np.ndarray]]:
    """(presentation time, uint8 H x W x 3 frame) of every frame from ``start_time`` to
    ``end_time`` (inclusive; None: the whole file), scaled so the longer side is at most
    ``longest``. Seeks to the key frame before the span and decodes forward, so a clip in the
    middle of a long video costs only its own frames and a key-frame interval."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps = float(stream.average_rate or stream.guessed_rate or 25)
        slack = 0.5 / fps
        if start_time and stream.time_base:
            container.seek(int(start_time / stream.time_base), stream=stream, backward=True)
        size = None
        for index, frame in enumerate(container.decode(stream)):
            t = frame.time if frame.time is not None else index / fps
            if start_time is not None and t < start_time - slack:
                continue
            if end_time is not None and t > end_time + slack:
                break
            if size is None:
                size = scaled_size(frame.width, frame.height, longest) if longest else (frame.width, frame.height)
            yield t, frame.to_ndarray(width=size[0], height=size[1], format="rgb24")


def sample_span(path: str, start_time: float, end_time: float, count: int, longest: int) -> list[np.ndarray]:
    """``count`` frames spread evenly over a span (the first and last included when count > 1)."""
    span = max(end_time - start_time, 0.0)
    wanted = [start_time + span * i / max(count - 1, 1) for i in range(count)] if count > 1 else [start_time + span / 2]
    frames: list[np.ndarray] = []
    previous = None
    for t, frame in read_span(path, start_time, end_time, longest):
        while len(frames) < count and t >= wanted[len(frames)] - 1e-6:
            frames.append(frame if previous is None or abs(t - wanted[len(frames)]) <= abs(previous[0] - wanted[len(frames)]) else previous[1])
        previous = (t, frame)
        if len(frames) == count:
            break
    while previous is not None and len(frames) < count:
        frames.append(previous[1])
    return frames
