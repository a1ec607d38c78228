"""A video diffusion transformer over spacetime latent patches. Single-device PyTorch.

Latents (B, C, T, h, w) are cut into (p_t, p_h, p_w) patches: the tokens. An image is a
one-frame video and takes the same path. Positions are 3D rotary embeddings computed from the
patch grid at every call, so any duration, resolution and aspect ratio works without retraining.
Each block: adaLN-Zero modulated self-attention (QK-norm, RoPE), cross-attention to the text
tokens with a padding mask, and an adaLN-Zero modulated MLP (Peebles & Xie 2023, PixArt-alpha).

Options express published models exactly (``DiTConfig``): the MLP width (``ffn_dim``), the
QK-norm's scope, shared modulation (PixArt-alpha's adaLN-single, Wan's: one projection of the
timestep embedding for all blocks, plus a learned table per block and for the final layer), and
fixed-length unmasked caption context (Wan's), and image conditioning (Wan 2.1 I2V and FLF2V: more
input channels than predicted ones, and CLIP image tokens that every cross-attention reads through
key/value projections of their own). sora_dist.interop maps checkpoints onto them.

No distributed code and no device names here: parallelism is applied from outside
(sora_dist.parallel), and attribute names are API for its tensor-parallel plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from sora_dist.kernels import attention
from sora_dist.kernels.fused import all_heads_rms_norm, gated_residual, modulated_layer_norm, rms_norm
from sora_dist.kernels.fused import rope as rope_rotate

TIMESTEP_FREQ_DIM = 256
EMPTY_CAPTION_TOKENS = 16
"""Tokens kept of the empty prompt's text states (padded context): "" is one or two tokens."""


@dataclass(frozen=True)
class DiTConfig:
    """Fully resolved model hyper-parameters (see sora_dist.config.ModelConfig for the docs)."""

    in_channels: int
    text_dim: int
    hidden_size: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    ffn_dim: int | None = None  # the MLP width itself; None: hidden_size * mlp_ratio
    patch_size: tuple[int, int, int] = (1, 2, 2)
    qk_norm: bool = True
    qk_norm_scope: str = "head"  # RMS over each head's channels, or over all heads' together ("all_heads", Wan)
    rope_theta: float = 10000.0
    modulation: str = "per_block"  # adaLN-Zero in every block, or "shared": one time projection plus per-block tables (Wan)
    text_context: str = "masked"  # caption tokens under a key mask with a null token, or "padded" to text_len, unmasked (Wan)
    text_len: int = 512  # the caption tokens of text_context "padded"
    out_channels: int | None = None  # channels predicted; None: in_channels (Wan I2V reads 36, predicts 16)
    image_dim: int | None = None  # width of CLIP image tokens read by every cross-attention (Wan I2V: 1280); None: none
    image_len: int | None = None  # image tokens with a learned position table (Wan FLF2V: 2 x 257); None: no table

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return self.ffn_dim or int(self.hidden_size * self.mlp_ratio)

    @property
    def predicted_channels(self) -> int:
        return self.out_channels or self.in_channels

    @property
    def patch_volume(self) -> int:
        p_t, p_h, p_w = self.patch_size
        return p_t * p_h * p_w

    def grid(self, latent_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """Patch grid (T', h', w') of a latent (T, h, w); partial patches are padded."""
        return tuple(-(-size // patch) for size, patch in zip(latent_shape, self.patch_size))

    def num_tokens(self, latent_shape: tuple[int, int, int]) -> int:
        return math.prod(self.grid(latent_shape))


# ---------------------------------------------------------------------------------------------
# Positions: 3D rotary embedding


def rope_dims(head_dim: int) -> tuple[int, int, int]:
    """Split of a head's channels between time, height and width (each even)."""
    d_hw = 2 * (head_dim // 6)
    return head_dim - 2 * d_hw, d_hw, d_hw


def rope_angles(grid: tuple[int, int, int], head_dim: int, theta: float, device: torch.device,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles of every token, each (N, head_dim / 2), N = T'h'w',
    computed in ``dtype`` (fp32; float64 for a float64 model)."""
    per_axis = []
    for size, dim in zip(grid, rope_dims(head_dim)):
        freqs = theta ** (-torch.arange(0, dim, 2, device=device, dtype=dtype) / dim)  # (dim/2,)
        per_axis.append(torch.outer(torch.arange(size, device=device, dtype=dtype), freqs))
    t, h, w = grid
    angles = torch.cat(
        [
            per_axis[0][:, None, None, :].expand(t, h, w, -1),
            per_axis[1][None, :, None, :].expand(t, h, w, -1),
            per_axis[2][None, None, :, :].expand(t, h, w, -1),
        ],
        dim=-1,
    ).reshape(t * h * w, head_dim // 2)
    return angles.cos(), angles.sin()


# ---------------------------------------------------------------------------------------------
# Per-frame timesteps: which frame each token belongs to


@dataclass(frozen=True)
class FrameSpan:
    """The tokens a forward pass holds: ``count`` consecutive tokens from ``first``, of a sequence
    of ``num_frames`` frames of ``frame_tokens`` tokens each (tokens are frame-major). Sequence
    parallelism replaces the whole-sequence span with each rank's slice; tokens past the end of
    the sequence (its padding) count as the last frame's."""

    first: int
    count: int
    frame_tokens: int
    num_frames: int

    def segments(self) -> list[tuple[int, int, int]]:
        """(first frame, frames, tokens) runs covering the span in order: a run is whole frames
        (tokens = frames * frame_tokens) or part of one frame (frames = 1)."""
        runs, pos, end = [], self.first, self.first + self.count
        while pos < end:
            frame = min(pos // self.frame_tokens, self.num_frames - 1)
            whole = min((end - pos) // self.frame_tokens, self.num_frames - frame) if pos % self.frame_tokens == 0 else 0
            if whole:
                runs.append((frame, whole, whole * self.frame_tokens))
            else:
                stop = end if frame == self.num_frames - 1 else min(end, (frame + 1) * self.frame_tokens)
                runs.append((frame, 1, stop - pos))
            pos += runs[-1][2]
        return runs


class TokenFrames(nn.Module):
    """The FrameSpan of a patch grid (no parameters): a module so that sequence parallelism can
    replace its output with the rank's slice, as it does for the rotary angles."""

    def forward(self, grid: tuple[int, int, int]) -> FrameSpan:
        t, h, w = grid
        return FrameSpan(first=0, count=t * h * w, frame_tokens=h * w, num_frames=t)


def per_frame(op: Callable[..., torch.Tensor], span: FrameSpan, tokens: tuple[torch.Tensor, ...], mods: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``op(*tokens, *mods)`` for (B, n, D) tokens and modulation that is per sample (B, D) or per
    frame (B, T', D). Per frame, each run of whole frames is folded into the batch, (B*k, S, D)
    with (B*k, D) modulation, so the fused per-sample kernels apply unchanged and nothing is
    broadcast to every token in memory."""
    if mods[0].dim() == 2:
        return op(*tokens, *mods)
    b, outputs, offset = tokens[0].shape[0], [], 0
    for frame, frames, count in span.segments():
        folded = [rearrange(x.narrow(1, offset, count), "b (f s) d -> (b f) s d", f=frames) for x in tokens]
        frame_mods = [rearrange(m[:, frame : frame + frames], "b f d -> (b f) d") for m in mods]
        outputs.append(rearrange(op(*folded, *frame_mods), "(b f) s d -> b (f s) d", b=b))
        offset += count
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)


class RotaryEmbedding3D(nn.Module):
    """Module form of ``rope_angles`` (no parameters), so that sequence parallelism can split
    its output with a hook like any other per-token tensor."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, grid: tuple[int, int, int], device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_angles(grid, self.head_dim, self.theta, device, dtype)


# ---------------------------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension through the fused-kernel switch (QK-norm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class AllHeadsRMSNorm(nn.Module):
    """RMSNorm of queries or keys over all heads' channels together (Wan's QK-norm), on (B, H, N, Dh)
    with one weight per channel of the flat (H*Dh) projection (``fused.all_heads_rms_norm``; under
    tensor parallelism DTensor sums the squares over the ranks' heads)."""

    def __init__(self, num_heads: int, head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.num_heads, self.eps = num_heads, eps
        self.weight = nn.Parameter(torch.ones(num_heads * head_dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_heads_rms_norm(x, self.weight, self.eps)


class ModulationTable(nn.Module):
    """A learned (1, n, D) table added to the timestep conditioning under shared modulation, in at
    least fp32. A module of its own so that FSDP can keep it in fp32 under bf16 mixed precision,
    as Wan keeps its tables (``VideoDiT.kept_in_fp32``)."""

    def __init__(self, rows: int, hidden_size: int):
        super().__init__()
        self.table = nn.Parameter(torch.empty(1, rows, hidden_size))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        """c: (..., rows * D), the conditioning each row of the table is added to."""
        return self.table.flatten() + c.to(torch.promote_types(c.dtype, torch.float32))  # the sum takes the wider dtype


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the (continuous) timestep, then an MLP, outside autocast: in the
    weights' dtype (fp32, as Wan keeps its time embedding, unless the model itself is cast)."""

    def __init__(self, hidden_size: int, freq_dim: int = TIMESTEP_FREQ_DIM):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def sinusoidal(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.to(torch.promote_types(t.dtype, torch.float32))[:, None] * freqs[None]  # (B, half); float64 t stays float64
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = self.sinusoidal(t, self.freq_dim).to(self.mlp[0].weight.dtype)
        if t.device.type == "meta":  # shape propagation: no autocast to leave
            return self.mlp(features)
        with torch.autocast(t.device.type, enabled=False):
            return self.mlp(features)


class AttentionCore(nn.Module):
    """softmax(q k^T / sqrt(d)) v through the attention dispatch. A module of its own so that
    sequence parallelism can swap it for a Ulysses or ring version without touching the model."""

    def forward(self, q, k, v, key_mask=None):
        return attention(q, k, v, key_mask)


def qk_norm_layer(num_heads: int, head_dim: int, scope: str) -> nn.Module:
    """The QK-norm of one projection: per head ("head") or over all heads together ("all_heads")."""
    if scope == "all_heads":
        return AllHeadsRMSNorm(num_heads, head_dim)
    if scope == "head":
        return RMSNorm(head_dim)
    raise ValueError(f"qk_norm_scope={scope!r}: choose 'head' or 'all_heads'")


def check_options(cfg: DiTConfig) -> None:
    """Refuse option values the model does not know (the config layer checks them first)."""
    for name, allowed in (("modulation", ("per_block", "shared")), ("text_context", ("masked", "padded"))):
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{name}={getattr(cfg, name)!r}: choose one of {allowed}")


class Attention(nn.Module):
    """Multi-head attention with optional QK-norm; self-attention when ``context`` is None.

    Heads are inferred from the projection's output width, so a tensor-parallel plan that
    shards to_q/to_k/to_v column-wise leaves each rank with its local heads.
    """

    def __init__(self, hidden_size: int, num_heads: int, qk_norm: bool, qk_norm_scope: str = "head", image_kv: bool = False):
        super().__init__()
        self.head_dim = hidden_size // num_heads
        self.to_q = nn.Linear(hidden_size, hidden_size)
        self.to_k = nn.Linear(hidden_size, hidden_size)
        self.to_v = nn.Linear(hidden_size, hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.q_norm = qk_norm_layer(num_heads, self.head_dim, qk_norm_scope) if qk_norm else nn.Identity()
        self.k_norm = qk_norm_layer(num_heads, self.head_dim, qk_norm_scope) if qk_norm else nn.Identity()
        self.core = AttentionCore()
        if image_kv:  # Wan I2V: the embedded image tokens' own keys (RMS-normed over all heads) and values
            self.image_k = nn.Linear(hidden_size, hidden_size)
            self.image_v = nn.Linear(hidden_size, hidden_size)
            self.image_k_norm = AllHeadsRMSNorm(num_heads, self.head_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(x, "b n (h dh) -> b h n dh", dh=self.head_dim)

    def forward(self, x, rope=None, context=None, context_mask=None, image=None):
        """``image``: embedded image tokens (B, L, D), attended to apart from the context (its own
        softmax) and added to its result before the output projection."""
        source = x if context is None else context
        q = self.q_norm(self._heads(self.to_q(x)))
        k = self.k_norm(self._heads(self.to_k(source)))
        v = self._heads(self.to_v(source))
        if rope is not None:
            q, k = rope_rotate(q, *rope), rope_rotate(k, *rope)
        out = self.core(q, k, v, context_mask)  # (B, H, N, Dh)
        if image is not None:
            image_k = self.image_k_norm(self._heads(self.image_k(image)))
            out = out + self.core(q, image_k, self._heads(self.image_v(image)))
        return self.proj(rearrange(out, "b h n dh -> b n (h dh)"))


class Mlp(nn.Module):
    def __init__(self, hidden_size: int, mlp_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """adaLN-Zero block; the parameter-free modulated LayerNorms and the gated residual adds go
    through the fused-kernel switch (sora_dist.kernels.fused)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.hidden_size
        self.attn = Attention(d, cfg.num_heads, cfg.qk_norm, cfg.qk_norm_scope)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.cross_attn = Attention(d, cfg.num_heads, cfg.qk_norm, cfg.qk_norm_scope, image_kv=cfg.image_dim is not None)
        self.mlp = Mlp(d, cfg.mlp_hidden)
        if cfg.modulation == "shared":
            self.scale_shift_table = ModulationTable(6, d)
        else:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def modulation(self, c: torch.Tensor) -> torch.Tensor:
        """The block's six (shift, scale, gate) x (attention, MLP) vectors, concatenated: its own
        projection of c, or under shared modulation c (the shared projection, 6D wide) plus the
        block's table, added in at least fp32."""
        if hasattr(self, "adaLN_modulation"):
            return self.adaLN_modulation(c)
        return self.scale_shift_table(c)

    def forward(self, x, c, context, context_mask, rope, frames: FrameSpan, image=None):
        """c: (B, D) per sample or (B, T', D) per frame; (.., 6D) under shared modulation;
        image: embedded image tokens (B, L, D) or None."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c).chunk(6, dim=-1)
        h = per_frame(modulated_layer_norm, frames, (x,), (shift_msa, scale_msa))
        x = per_frame(_gated_residual, frames, (x, self.attn(h, rope=rope)), (gate_msa,))
        x = x + self.cross_attn(self.norm2(x), context=context, context_mask=context_mask, image=image)
        h = per_frame(modulated_layer_norm, frames, (x,), (shift_mlp, scale_mlp))
        return per_frame(_gated_residual, frames, (x, self.mlp(h)), (gate_mlp,))


def _gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return gated_residual(x, gate, y)


class FinalLayer(nn.Module):
    """Modulated LayerNorm then the projection to patches. Its (shift, scale): a projection of c,
    or under shared modulation c itself (the timestep embedding, no projection) plus a table."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        if cfg.modulation == "shared":
            self.scale_shift_table = ModulationTable(2, cfg.hidden_size)
        else:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden_size, 2 * cfg.hidden_size))
        self.linear = nn.Linear(cfg.hidden_size, cfg.patch_volume * cfg.predicted_channels)

    def modulation(self, c: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "adaLN_modulation"):
            return self.adaLN_modulation(c)
        return self.scale_shift_table(torch.cat([c, c], dim=-1))

    def forward(self, x: torch.Tensor, c: torch.Tensor, frames: FrameSpan) -> torch.Tensor:
        shift, scale = self.modulation(c).chunk(2, dim=-1)
        return self.linear(per_frame(modulated_layer_norm, frames, (x,), (shift, scale)))


def fp32_layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """An affine LayerNorm computed in at least fp32 and returned in x's dtype (as Wan's FP32LayerNorm)."""
    wide = torch.promote_types(x.dtype, torch.float32)
    out = F.layer_norm(x.to(wide), norm.normalized_shape, norm.weight.to(wide), norm.bias.to(wide), norm.eps)
    return out.to(x.dtype)


class ImageEmbedder(nn.Module):
    """CLIP image tokens (B, L, image_dim) to the model's width (Wan 2.1 I2V): a LayerNorm, a GELU
    MLP and a LayerNorm, the norms in fp32. With ``positions`` (FLF2V: the first and the last
    frame's tokens, one after the other) a learned table is added first."""

    def __init__(self, image_dim: int, hidden_size: int, positions: int | None):
        super().__init__()
        self.norm1 = nn.LayerNorm(image_dim)
        self.fc1 = nn.Linear(image_dim, image_dim)
        self.fc2 = nn.Linear(image_dim, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, positions, image_dim)) if positions else None

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:
            assert image.shape[1] == self.pos_embed.shape[1], f"{image.shape[1]} image tokens, the position table {self.pos_embed.shape[1]}"
            image = image + self.pos_embed
        h = self.fc2(F.gelu(self.fc1(fp32_layer_norm(self.norm1, image))))
        return fp32_layer_norm(self.norm2, h)


# ---------------------------------------------------------------------------------------------
# The model


class VideoDiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        check_options(cfg)
        self.cfg = cfg
        d = cfg.hidden_size
        self.x_embedder = nn.Linear(cfg.in_channels * cfg.patch_volume, d)
        self.t_embedder = TimestepEmbedder(d)
        self.text_embedder = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        if cfg.text_context == "masked":
            # An always-visible context token: a sample whose caption was dropped (all text masked)
            # attends to it alone, which is the unconditional model of classifier-free guidance.
            self.null_text = nn.Parameter(torch.empty(1, 1, d))
        else:
            # The text encoder's states for the empty prompt, zero-padded: what a dropped caption
            # (all text masked) becomes, as Wan's pipeline feeds its negative prompt. Zeros until
            # the trainer copies in the dataset's (data.Manifest.empty_caption); saved with the weights.
            self.register_buffer("empty_caption", torch.zeros(min(EMPTY_CAPTION_TOKENS, cfg.text_len), cfg.text_dim))
        if cfg.modulation == "shared":  # the blocks' modulation, projected once from the timestep embedding
            self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        if cfg.image_dim is not None:
            self.image_embedder = ImageEmbedder(cfg.image_dim, d, cfg.image_len)
        self.rope = RotaryEmbedding3D(cfg.head_dim, cfg.rope_theta)
        self.frames = TokenFrames()
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)
        if not self.x_embedder.weight.is_meta:  # a model built on meta is initialized once materialized
            self.init_weights()

    @torch.no_grad()
    def set_empty_caption(self, states: torch.Tensor) -> None:
        """The text encoder's (L, D) states for the empty prompt: what a dropped caption, and the
        unconditional half of guidance, become under padded text context."""
        if states.shape[0] > self.empty_caption.shape[0]:
            raise ValueError(f"the empty prompt's states hold {states.shape[0]} tokens; at most {self.empty_caption.shape[0]} are kept")
        self.empty_caption.zero_()
        self.empty_caption[: states.shape[0]].copy_(states)

    @torch.no_grad()
    def init_weights(self) -> None:
        """DiT's initialization; also materializes a model built on the meta device."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and ".lora_" in name:  # adapters (sora_dist.models.lora): B = 0, A as peft starts it
                module.reset_parameters() if ".lora_A." in name else nn.init.zeros_(module.weight)
            elif isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, RMSNorm, AllHeadsRMSNorm)):
                module.reset_parameters()
        for linear in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.text_embedder[0], self.text_embedder[2]):
            nn.init.normal_(linear.weight, std=0.02)
        if hasattr(self, "image_embedder") and self.image_embedder.pos_embed is not None:
            nn.init.zeros_(self.image_embedder.pos_embed)
        if hasattr(self, "null_text"):
            nn.init.normal_(self.null_text, std=0.02)
        else:
            self.empty_caption.zero_()
        # adaLN-Zero: every block starts as the identity, and the output starts at zero.
        zeroed = [self.final_layer.linear]
        if self.cfg.modulation == "shared":
            zeroed.append(self.time_proj[-1])
            for table in [block.scale_shift_table.table for block in self.blocks] + [self.final_layer.scale_shift_table.table]:
                nn.init.zeros_(table)
        else:
            zeroed += [block.adaLN_modulation[-1] for block in self.blocks] + [self.final_layer.adaLN_modulation[-1]]
        for linear in zeroed:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def kept_in_fp32(self) -> list[nn.Module]:
        """Modules whose weights stay fp32 under bf16 mixed precision (FSDP gives each its own fp32
        group): under shared modulation, those Wan keeps in fp32, the time embedding, the
        modulation tables and the affine cross-attention norms. Parameter-free norms and the
        rotary angles hold no weights to keep."""
        if self.cfg.modulation != "shared":
            return []
        blocks = [m for block in self.blocks for m in (block.scale_shift_table, block.norm2)]
        image = [self.image_embedder.norm1, self.image_embedder.norm2] if hasattr(self, "image_embedder") else []
        return [self.t_embedder, *blocks, self.final_layer.scale_shift_table, *image]

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, h, w) -> (B, N, C*p_t*p_h*p_w); sizes that do not divide are zero-padded."""
        b, c, t, h, w = x.shape
        (gt, gh, gw), (pt, ph, pw) = self.cfg.grid((t, h, w)), self.cfg.patch_size
        x = F.pad(x, (0, gw * pw - w, 0, gh * ph - h, 0, gt * pt - t))
        return rearrange(x, "b c (gt pt) (gh ph) (gw pw) -> b (gt gh gw) (c pt ph pw)", pt=pt, ph=ph, pw=pw)

    def unpatchify(self, tokens: torch.Tensor, latent_shape: tuple[int, int, int]) -> torch.Tensor:
        """(B, N, C*p_t*p_h*p_w) -> (B, C, T, h, w), cropping the padding of ``patchify``."""
        t, h, w = latent_shape
        (gt, gh, gw), (pt, ph, pw) = self.cfg.grid(latent_shape), self.cfg.patch_size
        x = rearrange(tokens, "b (gt gh gw) (c pt ph pw) -> b c (gt pt) (gh ph) (gw pw)", gt=gt, gh=gh, gw=gw, pt=pt, ph=ph, pw=pw)
        if x.shape[2:] != (t, h, w):
            x = x[:, :, :t, :h, :w].contiguous()
        return x

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                image: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the diffusion target for noised latents.

        x: (B, C, T, h, w) noised latents (with image conditioning, its channels appended: C =
        in_channels); t: timestep in [0, 1000], (B,) one per sample or (B, T') one per latent frame
        after patching (T' = ceil(T / p_t)); text: (B, L, text_dim) text-encoder states;
        text_mask: (B, L) bool, True for real tokens; image: (B, L_img, image_dim) CLIP image
        tokens, given exactly when the model has image_dim.
        Returns (B, predicted_channels, T, h, w).
        """
        b, _, t_len, h, w = x.shape
        grid = self.cfg.grid((t_len, h, w))
        assert t.dim() == 1 or t.shape[1] == grid[0], f"per-frame t has {t.shape[1]} frames, the patch grid {grid[0]}"
        tokens = self.x_embedder(self.patchify(x))  # (B, N, D)
        c = self.t_embedder(t.flatten()).unflatten(0, t.shape)  # (B, D) or (B, T', D)
        context, context_mask = self.caption_context(text, text_mask)
        image_tokens = self.embed_image(image)
        block_c = self.time_proj(c) if hasattr(self, "time_proj") else c
        rope = self.rope(grid, x.device, torch.float64 if x.dtype == torch.float64 else torch.float32)  # (N, Dh/2) each
        frames = self.frames(grid)
        for block in self.blocks:
            tokens = block(tokens, block_c, context, context_mask, rope, frames, image_tokens)
        return self.unpatchify(self.final_layer(tokens, c, frames), (t_len, h, w))

    def embed_image(self, image: torch.Tensor | None) -> torch.Tensor | None:
        """The embedded image tokens (B, L, D) every cross-attention reads, or None without image conditioning."""
        if (image is None) != (self.cfg.image_dim is None):
            raise ValueError(f"model image_dim={self.cfg.image_dim} but image tokens {'missing' if image is None else 'given'}")
        return None if image is None else self.image_embedder(image)

    def padded_context(self, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """(B, text_len, D): the embedded caption tokens then the embedding of a zero token up to
        text_len, as if the zero-padded captions were embedded whole. The projection is row-wise,
        so only the rows that hold a token (at least the empty prompt's) are projected, and the
        zero token once: with a 100-token caption, a fifth of the 512 rows."""
        length, empty = self.cfg.text_len, self.empty_caption.to(text.dtype)
        rows = min(length, max(text.shape[1], empty.shape[0]))
        text, text_mask = text[:, :rows], text_mask[:, :rows]
        text = text.masked_fill(~text_mask[..., None], 0.0)
        if text.shape[1] < rows:
            text = F.pad(text, (0, 0, 0, rows - text.shape[1]))
        # A row with no token (guidance's unconditional half, caption dropout) is the empty prompt:
        # its first rows take the prompt's states (the rest are zero already).
        dropped = ~text_mask.any(dim=1)
        first = empty.shape[0]  # never more than rows
        text[:, :first] = torch.where(dropped[:, None, None], empty[None], text[:, :first])
        context = self.text_embedder(text)
        if rows == length:
            return context
        zero_token = self.text_embedder(text.new_zeros(text.shape[0], 1, text.shape[2]))  # one per sample, as counted
        return torch.cat([context, zero_token.expand(-1, length - rows, -1)], dim=1)

    def caption_context(self, text: torch.Tensor, text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The cross-attention context and its key mask. "masked": the null token then the
        caption's tokens, (B, 1+L, D), with the mask. "padded" (Wan): the caption's real tokens
        (a prefix, by the mask) then zeros up to text_len, all attended to: no mask; a caption
        with no token is the empty prompt's (``empty_caption``)."""
        if self.cfg.text_context == "padded":
            return self.padded_context(text, text_mask), None
        b = text.shape[0]
        context = torch.cat([self.null_text.expand(b, -1, -1), self.text_embedder(text)], dim=1)
        return context, torch.cat([text_mask.new_ones(b, 1), text_mask], dim=1)
