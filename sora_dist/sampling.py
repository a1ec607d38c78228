"""Sampling clips from a trained model: the end-of-run report and ``sora-dist sample``."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from sora_dist.checkpoint import COMPLETE
from sora_dist.config import Config, load_config
from sora_dist.data.format import Manifest
from sora_dist.data.loader import LatentLoader
from sora_dist.data.synthetic import embed_caption
from sora_dist.diffusion import guided, sample
from sora_dist.errors import ConfigError, DataError
from sora_dist.metrics import ProgressLine
from sora_dist.models import VideoDiT
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
def generate(cfg: Config, model, objective, text: np.ndarray, num_samples: int, seed: int, dev, autocast_dtype=None) -> np.ndarray:
    """Sample ``num_samples`` latents of train.sample_shape for one caption: (N, C, T, h, w).

    The model runs under the run's autocast (bf16 on GPU/NPU), as in training: flash-attn and the
    NPU fused kernels compute in half precision. The sampler's state stays in fp32."""
    model.eval()
    device = dev.torch_device
    text_t = torch.from_numpy(np.asarray(text, dtype=np.float32))[None].expand(num_samples, -1, -1).to(device)
    mask = torch.ones(text_t.shape[:2], dtype=torch.bool, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    shape = (num_samples, model.cfg.in_channels, *cfg.train.sample_shape)
    noise = torch.randn(shape, generator=generator, device=device)
    denoise = guided(model, text_t, mask, cfg.diffusion.guidance_scale)
    with dev.autocast(autocast_dtype):
        latents = sample(objective, cfg.diffusion.sampler, denoise, noise, cfg.diffusion.sample_steps, generator,
                         progress=ProgressLine(f"sampling {num_samples} x {tuple(shape[2:])}"))
    model.train()
    return latents.float().cpu().numpy()


def load_for_sampling(path: Path, raw: bool, dev) -> tuple[Config, VideoDiT, str]:
    """The config and a single-device model from a finished run folder (its final safetensors
    weights), or from a checkpoint folder (``.../checkpoints/step-N``), or from a run folder
    without final weights (its newest complete checkpoint). Returns (config, model, source)."""
    from safetensors.torch import load_file

    from sora_dist.build import build_single_device_model
    from sora_dist.checkpoint import is_complete, load_weights_for_export, newest_complete

    path = Path(path)
    weights = path / ("model.safetensors" if raw else "ema.safetensors")
    if not (path / COMPLETE).is_file() and not weights.is_file():
        newest = newest_complete(path / "checkpoints")
        if newest is None:
            raise ConfigError(
                f"{path} holds neither {weights.name} nor a complete checkpoint under {path / 'checkpoints'}: pass a "
                "finished run folder (checkpoint.save_final=true), or a checkpoint folder such as RUN/checkpoints/step-N"
            )
        log.info("%s has no final weights: sampling its newest complete checkpoint, %s", path, newest.name)
        path = newest
    if (path / COMPLETE).is_file():
        ok, why = is_complete(path)
        if not ok:
            raise ConfigError(f"{path} is not a complete checkpoint: {why}")
        cfg = load_config(path / "config.yaml")
        model = build_single_device_model(cfg, cfg.model.in_channels, cfg.model.text_dim, torch.device("cpu"))
        used = load_weights_for_export(path, model, ema=not raw)
        return cfg, model.to(dev.torch_device), f"{path} ({used} weights)"
    cfg = load_config(path / "config.yaml")
    model = build_single_device_model(cfg, cfg.model.in_channels, cfg.model.text_dim, dev.torch_device)
    model.load_state_dict(load_file(str(weights), device=str(dev.torch_device)))
    return cfg, model, str(weights)


def sample_report(cfg: Config, model, objective, loader: LatentLoader, history: list[dict], out_dir: Path, dev) -> None:
    """Save sample.png (frames of clips sampled for one caption) and loss.png."""
    from sora_dist.build import autocast_dtype

    caption, text = caption_embedding(loader.manifest, loader, cfg.train.sample_caption)
    latents = generate(cfg, model, objective, text, num_samples=2, seed=cfg.train.seed, dev=dev, autocast_dtype=autocast_dtype(cfg, dev))
    save_frame_grid(list(latents), [f"{caption}\n(seed {i})" for i in range(len(latents))], out_dir / "sample.png")
    if history:
        save_loss_plot([r["step"] for r in history], [r["loss"] for r in history], out_dir / "loss.png")
    log.info("sampled %r -> %s; loss curve -> %s", caption, out_dir / "sample.png", out_dir / "loss.png")
