"""A synthetic latent dataset a small model can visibly learn: coloured Gaussian blobs that move
across the frame, with captions that say which colour, size and direction.

Images (T = 1) and clips of several durations, sizes and aspect ratios are mixed, like a real
video dataset. Two colour-direction pairs never occur (``HELD_OUT``), so that a prompt naming one
tests whether the model composes words it saw only apart. Channels 0-2 of a latent hold the blob's colour (shown as RGB by
``sora_dist.visualize``), channel 3 its brightness. Text embeddings are a fixed random vector per
word (a stand-in text encoder), so captions are deterministic and compositional.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np

from sora_dist.data.format import Sample
from sora_dist.data.writer import ShardWriter

log = logging.getLogger(__name__)

COLORS = {
    "red": (1.0, -0.6, -0.6),
    "green": (-0.6, 1.0, -0.6),
    "blue": (-0.6, -0.6, 1.0),
    "yellow": (1.0, 1.0, -0.6),
    "cyan": (-0.6, 1.0, 1.0),
    "magenta": (1.0, -0.6, 1.0),
}
SIZES = {"small": 1.5, "large": 2.8}
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
# Latent (T, h, w): images and clips, square and both aspect ratios.
SHAPES = ((1, 16, 16), (1, 12, 20), (1, 20, 12), (8, 16, 16), (8, 12, 20), (4, 16, 16))
TEXT_DIM = 32
LATENT_CHANNELS = 4
VOCAB = ["a", "blob", "moving", "still", *SIZES, *COLORS, *DIRECTIONS]
HELD_OUT = {("red", "left"), ("cyan", "down")}  # (colour, direction) pairs no sample has


def _word_table() -> np.ndarray:
    return np.random.default_rng(1234).standard_normal((len(VOCAB), TEXT_DIM)).astype(np.float32)


def embed_caption(caption: str) -> np.ndarray:
    """(L, TEXT_DIM) float16 embedding of a caption made of VOCAB words."""
    table = _word_table()
    ids = [VOCAB.index(word) for word in caption.split()]
    position = np.arange(len(ids))[:, None] / 8.0
    return (table[ids] + 0.1 * np.sin(position + np.arange(TEXT_DIM)[None] / 4.0)).astype(np.float16)


def render(color: str, size: str, direction: str | None, shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """(C, T, h, w) latent of one blob, still (direction None) or moving up to a pixel per frame."""
    t_len, height, width = shape
    sigma = SIZES[size]
    dy, dx = DIRECTIONS[direction] if direction else (0, 0)
    margin = sigma + 1
    if direction and t_len > 1:  # at most one pixel per frame, slower where the frame is short
        extent = height if dy else width
        speed = min(1.0, (extent - 1 - 2 * margin) / (t_len - 1))
        dy, dx = dy * speed, dx * speed
    # Start so that the whole path stays inside the frame.
    cy = rng.uniform(margin + max(0, -dy) * (t_len - 1), height - 1 - margin - max(0, dy) * (t_len - 1))
    cx = rng.uniform(margin + max(0, -dx) * (t_len - 1), width - 1 - margin - max(0, dx) * (t_len - 1))
    ys, xs = np.mgrid[0:height, 0:width]
    latent = np.zeros((LATENT_CHANNELS, t_len, height, width), dtype=np.float32)
    for frame in range(t_len):
        y, x = cy + dy * frame, cx + dx * frame
        blob = np.exp(-((ys - y) ** 2 + (xs - x) ** 2) / (2 * sigma**2))
        latent[:3, frame] = np.asarray(COLORS[color])[:, None, None] * blob
        latent[3, frame] = blob
    latent += rng.normal(0, 0.02, latent.shape)
    return latent.astype(np.float16)


def caption_for(color: str, size: str, direction: str | None) -> str:
    return f"a {size} {color} blob moving {direction}" if direction else f"a {size} {color} blob still"


def make_synthetic(out_dir: str | Path, num_samples: int = 768, seed: int = 0, samples_per_shard: int = 64) -> Path:
    """Write ``num_samples`` blob samples as shards plus manifest into ``out_dir``."""
    rng = np.random.default_rng(seed)
    with ShardWriter(
        out_dir,
        samples_per_shard=samples_per_shard,
        vae="synthetic-blobs",
        text_encoder="synthetic-bag-of-words",
        compression={"temporal": 4, "spatial": 8},
    ) as writer:
        for index in range(num_samples):
            shape = SHAPES[rng.integers(len(SHAPES))]
            color = list(COLORS)[rng.integers(len(COLORS))]
            size = list(SIZES)[rng.integers(len(SIZES))]
            direction = None if shape[0] == 1 else list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
            while (color, direction) in HELD_OUT:
                direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
            caption = caption_for(color, size, direction)
            meta = {
                "caption": caption,
                "kind": "image" if shape[0] == 1 else "video",
                "source": {"frames": 1 if shape[0] == 1 else 4 * shape[0], "fps": 24, "height": 8 * shape[1], "width": 8 * shape[2]},
            }
            writer.write(Sample(key=f"blob{index:07d}", latent=render(color, size, direction, shape, rng), text=embed_caption(caption), meta=meta))
    log.info("wrote %d synthetic samples to %s", num_samples, out_dir)
    return Path(out_dir)


# Measuring a blob: where it is in each frame, which way it went and how fast.

BRIGHTNESS_FLOOR = 0.15  # channel 3 below this is background


def centroids(clip: np.ndarray) -> np.ndarray:
    """(T, 2) brightness centroid (y, x) of every frame of a (C, T, h, w) latent; NaN where no
    pixel rises above the floor."""
    weights = np.clip(clip[3] - BRIGHTNESS_FLOOR, 0, None)  # (T, h, w)
    ys, xs = np.mgrid[0 : clip.shape[2], 0 : clip.shape[3]]
    total = weights.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.stack([(weights * ys).sum(axis=(1, 2)) / total, (weights * xs).sum(axis=(1, 2)) / total], axis=1)


def direction_of(displacement: np.ndarray) -> Optional[str]:
    """The nearest of the four directions to a (dy, dx) displacement; None if it is not finite."""
    if not np.isfinite(displacement).all() or not np.abs(displacement).sum():
        return None
    return max(DIRECTIONS, key=lambda d: float(np.dot(DIRECTIONS[d], displacement)))


def colour_of(clip: np.ndarray) -> str:
    """The caption colour nearest (by cosine) to the blob's brightness-weighted mean of channels 0-2."""
    weights = np.clip(clip[3] - BRIGHTNESS_FLOOR, 0, None)
    mean = (clip[:3] * weights).sum(axis=(1, 2, 3)) / max(weights.sum(), 1e-8)
    return max(COLORS, key=lambda c: float(np.dot(COLORS[c], mean) / (np.linalg.norm(COLORS[c]) * np.linalg.norm(mean) + 1e-8)))


def speed_along(track: np.ndarray, direction: str) -> float:
    """Mean displacement per frame along ``direction`` over a (k, 2) centroid track."""
    steps = np.diff(track, axis=0) @ np.asarray(DIRECTIONS[direction], dtype=float)
    return float(np.nanmean(steps)) if len(steps) else float("nan")


def motion_of(clip: np.ndarray, caption: str) -> dict:
    """A clip's measured motion against its caption: the direction the caption names, the
    direction the blob went (first to last frame) and its speed along the captioned direction."""
    captioned = next((word for word in caption.split() if word in DIRECTIONS), None)
    track = centroids(clip)
    return {"captioned": captioned, "direction": direction_of(track[-1] - track[0]),
            "speed": speed_along(track, captioned) if captioned else float("nan")}
