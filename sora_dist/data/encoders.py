"""The pretrained models the encoder runs: a diffusers VAE and a transformers text encoder, both
loaded with ``from_pretrained`` from a local folder or a hub name, exactly as users have them.

``VideoVAE`` wraps image VAEs (``AutoencoderKL``, applied frame by frame) and video VAEs (Wan,
HunyuanVideo, CogVideoX) behind one pixels <-> normalized-latents interface, and knows their
compression and latent normalization (scaling and shift factors, or Wan's per-channel
mean/std), which go into the dataset manifest so that decoding can undo them.
``TextEncoder`` wraps T5 / UMT5 encoders and CLIP text models with their tokenizer: per caption,
the hidden states of its real tokens and, where the model has one, the pooled vector.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from sora_dist.data.format import EMPTY_CAPTION
from sora_dist.errors import ConfigError, require_extra

# diffusers class -> how it is applied; the compression factors are read from each one's config.
VAE_KINDS = {
    "AutoencoderKL": "image",
    "AutoencoderKLWan": "video",
    "AutoencoderKLHunyuanVideo": "video",
    "AutoencoderKLCogVideoX": "video",
}


def _compression(kind: str, config: Any) -> tuple[int, int]:
    """(temporal, spatial) pixel-to-latent factors of a VAE, from its config."""
    if kind == "AutoencoderKLWan":
        return 2 ** sum(config.temperal_downsample), 2 ** len(config.temperal_downsample)
    if kind == "AutoencoderKLHunyuanVideo":
        return int(config.temporal_compression_ratio), int(config.spatial_compression_ratio)
    spatial = 2 ** (len(config.block_out_channels) - 1)
    return (1 if kind == "AutoencoderKL" else int(config.temporal_compression_ratio)), spatial


class VideoVAE:
    def __init__(self, name: str, subfolder: str = "", device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32):
        require_extra("encode")
        from diffusers import AutoModel

        self.name, self.subfolder, self.device, self.dtype = name, subfolder, device, dtype
        try:
            model = AutoModel.from_pretrained(name, subfolder=subfolder or None, torch_dtype=dtype)
        except (OSError, ValueError) as err:
            raise ConfigError(f"encode.vae={name!r} (subfolder {subfolder!r}) could not be loaded: {err}") from err
        self.kind = type(model).__name__
        if self.kind not in VAE_KINDS:
            raise ConfigError(f"encode.vae={name!r} is a {self.kind}; supported VAEs: {', '.join(VAE_KINDS)}")
        self.model = model.to(device).eval().requires_grad_(False)
        config = model.config
        self.is_video = VAE_KINDS[self.kind] == "video"
        self.temporal, self.spatial = _compression(self.kind, config)
        self.latent_channels = config.get("z_dim") or config.latent_channels
        self.scaling_factor = float(config.get("scaling_factor") or 1.0)
        self.shift_factor = float(config.get("shift_factor") or 0.0)
        self.latents_mean = [float(x) for x in config.get("latents_mean") or []]
        self.latents_std = [float(x) for x in config.get("latents_std") or []]
        if len(self.latents_mean) not in (0, self.latent_channels) or len(self.latents_mean) != len(self.latents_std):
            raise ConfigError(f"encode.vae={name!r}: latents_mean/std have {len(self.latents_mean)}/{len(self.latents_std)} entries for {self.latent_channels} channels")

    def manifest_fields(self) -> dict[str, Any]:
        return {
            "vae": self.name, "vae_subfolder": self.subfolder, "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor,
            "latents_mean": self.latents_mean, "latents_std": self.latents_std,
            "compression": {"temporal": self.temporal, "spatial": self.spatial},
        }

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(T, h, w) of the latent of F x H x W pixels: causal video VAEs keep the first frame."""
        time = 1 + (frames - 1) // self.temporal if self.is_video else frames
        return time, height // self.spatial, width // self.spatial

    def _channel_stats(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (-1,) + (1,) * (latents.dim() - 1)
        if self.latents_mean:
            mean = torch.tensor(self.latents_mean, device=latents.device, dtype=latents.dtype).view(shape)
            std = torch.tensor(self.latents_std, device=latents.device, dtype=latents.dtype).view(shape)
            return mean, std
        return torch.tensor(self.shift_factor, device=latents.device), torch.tensor(1.0, device=latents.device)

    @torch.no_grad()
    def encode(self, frames: np.ndarray) -> np.ndarray:
        """uint8 (F, H, W, 3) -> normalized float16 latent (C, T, h, w); the posterior's mode."""
        pixels = torch.from_numpy(np.array(frames)).to(self.device).permute(3, 0, 1, 2)  # (3, F, H, W)
        pixels = (pixels.float() / 127.5 - 1.0).to(self.dtype)
        if self.is_video:
            latents = self.model.encode(pixels[None]).latent_dist.mode()[0]  # (C, T, h, w)
        else:  # per frame: (F, 3, H, W) -> (F, C, h, w)
            latents = self.model.encode(pixels.transpose(0, 1)).latent_dist.mode().transpose(0, 1)
        latents = latents.float()
        expected = (self.latent_channels, *self.latent_shape(*frames.shape[:3]))
        if tuple(latents.shape) != expected:
            raise ConfigError(f"encode.vae={self.name!r} gave latents {tuple(latents.shape)} for {frames.shape[:3]} pixels, expected {expected}: its compression factors are not what its config says")
        mean, std = self._channel_stats(latents)
        return ((latents - mean) / std * self.scaling_factor).cpu().numpy().astype(np.float16)

    @torch.no_grad()
    def decode(self, latents: np.ndarray | torch.Tensor) -> np.ndarray:
        """Normalized latent (C, T, h, w) -> uint8 frames (F, H, W, 3)."""
        z = torch.as_tensor(latents).float().to(self.device)
        mean, std = self._channel_stats(z)
        z = (z / self.scaling_factor * std + mean).to(self.dtype)
        if self.is_video:
            pixels = self.model.decode(z[None]).sample[0]  # (3, F, H, W)
        else:
            pixels = self.model.decode(z.transpose(0, 1)).sample.transpose(0, 1)
        pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return pixels.permute(1, 2, 3, 0).cpu().numpy()


# transformers model_type -> the class holding just the text encoder.
TEXT_ENCODERS = {
    "t5": "T5EncoderModel",
    "umt5": "UMT5EncoderModel",
    "clip_text_model": "CLIPTextModel",
    "clip": "CLIPTextModel",
}


class TextEncoder:
    def __init__(self, name: str, subfolder: str = "", tokenizer_subfolder: str = "", max_length: int = 256,
                 device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32):
        require_extra("encode")
        import transformers

        self.name, self.max_length, self.device = name, max_length, device
        self.subfolder, self.tokenizer_subfolder = subfolder, tokenizer_subfolder
        try:
            config = transformers.AutoConfig.from_pretrained(name, subfolder=subfolder)
            model_class = getattr(transformers, TEXT_ENCODERS.get(config.model_type, "AutoModel"))
            self.model = model_class.from_pretrained(name, subfolder=subfolder, dtype=dtype)
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(name, subfolder=tokenizer_subfolder or subfolder)
        except (OSError, ValueError) as err:
            raise ConfigError(f"encode.text_encoder={name!r} (subfolder {subfolder!r}) could not be loaded: {err}") from err
        self.model = self.model.to(device).eval().requires_grad_(False)

    def manifest_fields(self) -> dict[str, Any]:
        return {"text_encoder": self.name, "text_encoder_subfolder": self.subfolder,
                "tokenizer_subfolder": self.tokenizer_subfolder, "max_text_length": self.max_length, "empty_caption": EMPTY_CAPTION}

    @torch.no_grad()
    def encode(self, captions: list[str]) -> list[tuple[np.ndarray, Optional[np.ndarray]]]:
        """Per caption: float16 hidden states of its real tokens (L <= max_length, D) and the
        pooled vector (D_pooled) where the model has one, else None."""
        tokens = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt").to(self.device)
        output = self.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        states = output.last_hidden_state.float().cpu().numpy().astype(np.float16)  # (B, L, D)
        pooled = getattr(output, "pooler_output", None)
        pooled = None if pooled is None else pooled.float().cpu().numpy().astype(np.float16)
        real = tokens.attention_mask.bool().cpu().numpy()  # works for left- and right-padding tokenizers
        return [(states[i][real[i]], None if pooled is None else pooled[i]) for i in range(len(captions))]
