"""Closed-form parameter and FLOP counts of VideoDiT (matmul FLOPs: 2 per multiply-add).

Model FLOPs per training sample (what MFU counts) are 3x the forward: the backward costs two
forwards. ``executed_train_flops`` counts what one rank of a parallel layout actually runs:
the backward of a layer fed by data (the patch embedding, the first layers of the timestep and
caption MLPs) computes no input gradient, sequence parallelism splits only the tokens' work
(the embedding before the split and the per-sample conditioning run on every SP rank), tensor
parallelism only the layers of its plan, and activation checkpointing repeats blocks' forwards.
Tests compare the formulas with the real module and with torch's FLOP counter.
"""

from __future__ import annotations

from typing import NamedTuple

from sora_dist.models.dit import TIMESTEP_FREQ_DIM, DiTConfig


def _linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def count_parameters(cfg: DiTConfig) -> int:
    d, p_c = cfg.hidden_size, cfg.patch_volume * cfg.in_channels
    qk_norm = 2 * (d if cfg.qk_norm_scope == "all_heads" else cfg.head_dim) if cfg.qk_norm else 0
    attention = 4 * _linear(d, d) + qk_norm
    block = (
        2 * attention  # self- and cross-attention
        + 2 * d  # affine LayerNorm before cross-attention
        + _linear(d, cfg.mlp_hidden) + _linear(cfg.mlp_hidden, d)
        + _linear(d, 6 * d)  # adaLN-Zero modulation
    )
    return (
        _linear(p_c, d)  # patch embedding
        + _linear(TIMESTEP_FREQ_DIM, d) + _linear(d, d)  # timestep MLP
        + _linear(cfg.text_dim, d) + _linear(d, d)  # caption projection
        + d  # null text token
        + cfg.depth * block
        + _linear(d, 2 * d) + _linear(d, p_c)  # final layer
    )


class Matmuls(NamedTuple):
    """Forward FLOPs of one kind of matmul for one sample, and how a parallel layout divides them."""

    flops: int
    by_sp: bool
    """Split with the tokens over the sequence-parallel ranks (else every SP rank runs it)."""
    by_tp: bool
    """Split with the heads or MLP columns over the tensor-parallel ranks (in the TP plan)."""
    input_grad: bool = True
    """The backward computes the input's gradient as well as the weight's (not for data inputs)."""
    in_blocks: bool = False
    """Inside the DiT blocks: repeated when activation checkpointing recomputes a block."""


def forward_matmuls(cfg: DiTConfig, latent_shape: tuple[int, int, int], text_len: int, per_frame_t: bool = False) -> list[Matmuls]:
    """Every matmul of one forward pass of one sample of latent (T, h, w) and text_len tokens.
    With ``per_frame_t`` (a timestep per latent frame) the timestep MLP and the adaLN
    modulation run once per patch frame instead of once per sample."""
    d, m, p_c = cfg.hidden_size, cfg.mlp_hidden, cfg.patch_volume * cfg.in_channels
    n, ctx = cfg.num_tokens(latent_shape), text_len + 1  # +1: the null text token
    conditions = cfg.grid(latent_shape)[0] if per_frame_t else 1
    blocks = cfg.depth
    return [
        Matmuls(2 * n * p_c * d, by_sp=False, by_tp=False, input_grad=False),  # patch embedding, before the SP split
        Matmuls(conditions * 2 * TIMESTEP_FREQ_DIM * d, False, False, input_grad=False),  # timestep MLP
        Matmuls(conditions * 2 * d * d, False, False),
        Matmuls(2 * text_len * cfg.text_dim * d, False, False, input_grad=False),  # caption projection
        Matmuls(2 * text_len * d * d, False, False),
        Matmuls(blocks * 2 * n * 4 * d * d, True, True, in_blocks=True),  # self-attention q, k, v, out
        Matmuls(blocks * 4 * n * n * d, True, True, in_blocks=True),  # q k^T and attention @ v
        Matmuls(blocks * 2 * n * 2 * d * d, True, True, in_blocks=True),  # cross-attention q and out
        Matmuls(blocks * 2 * ctx * 2 * d * d, False, True, in_blocks=True),  # cross-attention k, v of the text
        Matmuls(blocks * 4 * n * ctx * d, True, True, in_blocks=True),  # cross-attention scores and values
        Matmuls(blocks * 2 * n * 2 * d * m, True, True, in_blocks=True),  # MLP
        Matmuls(blocks * conditions * 2 * d * 6 * d, False, False, in_blocks=True),  # adaLN modulation
        Matmuls(conditions * 2 * d * 2 * d, False, False),  # final layer: modulation
        Matmuls(2 * n * d * p_c, True, False),  # and its projection to patches
    ]


def forward_flops(cfg: DiTConfig, latent_shape: tuple[int, int, int], text_len: int, per_frame_t: bool = False) -> int:
    """Matmul FLOPs of one forward pass of one sample (see ``forward_matmuls``)."""
    return sum(term.flops for term in forward_matmuls(cfg, latent_shape, text_len, per_frame_t))


def train_flops(cfg: DiTConfig, latent_shape: tuple[int, int, int], text_len: int, per_frame_t: bool = False) -> int:
    """Model FLOPs of one training sample: forward plus backward (2x forward)."""
    return 3 * forward_flops(cfg, latent_shape, text_len, per_frame_t)


def executed_train_flops(cfg: DiTConfig, latent_shape: tuple[int, int, int], text_len: int, sp: int = 1, tp: int = 1,
                         recomputed_blocks: int = 0, per_frame_t: bool = False) -> float:
    """FLOPs that one rank runs for one sample's forward and backward, with the sample's tokens
    split over ``sp`` ranks and the TP plan over ``tp``, and ``recomputed_blocks`` of the blocks
    checkpointed (their forward runs again in the backward)."""
    total = 0.0
    for term in forward_matmuls(cfg, latent_shape, text_len, per_frame_t):
        share = term.flops / ((sp if term.by_sp else 1) * (tp if term.by_tp else 1))
        passes = (3 if term.input_grad else 2) + (recomputed_blocks / cfg.depth if term.in_blocks else 0)
        total += share * passes
    return total
