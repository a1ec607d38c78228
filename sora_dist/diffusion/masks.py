"""Given frames: the latent frames of a sample that are conditions, kept clean (t = 0) and left
out of the loss.

Training draws them per sample with the mask strategy's probabilities (``MaskConfig``), so one
model learns text-to-video, image-to-video, extension forward and backward, connecting two clips
and random given frames. Sampling builds them from the application (``FrameCondition``).
Masks are per patch frame (T' = ceil(T / p_t)), the unit of the DiT's per-frame timesteps; a
given patch frame gives all p_t of its latent frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from sora_dist.config import MaskConfig


def latent_frames(per_frame: torch.Tensor, patch_t: int, num_frames: int) -> torch.Tensor:
    """(B, T') per patch frame -> (B, T) per latent frame (the last patch frame may be partial)."""
    return per_frame.repeat_interleave(patch_t, dim=1)[:, :num_frames]


def broadcast_to_latents(values: torch.Tensor, x: torch.Tensor, patch_t: int) -> torch.Tensor:
    """Per-sample (B,) or per-patch-frame (B, T') values shaped to broadcast against x (B, C, T, h, w)."""
    if values.dim() == 1:
        return values.view(-1, *([1] * (x.dim() - 1)))
    return latent_frames(values, patch_t, x.shape[2])[:, None, :, None, None]


def frame_timesteps(t: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
    """(B,) timesteps -> (B, T'): t on the generated frames, 0 on the given ones."""
    return torch.where(given, torch.zeros_like(t)[:, None], t[:, None])


def masked_mean_per_sample(error: torch.Tensor, given: Optional[torch.Tensor], patch_t: int) -> torch.Tensor:
    """Mean of error (B, C, T, h, w) over each sample's generated frames: (B,)."""
    if given is None:
        return error.flatten(1).mean(dim=1)
    keep = broadcast_to_latents((~given).to(error.dtype), error, patch_t).expand_as(error)
    return (error * keep).flatten(1).sum(dim=1) / keep.flatten(1).sum(dim=1)


def draw_given(cfg: MaskConfig, batch: int, frames: int, generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    """(B, T') bool: the given patch frames of each sample of a batch, drawn with ``generator``
    (the same on every rank of a sequence-parallel group, so they agree). One-frame samples
    (images) get none. Built on the device without a host sync: it runs every micro-step."""
    draws = torch.rand(batch, 2 + frames, generator=generator, device=device)  # choice, k, per-frame coins
    if frames < 2:
        return torch.zeros(batch, frames, dtype=torch.bool, device=device)
    names, probabilities = zip(*cfg.choices().items())
    edges = torch.tensor(probabilities, device=device).cumsum(0)
    choice = torch.searchsorted(edges, draws[:, :1].contiguous(), right=True).clamp(max=len(names) - 1)  # (B, 1)
    max_k = min(frames - 1, max(1, int(cfg.max_given_fraction * frames)))
    k = 1 + (draws[:, 1:2] * max_k).long().clamp(max=max_k - 1)  # (B, 1), 1 <= k <= frames - 1
    pick = (draws[:, 1:2] * frames).long().clamp(max=frames - 1)
    frame = torch.arange(frames, device=device)[None]  # (1, T')
    ends = k.clamp(max=(frames - 1) // 2)  # connect leaves at least one frame between its ends
    coins = draws[:, 2:] < 0.5
    coins &= ~(coins.all(1, keepdim=True) & (frame == pick))  # random frames never give all of them
    by_choice = {
        "text_to_video": torch.zeros_like(coins),
        "image_to_video": frame == 0,
        "extend_forward": frame < k,
        "extend_backward": frame >= frames - k,
        "connect": (frame < ends) | (frame >= frames - ends),
        "random_frames": coins,
    }
    masks = torch.stack([by_choice[name].expand(batch, frames) for name in names])  # (choices, B, T')
    return masks.gather(0, choice[None].expand(1, batch, frames))[0]


class MaskStrategy:
    """Draws given frames for training batches (or none, when every probability is 0)."""

    def __init__(self, cfg: MaskConfig, patch_t: int):
        self.cfg, self.patch_t = cfg, patch_t

    @property
    def enabled(self) -> bool:
        return self.cfg.enabled

    def draw(self, x0: torch.Tensor, generator: Optional[torch.Generator]) -> Optional[torch.Tensor]:
        """(B, T') given patch frames of a batch of latents (B, C, T, h, w), or None if disabled."""
        if not self.enabled:
            return None
        frames = -(-x0.shape[2] // self.patch_t)
        return draw_given(self.cfg, x0.shape[0], frames, generator, x0.device)


@dataclass
class FrameCondition:
    """Given frames at sampling time: their clean latents and which patch frames they are."""

    latents: torch.Tensor
    """(B, C, T, h, w); only the given frames are read."""
    given: torch.Tensor
    """(B, T') bool."""
    patch_t: int

    def keep_given(self, x: torch.Tensor) -> torch.Tensor:
        """x with its given frames replaced by the condition's clean latents."""
        mask = broadcast_to_latents(self.given, x, self.patch_t)
        return torch.where(mask, self.latents.to(x.dtype), x)

    def timesteps(self, t: torch.Tensor) -> torch.Tensor:
        return frame_timesteps(t, self.given)
