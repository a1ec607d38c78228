"""What ``curate`` measures on decoded frames: scene cuts, motion, brightness, sharpness, text area,
an aesthetic score and a perceptual hash. Every function takes uint8 RGB frames (H, W, 3) at the
analysis size, so scores are comparable across sources of any resolution.

- Cuts: the mean absolute RGB change between consecutive frames, on every frame. A frame starts
  a new scene when its change passes an absolute threshold *and* is ``ratio`` times the mean
  change around it, so a fast pan (uniformly high change) is not cut, a hard cut is.
- Motion: dense optical flow (OpenCV Farnebäck) between a sampled frame and the next one, mean
  magnitude; curate reports the median over a clip's samples as frame widths per second.
- Text area: the share of the frame covered by text boxes of a PP-OCRv4 text detector
  (``rapidocr-onnxruntime``, whose weights install with the package).
- Aesthetic: a CLIP image embedding through a user-supplied head of linear layers (LAION's
  improved aesthetic predictor has that form).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from sora_dist.errors import ConfigError


def frame_change(previous: np.ndarray, frame: np.ndarray) -> float:
    """Mean absolute RGB difference, 0..255."""
    return float(np.abs(frame.astype(np.int16) - previous.astype(np.int16)).mean())


def find_cuts(changes: np.ndarray, threshold: float, ratio: float, min_gap: int, window: int = 8) -> list[int]:
    """Frames that start a new scene. ``changes[i]`` is the change from frame i-1 to frame i."""
    cuts: list[int] = []
    last = 0
    for i in range(1, len(changes)):
        if changes[i] < threshold or i - last < min_gap:
            continue
        around = np.concatenate([changes[max(1, i - window) : i], changes[i + 1 : i + 1 + window]])
        if around.size and changes[i] < ratio * around.mean():
            continue
        cuts.append(i)
        last = i
    return cuts


def _gray(frame: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)


def flow_magnitude(first: np.ndarray, second: np.ndarray) -> float:
    """Mean dense optical-flow magnitude (OpenCV Farnebäck) from one frame to the next, pixels."""
    import cv2

    flow = cv2.calcOpticalFlowFarneback(_gray(first), _gray(second), None, 0.5, 3, 15, 3, 5, 1.2, 0)
    return float(np.linalg.norm(flow, axis=-1).mean())


def brightness(frame: np.ndarray) -> float:
    """Mean luma, 0..1."""
    return float(_gray(frame).mean()) / 255.0


def sharpness(frame: np.ndarray) -> float:
    """Variance of the Laplacian of the luma (higher is sharper)."""
    import cv2

    return float(cv2.Laplacian(_gray(frame), cv2.CV_64F).var())


def to_jpeg(frame: np.ndarray, quality: int = 95) -> bytes:
    import cv2

    return cv2.imencode(".jpg", frame[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


def from_jpeg(data: bytes) -> np.ndarray:
    import cv2

    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[..., ::-1].copy()


def perceptual_hash(frame: np.ndarray) -> int:
    """64-bit DCT hash: the 8x8 lowest frequencies of a 32x32 luma, each above or below their median."""
    import cv2

    small = cv2.resize(_gray(frame), (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8].flatten()
    bits = low > np.median(low[1:])
    return int("".join("1" if b else "0" for b in bits), 2)


def hash_distance(a: list[int], b: list[int]) -> int:
    return sum(bin(x ^ y).count("1") for x, y in zip(a, b))


def near_duplicates(hashes: list[list[int]], max_distance: int) -> dict[int, int]:
    """{later index: earlier index it duplicates} for hash lists within ``max_distance`` bits.
    Exact without comparing all pairs: split the bits into max_distance + 1 bands; two hashes
    that close agree on at least one whole band (pigeonhole), so only band-mates are compared."""
    if not hashes:
        return {}
    bits = 64 * len(hashes[0])
    bands = max_distance + 1
    edges = [round(bits * k / bands) for k in range(bands + 1)]
    buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
    duplicates: dict[int, int] = {}
    for index, value in enumerate(hashes):
        joined = 0
        for h in value:
            joined = (joined << 64) | h
        keys = [(band, (joined >> (bits - edges[band + 1])) & ((1 << (edges[band + 1] - edges[band])) - 1)) for band in range(bands)]
        candidates = sorted({other for key in keys for other in buckets[key]})
        match = next((other for other in candidates if hash_distance(hashes[other], value) <= max_distance), None)
        if match is not None:
            duplicates[index] = match
            continue
        for key in keys:
            buckets[key].append(index)
    return duplicates


class TextDetector:
    """Share of a frame covered by detected text (PP-OCRv4 detection through rapidocr)."""

    def __init__(self):
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as err:  # not installed, or OpenCV's GUI build without libGL
            raise ConfigError(f"text-area scoring needs rapidocr-onnxruntime and OpenCV ({err}): pip install 'sora-dist[curate]' "
                              "(and apt-get install libgl1 on slim images), or pass --no-text-area") from None
        # At most the frame's own size: the detector's default upscales to 736 px (40x slower here).
        self.engine = RapidOCR(det_limit_type="max", det_limit_side_len=736)

    def area(self, frame: np.ndarray) -> float:
        boxes, _ = self.engine(frame, use_det=True, use_cls=False, use_rec=False)
        total = 0.0
        for box in boxes or []:
            x, y = np.asarray(box, dtype=np.float64).T
            total += 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
        return min(1.0, total / (frame.shape[0] * frame.shape[1]))


class AestheticScorer:
    """CLIP image embedding (transformers, local folder or hub name), L2-normalized, through a head
    of linear layers read from a .safetensors / .pt state dict and applied in key order."""

    def __init__(self, clip: str, head: str, device: str = "cpu"):
        import torch
        from transformers import AutoImageProcessor, CLIPVisionModelWithProjection

        try:  # the vision half of a CLIP checkpoint, with its projection
            self.model = CLIPVisionModelWithProjection.from_pretrained(clip).to(device).eval()
            self.processor = AutoImageProcessor.from_pretrained(clip)
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"--aesthetic-clip {clip!r} could not be loaded as a CLIP model: {first}") from None
        self.head = self._read_head(Path(head)).to(device).eval()
        self.device, self.torch = device, torch

    @staticmethod
    def _read_head(path: Path):
        import torch

        if not path.is_file():
            raise ConfigError(f"--aesthetic-head {path} does not exist: a .safetensors or .pt state dict of linear layers")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        weights = [k for k in state if k.endswith("weight")]
        order = sorted(weights, key=lambda k: [int(p) if p.isdigit() else p for p in k.split(".")])
        layers = []
        for key in order:
            weight = state[key]
            layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=key[: -len("weight")] + "bias" in state)
            layer.weight.data.copy_(weight)
            if layer.bias is not None:
                layer.bias.data.copy_(state[key[: -len("weight")] + "bias"])
            layers.append(layer)
        if not layers or layers[-1].out_features != 1:
            raise ConfigError(f"--aesthetic-head {path}: expected linear layers ending in one output, got {[tuple(state[k].shape) for k in order]}")
        return torch.nn.Sequential(*layers)

    def score(self, frames: list[np.ndarray]) -> float:
        """Mean score over the frames."""
        with self.torch.no_grad():
            inputs = self.processor(images=frames, return_tensors="pt").to(self.device)
            features = self.model(**inputs).image_embeds
            features = features / features.norm(dim=-1, keepdim=True)
            if features.shape[-1] != self.head[0].in_features:
                raise ConfigError(f"the aesthetic head takes {self.head[0].in_features} features; the CLIP model gives {features.shape[-1]}")
            return float(self.head(features.float()).mean())
