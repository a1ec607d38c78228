"""What ``sora-dist sample`` is asked for, as text states, a latent shape and given frames.

Every application is a choice of given frames (DESIGN.md), exactly as the mask strategy trained
them: text-to-video and text-to-image give none; image-to-video gives the first frame;
extending forward gives the last K frames of a clip as the first frames of the new one, and
backward its first K as the last; connecting gives the end of one clip and the start of
another; editing (SDEdit) gives none but starts from the clip noised to a strength.

Inputs are latents (``.npy``, C x T x h x w or C x h x w, as the dataset stores them) or media
files, which go through the dataset's VAE after the same resize and centre crop as ``encode``.
Prompts go through the dataset's text encoder, named in its manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from sora_dist.data.format import Manifest
from sora_dist.data.media import IMAGE_SUFFIXES, Bucket, SkipInput, read_clip
from sora_dist.data.synthetic import VOCAB, embed_caption
from sora_dist.diffusion.masks import FrameCondition
from sora_dist.errors import ConfigError

SYNTHETIC_TEXT_ENCODER = "synthetic-bag-of-words"
LATENT_ONLY_VAES = ("", "synthetic-blobs")  # datasets whose latents no VAE decodes


# ---------------------------------------------------------------------------------------------
# Prompts


def encode_prompt(manifest: Manifest, prompt: str, text_encoder: str, text_dim: int, device: torch.device) -> np.ndarray:
    """(L, D) text states of ``prompt`` from the dataset's text encoder (``text_encoder``
    overrides the one its manifest names)."""
    name = text_encoder or manifest.text_encoder
    if name == SYNTHETIC_TEXT_ENCODER:
        unknown = [word for word in prompt.split() if word not in VOCAB]
        if unknown or not prompt.split():
            raise ConfigError(f"prompt {prompt!r}: the synthetic text encoder knows only the words {' '.join(VOCAB)} (unknown: {unknown})")
        states = embed_caption(prompt)
    else:
        states = _transformers_states(manifest, prompt, name, overridden=bool(text_encoder), device=device)
    if states.shape[1] != text_dim:
        raise ConfigError(f"text encoder {name!r} gives {states.shape[1]}-wide states; the model was trained on {text_dim}: pass the dataset's encoder with --text-encoder")
    return states.astype(np.float32)


def _transformers_states(manifest: Manifest, prompt: str, name: str, overridden: bool, device: torch.device) -> np.ndarray:
    from sora_dist.data.encoders import TextEncoder

    if not name:
        raise ConfigError("the dataset's manifest names no text encoder: pass one (local folder or hub name) with --text-encoder")
    subfolder, tokenizer = ("", "") if overridden else (manifest.text_encoder_subfolder, manifest.tokenizer_subfolder)
    try:
        encoder = TextEncoder(name, subfolder, tokenizer, manifest.max_text_length or 256, device)
    except ConfigError as err:
        source = "--text-encoder" if overridden else "the dataset's manifest"
        raise ConfigError(f"text encoder {name!r} (from {source}) could not be loaded ({err}); pass a local folder or hub name "
                          "holding the dataset's encoder and tokenizer with --text-encoder") from err
    states, _ = encoder.encode([prompt])[0]
    return states.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Inputs


class MediaInputs:
    """Reads input clips and images as normalized latents (C, T, h, w) on the CPU."""

    def __init__(self, manifest: Manifest, in_channels: int, vae: str, vae_subfolder: str, device: torch.device):
        self.manifest, self.in_channels, self.device = manifest, in_channels, device
        self.vae_name = vae or manifest.vae
        self.vae_subfolder = vae_subfolder if vae else manifest.vae_subfolder
        self._vae = None

    @property
    def vae(self):
        """The dataset's VAE, loaded on first use; None for latent-only datasets."""
        if self._vae is None and self.vae_name not in LATENT_ONLY_VAES:
            from sora_dist.data.encoders import VideoVAE

            self._vae = VideoVAE(self.vae_name, self.vae_subfolder, self.device)
        return self._vae

    def read(self, path: str, frames: Optional[int], size: Optional[tuple[int, int]], what: str) -> torch.Tensor:
        """A latent of ``path`` with at least ``frames`` frames (None: any) at latent ``size``
        (None: its own). A .npy gives all its frames; a video file its first ``frames``."""
        latent = self._read_npy(path, what) if path.endswith(".npy") else self._read_media(path, frames, size, what)
        if frames is not None and latent.shape[1] < frames:
            raise ConfigError(f"{what} {path} has {latent.shape[1]} latent frames; {frames} are needed: pass a longer clip or lower --context")
        if size is not None and tuple(latent.shape[2:]) != tuple(size):
            raise ConfigError(f"{what} {path} is {latent.shape[2]}x{latent.shape[3]} latent pixels; the clip to sample is {size[0]}x{size[1]}: "
                              "pass inputs of one size (or --size to match)")
        return latent

    def _read_npy(self, path: str, what: str) -> torch.Tensor:
        try:
            latent = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ConfigError(f"{what} {path} could not be read as a latent .npy: {err}") from err
        if latent.ndim == 3:
            latent = latent[:, None]
        if latent.ndim != 4 or latent.shape[0] != self.in_channels:
            raise ConfigError(f"{what} {path} has shape {list(latent.shape)}; the model takes latents of {self.in_channels} channels, "
                              "C x T x h x w (or C x h x w for an image), as the dataset stores them")
        return torch.from_numpy(latent.astype(np.float32))

    def _read_media(self, path: str, frames: Optional[int], size: Optional[tuple[int, int]], what: str) -> torch.Tensor:
        if self.vae is None:
            raise ConfigError(f"{what} {path}: this dataset's latents ({self.vae_name or 'no VAE'}) have no VAE to encode media with: "
                              "pass a latent .npy, or the dataset's VAE with --vae")
        if size is None:
            raise ConfigError(f"{what} {path}: give the latent size to sample with --size H W")
        image = Path(path).suffix.lower() in IMAGE_SUFFIXES
        pixel_frames = 1 if image else self._pixel_frames(frames or 1)
        bucket = Bucket(pixel_frames, size[0] * self.vae.spatial, size[1] * self.vae.spatial)
        try:
            clip = read_clip(path, [bucket], target_fps=None)
        except SkipInput as err:
            raise ConfigError(f"{what} {path} cannot be used: {err}") from err
        return torch.from_numpy(self.vae.encode(clip.frames).astype(np.float32))

    def _pixel_frames(self, latent_frames: int) -> int:
        return 1 + (latent_frames - 1) * self.vae.temporal if self.vae.is_video else latent_frames


# ---------------------------------------------------------------------------------------------
# Requests


@dataclass
class Request:
    """A latent clip to sample: its shape and what of it is given."""

    application: str
    shape: tuple[int, int, int]
    """Latent (T, h, w)."""
    given_latents: Optional[torch.Tensor] = None
    """(C, T, h, w) clean latents, read on the given frames only; or (N, C, T, h, w), one per sample."""
    given_frames: Optional[torch.Tensor] = None
    """(T,) bool: the given latent frames."""
    init: Optional[torch.Tensor] = None
    """(C, T, h, w) clip to edit."""
    strength: float = 1.0

    def condition(self, num: int, patch_t: int, device: torch.device) -> Optional[FrameCondition]:
        """The given frames as a FrameCondition for ``num`` samples, per patch frame."""
        if self.given_frames is None:
            return None
        padded = -(-len(self.given_frames) // patch_t) * patch_t
        per_patch = torch.nn.functional.pad(self.given_frames, (0, padded - len(self.given_frames)), value=True).view(-1, patch_t)
        if not (per_patch.all(1) | ~per_patch.any(1)).all():
            raise ConfigError(f"with model.patch_size[0]={patch_t}, given frames must fill whole patches of {patch_t} latent frames: "
                              f"use --frames and --context that are multiples of {patch_t}")
        given = per_patch.all(1)[None].expand(num, -1).to(device)
        return FrameCondition(per_sample(self.given_latents, num).to(device), given, patch_t)


def per_sample(latents: torch.Tensor, num: int) -> torch.Tensor:
    """(C, T, h, w) shared by ``num`` samples, or (num, C, T, h, w) already one each."""
    if latents.dim() == 5:
        assert latents.shape[0] == num, f"{latents.shape[0]} given clips for {num} samples"
        return latents
    return latents[None].expand(num, -1, -1, -1, -1)


def _placed(pieces: list[tuple[int, torch.Tensor]], frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean latents of ``frames`` frames holding each (start, clip) piece, and the given mask."""
    channels, _, h, w = pieces[0][1].shape
    latents, given = torch.zeros(channels, frames, h, w), torch.zeros(frames, dtype=torch.bool)
    for start, clip in pieces:
        latents[:, start : start + clip.shape[1]] = clip
        given[start : start + clip.shape[1]] = True
    return latents, given


def image_to_video(image: torch.Tensor, frames: int) -> Request:
    """A ``frames``-frame clip whose first frame is ``image`` (C, 1, h, w)."""
    latents, given = _placed([(0, image)], frames)
    return Request("image_to_video", (frames, *image.shape[2:]), latents, given)


def build_request(args, inputs: MediaInputs, default_shape: tuple[int, int, int]) -> Request:
    """The Request of parsed ``sora-dist sample`` arguments (one application at a time)."""
    chosen = [name for name in ("image", "extend", "connect", "edit") if getattr(args, name)]
    if len(chosen) > 1:
        raise ConfigError(f"choose one application at a time; got --{' and --'.join(chosen)}")
    frames = args.frames or default_shape[0]
    size = tuple(args.size) if args.size else None
    if not chosen:
        shape = (frames, *(size or default_shape[1:]))
        return Request("text_to_image" if frames == 1 else "text_to_video", shape)
    if args.edit:
        if not 0 < args.strength <= 1:
            raise ConfigError(f"--strength {args.strength} must be in (0, 1]: the fraction of the schedule to re-run (1 starts from noise)")
        clip = inputs.read(args.edit, None if args.edit.endswith(".npy") else frames, size, "--edit clip")
        return Request("edit", tuple(clip.shape[1:]), init=clip, strength=args.strength)
    if args.image:
        return image_to_video(inputs.read(args.image, 1, size, "--image")[:, :1], frames)
    context = args.context or None
    if args.extend:
        clip = inputs.read(args.extend, context or (None if args.extend.endswith(".npy") else max(1, frames // 2)), size, "--extend clip")
        clip = clip if context is None else clip[:, -context:] if args.direction == "forward" else clip[:, :context]
        total = clip.shape[1] + frames
        start = 0 if args.direction == "forward" else frames
        latents, given = _placed([(start, clip)], total)
        return Request(f"extend_{args.direction}", (total, *clip.shape[2:]), latents, given)
    first, second = (inputs.read(path, context or (None if path.endswith(".npy") else 1), size, "--connect clip") for path in args.connect)
    if first.shape[2:] != second.shape[2:]:
        raise ConfigError(f"--connect clips differ in size: {list(first.shape[2:])} and {list(second.shape[2:])} latent pixels; pass clips of one size")
    head, tail = (first, second) if context is None else (first[:, -context:], second[:, :context])
    total = head.shape[1] + frames + tail.shape[1]
    latents, given = _placed([(0, head), (head.shape[1] + frames, tail)], total)
    return Request("connect", (total, *head.shape[2:]), latents, given)
