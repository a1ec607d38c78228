"""Small videos with known content, written with PyAV, for the data-engine tests: hard cuts at
known frames, a square moving at a known speed, rendered text, and broken files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

FPS = 24


def write_video(path: Path, frames: np.ndarray, fps: int = FPS, rotate: int = 0) -> Path:
    """uint8 (F, H, W, 3) frames as an H.264 .mp4 at constant rate, near-lossless."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": "10"})
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        if rotate:
            stream.metadata["rotate"] = str(rotate)
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def textured(color: tuple[int, int, int], frames: int, height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    """A still scene: one colour with fixed low-amplitude texture (so it is not a flat frame)."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(-12, 13, size=(height, width, 1))
    scene = np.clip(np.asarray(color)[None, None] + texture, 0, 255).astype(np.uint8)
    return np.repeat(scene[None], frames, axis=0)


def hard_cuts(lengths: list[int], colors: list[tuple[int, int, int]]) -> np.ndarray:
    """Scenes of the given lengths back to back: cuts at the running sums."""
    return np.concatenate([textured(c, n, seed=k) for k, (n, c) in enumerate(zip(lengths, colors))])


def moving_square(speed: float, frames: int = 48, height: int = 64, width: int = 128, side: int = 16, seed: int = 1) -> np.ndarray:
    """A textured square moving right at ``speed`` pixels per frame over a textured background."""
    rng = np.random.default_rng(seed)
    background = rng.integers(20, 60, size=(height, width, 3)).astype(np.uint8)
    patch = rng.integers(150, 255, size=(side, side, 3)).astype(np.uint8)
    out = np.repeat(background[None], frames, axis=0)
    for i in range(frames):
        x = int(round(8 + speed * i)) % (width - side)
        out[i, (height - side) // 2 : (height + side) // 2, x : x + side] = patch
    return out


def text_frames(text: str, frames: int = 48, height: int = 96, width: int = 192) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    image = Image.fromarray(textured((40, 60, 90), 1, height, width)[0])
    ImageDraw.Draw(image).text((10, height - 34), text, fill=(255, 255, 255), font=ImageFont.load_default(size=20))
    return np.repeat(np.asarray(image)[None], frames, axis=0)


def write_audio_only(path: Path) -> Path:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mp2", rate=44100)
        samples = np.zeros((1, 1152 * 8), dtype=np.int16)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = 44100
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def smooth_scene(seed: int, frames: int = 48, height: int = 72, width: int = 128) -> np.ndarray:
    """A slowly drifting low-frequency pattern: what a perceptual hash sees in natural footage."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    grid = rng.integers(0, 255, size=(4, 6, 3)).astype(np.uint8)
    big = np.asarray(Image.fromarray(grid).resize((width + frames, height), Image.Resampling.BICUBIC))
    return np.stack([big[:, i : i + width] for i in range(frames)])


def resized(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.Resampling.LANCZOS)) for f in frames])


def write_variable_rate(path: Path, frames: np.ndarray) -> Path:
    """Frames shown for 20 ms and 60 ms in turn: a variable-frame-rate file (phones write these)."""
    from fractions import Fraction

    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        pts = 0
        for i, frame in enumerate(frames):
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            video_frame.pts, video_frame.time_base = pts, Fraction(1, 1000)
            pts += 20 if i % 2 else 60
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
