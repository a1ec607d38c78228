"""The shard format of pre-encoded latents (see DESIGN.md), and its validation.

A dataset is a folder of ``shard-NNNNNN.tar`` files plus ``manifest.json``. Each sample is
``<key>.latent.npy`` (float16, C x T x h x w), ``<key>.text.npy`` (float16, L x D), optionally
``<key>.pooled.npy`` (float16, D_pooled), and ``<key>.json``. Only numpy (never pickled) and
JSON are decoded, so untrusted shards cannot run code.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from sora_dist.errors import CorruptSampleError, DataError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
EMPTY_CAPTION = "empty_caption.npy"
"""The text encoder's states for the empty prompt, beside the manifest (Manifest.empty_caption)."""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def shape_key(shape: tuple[int, ...]) -> str:
    """'TxHxW' label of a latent's (T, h, w), used in the manifest's shape histogram."""
    return "x".join(str(s) for s in shape)


@dataclass
class Manifest:
    latent_channels: int
    """Channels C of every latent."""
    text_dim: int
    """Width D of the text-encoder hidden states."""
    shards: list[dict[str, Any]]
    """[{"name": "shard-000000.tar", "samples": 64}, ...]"""
    shapes: dict[str, int]
    """Histogram of latent (T, h, w) as 'TxHxW' -> count, for shape buckets."""
    scaling_factor: float = 1.0
    """Latents were multiplied by this after encoding (the VAE's scaling factor)."""
    shift_factor: float = 0.0
    """Latents had this subtracted before scaling (some VAEs have one)."""
    latents_mean: list[float] = field(default_factory=list)
    """Per-channel mean subtracted before scaling, for VAEs normalized per channel (Wan); empty if none."""
    latents_std: list[float] = field(default_factory=list)
    """Per-channel std the latents were divided by, with ``latents_mean``; empty if none."""
    vae: str = ""
    """Name or path of the VAE that encoded the latents."""
    vae_subfolder: str = ""
    """Subfolder of ``vae`` holding it (e.g. 'vae' inside a pipeline repository)."""
    text_encoder: str = ""
    """Name or path of the text encoder; ``sora-dist sample --prompt`` loads it from here."""
    text_encoder_subfolder: str = ""
    """Subfolder of ``text_encoder`` holding the model."""
    tokenizer_subfolder: str = ""
    """Subfolder holding the tokenizer; empty means the model's."""
    max_text_length: int = 0
    """Captions were truncated to this many tokens; 0 where the writer did not say."""
    empty_caption: str = ""
    """File in the dataset folder holding the text encoder's states for the empty prompt, (L, D)
    float16 (``EMPTY_CAPTION``); empty where the writer did not record it."""
    compression: dict[str, int] = field(default_factory=lambda: {"temporal": 1, "spatial": 1})
    """Pixel-to-latent compression of the VAE."""
    curation: list[dict[str, Any]] = field(default_factory=list)
    """The stages (``curate``, ``caption``: settings, versions, counts) of the clip list the data
    was encoded from; each sample's metadata holds its clip's id and scores."""
    format_version: int = FORMAT_VERSION

    @property
    def num_samples(self) -> int:
        return sum(s["samples"] for s in self.shards)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def read_manifest(root: str | Path) -> Manifest:
    """Load and check ``root/manifest.json`` and that every listed shard exists."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"dataset folder {root} does not exist: set data.path to a folder of shards, "
            f"or create one with `sora-dist make-synthetic --out {root}`"
        )
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{path} is missing: every dataset folder needs the manifest its writer produces")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not valid JSON ({err}); rewrite it with the shard writer") from err
    if not isinstance(raw, dict):
        raise DataError(f"{path} must hold a JSON object")
    required = ("latent_channels", "text_dim", "shards", "shapes")
    missing = [key for key in required if key not in raw]
    if missing:
        raise DataError(f"{path} lacks the keys {missing}; it was not written by sora_dist's shard writer")
    unknown = set(raw) - set(Manifest.__dataclass_fields__)
    if unknown:
        raise DataError(f"{path} has unknown keys {sorted(unknown)}")
    manifest = Manifest(**raw)
    if manifest.format_version != FORMAT_VERSION:
        raise DataError(f"{path} has format_version {manifest.format_version}; this sora_dist reads {FORMAT_VERSION}")
    if not manifest.shards:
        raise DataError(f"{path} lists no shards")
    for shard in manifest.shards:
        if not (root / shard["name"]).is_file():
            raise DataError(f"{path} lists {shard['name']}, but {root / shard['name']} is missing")
    if sum(manifest.shapes.values()) != manifest.num_samples:
        raise DataError(
            f"{path} is inconsistent: its shape histogram counts {sum(manifest.shapes.values())} samples "
            f"but its shards hold {manifest.num_samples}"
        )
    return manifest


# ---------------------------------------------------------------------------------------------
# One sample


@dataclass
class Sample:
    key: str
    latent: np.ndarray
    """float16 (C, T, h, w)."""
    text: np.ndarray
    """float16 (L, D)."""
    meta: dict[str, Any]
    pooled: Optional[np.ndarray] = None
    uid: int = -1
    """Position in the dataset (manifest shard order, then order inside the shard); set by the reader."""


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float16), allow_pickle=False)
    return buffer.getvalue()


def encode_sample(sample: Sample) -> dict[str, bytes]:
    """Tar members of one sample, keyed by extension."""
    if "." in sample.key:
        raise DataError(f"sample key {sample.key!r} must not contain '.': webdataset splits names at the first dot")
    meta = dict(sample.meta, latent_shape=list(sample.latent.shape), text_len=int(sample.text.shape[0]))
    members = {
        "latent.npy": _npy_bytes(sample.latent),
        "text.npy": _npy_bytes(sample.text),
        "json": json.dumps(meta).encode(),
    }
    if sample.pooled is not None:
        members["pooled.npy"] = _npy_bytes(sample.pooled)
    return members


def _load_npy(raw: dict[str, Any], name: str, where: str, ndim: int) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(raw[name]), allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - any parse failure means a corrupt member
        raise CorruptSampleError(f"{where}: {name} is not a readable .npy ({type(err).__name__}: {err})") from err
    if array.dtype != np.float16 or array.ndim != ndim:
        raise CorruptSampleError(f"{where}: {name} must be float16 with {ndim} dims, got {array.dtype} {array.shape}")
    if not np.isfinite(array).all():
        raise CorruptSampleError(f"{where}: {name} holds NaN or inf")
    return array


def decode_sample(raw: dict[str, Any]) -> Sample:
    """Check and decode the members webdataset grouped for one key."""
    key = raw.get("__key__", "?")
    where = f"{raw.get('__url__', '?')} sample {key}"
    absent = [name for name in ("latent.npy", "text.npy", "json") if name not in raw]
    if absent:
        raise CorruptSampleError(f"{where}: missing members {absent}")
    try:
        meta = json.loads(raw["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptSampleError(f"{where}: json is not valid JSON ({err})") from err
    latent = _load_npy(raw, "latent.npy", where, ndim=4)
    text = _load_npy(raw, "text.npy", where, ndim=2)
    if list(latent.shape) != meta.get("latent_shape"):
        raise CorruptSampleError(f"{where}: latent shape {list(latent.shape)} disagrees with its json {meta.get('latent_shape')}")
    pooled = _load_npy(raw, "pooled.npy", where, ndim=1) if "pooled.npy" in raw else None
    return Sample(key=key, latent=latent, text=text, meta=meta, pooled=pooled)
