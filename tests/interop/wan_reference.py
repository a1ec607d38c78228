"""Tiny random diffusers Wan transformers and the inputs both models take, shared by the interop
tests and their multi-rank worker."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from sora_dist.interop.wan import wan_model_options
from sora_dist.models import DiTConfig, VideoDiT

# Odd head count, head width 12 (RoPE split 4/4/4), an FFN width no multiple of the hidden size.
TINY = {"patch_size": [1, 2, 2], "num_attention_heads": 3, "attention_head_dim": 12, "in_channels": 4, "out_channels": 4,
        "text_dim": 16, "freq_dim": 256, "ffn_dim": 50, "num_layers": 2, "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": 1024}
LATENT = (3, 6, 10)  # frames, height, width: a non-square grid of 3 x 3 x 5 patches
TEXT_TOKENS = (5, 3)  # real caption tokens per sample
IMAGE_TOKENS = 5  # CLIP tokens per image (257 in Wan)
VARIANTS = {
    "t2v": {},  # and TI2V: the same tensors, fed per-frame timesteps
    # Wan 2.1 I2V: 4 noisy + 4 mask + 4 first-frame latent channels in, 4 predicted; 20-wide image tokens.
    "i2v": {"in_channels": 12, "out_channels": 4, "image_dim": 20, "added_kv_proj_dim": 36},
    # FLF2V: I2V plus a learned position table over the first and the last frame's image tokens.
    "flf2v": {"in_channels": 12, "out_channels": 4, "image_dim": 20, "added_kv_proj_dim": 36, "pos_embed_seq_len": 2 * IMAGE_TOKENS},
}


def make_wan(dtype=torch.float64, seed: int = 0, variant: str = "t2v", **overrides):
    """A diffusers WanTransformer3DModel of a VARIANTS entry with every weight random (tables and norms too)."""
    from diffusers import WanTransformer3DModel

    overrides = {**VARIANTS[variant], **overrides}
    if "added_kv_proj_dim" in overrides:  # the image keys read tokens as wide as the model
        overrides["added_kv_proj_dim"] = overrides.get("num_attention_heads", TINY["num_attention_heads"]) * TINY["attention_head_dim"]

    torch.manual_seed(seed)
    with diffusers_in_float64() if dtype == torch.float64 else contextlib.nullcontext():  # its RoPE table too
        model = WanTransformer3DModel(**{**TINY, **overrides}).to(dtype)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
    return model


def save_wan(model, folder: Path, max_shard_size: str = "5GB") -> Path:
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=max_shard_size)
    return folder


def our_config(wan) -> DiTConfig:
    return DiTConfig(**wan_model_options(dict(wan.config)))


def empty_model(cfg: DiTConfig, dtype=torch.float64) -> VideoDiT:
    with torch.device("meta"):
        model = VideoDiT(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    model.init_weights()  # the weights are overwritten by an import; the empty-prompt buffer stays zero
    return model


def inputs(cfg: DiTConfig, dtype=torch.float64, per_frame_t: bool = False, seed: int = 1):
    """(x, t, text, text_mask) for our model; text holds the real tokens only, right-padded."""
    g = torch.Generator().manual_seed(seed)
    b, longest = len(TEXT_TOKENS), max(TEXT_TOKENS)
    x = torch.randn(b, cfg.in_channels, *LATENT, generator=g, dtype=dtype)
    frames = cfg.grid(LATENT)[0]
    t = torch.rand(b, frames, generator=g, dtype=dtype) * 1000 if per_frame_t else torch.tensor([999.0, 137.5], dtype=dtype)
    text = torch.randn(b, longest, cfg.text_dim, generator=g, dtype=dtype)
    mask = torch.arange(longest)[None] < torch.tensor(TEXT_TOKENS)[:, None]
    return x, t, text, mask


def image_tokens(cfg: DiTConfig, dtype=torch.float64, seed: int = 2):
    """(B, L, image_dim) CLIP image tokens for our model (two images' worth under a position
    table, as FLF2V), or None for a model without image conditioning."""
    if cfg.image_dim is None:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(TEXT_TOKENS), cfg.image_len or IMAGE_TOKENS, cfg.image_dim, generator=g, dtype=dtype)


def wan_image(cfg: DiTConfig, image):
    """The same image tokens as diffusers takes them: FLF2V's two images as two rows of the batch."""
    if image is None or cfg.image_len is None:
        return image
    return image.reshape(-1, cfg.image_len // 2, cfg.image_dim)


def wan_inputs(cfg: DiTConfig, x, t, text, mask):
    """The same inputs as Wan's pipeline feeds them: captions zero-padded to 512 tokens, and a
    per-frame timestep given per token."""
    padded = torch.zeros(text.shape[0], cfg.text_len, text.shape[2], dtype=text.dtype)
    padded[:, : text.shape[1]] = text.masked_fill(~mask[..., None], 0.0)
    if t.dim() == 2:
        frame_tokens = cfg.num_tokens(LATENT) // t.shape[1]
        t = t.repeat_interleave(frame_tokens, dim=1)
    return x, t, padded


def difference_from_diffusers(ours: VideoDiT, exported) -> float:
    """The relative difference of ``ours`` from a diffusers Wan model (``exported``, loaded from
    our export) on the shared fp32 inputs."""
    x, t, text, mask = inputs(ours.cfg, torch.float32)
    image = image_tokens(ours.cfg, torch.float32)
    with torch.no_grad():
        out = ours(x, t, text, mask, image=image)
        ref = exported(*wan_inputs(ours.cfg, x, t, text, mask), encoder_hidden_states_image=wan_image(ours.cfg, image), return_dict=False)[0]
    return ((out - ref).norm() / ref.norm()).item()


@contextlib.contextmanager
def diffusers_in_float64():
    """diffusers' Wan computes its norms, modulation and RoPE table in ``.float()`` (fp32) whatever
    the model's dtype; for a float64 reference, ``.float()`` leaves float64 tensors as they are."""
    original = torch.Tensor.float

    def keep_float64(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else original(self, *args, **kwargs)

    torch.Tensor.float = keep_float64
    try:
        yield
    finally:
        torch.Tensor.float = original
