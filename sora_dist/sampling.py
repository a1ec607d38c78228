"""Sampling clips from a trained model: the end-of-run report and ``sora-dist sample``."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from sora_dist.config import Config
from sora_dist.data.format import Manifest
from sora_dist.data.loader import LatentLoader
from sora_dist.data.synthetic import embed_caption
from sora_dist.diffusion import guided, sample
from sora_dist.errors import DataError
from sora_dist.visualize import save_frame_grid, save_loss_plot

log = logging.getLogger("sora_dist")

SYNTHETIC_TEXT_ENCODER = "synthetic-bag-of-words"


def caption_embedding(manifest: Manifest, loader: LatentLoader, caption: str) -> tuple[str, np.ndarray]:
    """Text states for a caption: computed for the synthetic encoder, else looked up in the data.

    Until a text encoder runs in the sampling process, a real dataset can only be sampled with
    captions it contains; an empty caption takes the first one streamed.
    """
    if caption and manifest.text_encoder == SYNTHETIC_TEXT_ENCODER:
        return caption, embed_caption(caption)
    for batch in loader.epoch_batches(0):
        for i, found in enumerate(batch.captions):
            if not caption or found == caption:
                return found, batch.text[i][batch.text_mask[i]].numpy()
    raise DataError(f"caption {caption!r} is not in the dataset at {loader.root}; pick one listed by `sora-dist inspect`")


@torch.no_grad()
def generate(cfg: Config, model, objective, text: np.ndarray, num_samples: int, seed: int, device: torch.device) -> np.ndarray:
    """Sample ``num_samples`` latents of train.sample_shape for one caption: (N, C, T, h, w)."""
    model.eval()
    text_t = torch.from_numpy(np.asarray(text, dtype=np.float32))[None].expand(num_samples, -1, -1).to(device)
    mask = torch.ones(text_t.shape[:2], dtype=torch.bool, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    shape = (num_samples, model.cfg.in_channels, *cfg.train.sample_shape)
    noise = torch.randn(shape, generator=generator, device=device)
    denoise = guided(model, text_t, mask, cfg.diffusion.guidance_scale)
    latents = sample(objective, cfg.diffusion.sampler, denoise, noise, cfg.diffusion.sample_steps, generator)
    model.train()
    return latents.float().cpu().numpy()


def sample_report(cfg: Config, model, objective, loader: LatentLoader, history: list[dict], out_dir: Path, dev) -> None:
    """Save sample.png (frames of clips sampled for one caption) and loss.png."""
    caption, text = caption_embedding(loader.manifest, loader, cfg.train.sample_caption)
    latents = generate(cfg, model, objective, text, num_samples=2, seed=cfg.train.seed, device=dev.torch_device)
    save_frame_grid(list(latents), [f"{caption}\n(seed {i})" for i in range(len(latents))], out_dir / "sample.png")
    if history:
        save_loss_plot([r["step"] for r in history], [r["loss"] for r in history], out_dir / "loss.png")
    log.info("sampled %r -> %s; loss curve -> %s", caption, out_dir / "sample.png", out_dir / "loss.png")
