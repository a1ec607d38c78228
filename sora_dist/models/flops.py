"""Closed-form parameter and FLOP counts of VideoDiT (matmul FLOPs: 2 per multiply-add).

These feed MFU: model FLOPs per training sample are 3x the forward (the backward costs two
forwards). Tests compare both formulas with the real module and with torch's FLOP counter.
"""

from __future__ import annotations

from sora_dist.models.dit import TIMESTEP_FREQ_DIM, DiTConfig


def _linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def count_parameters(cfg: DiTConfig) -> int:
    d, p_c = cfg.hidden_size, cfg.patch_volume * cfg.in_channels
    qk_norm = 2 * cfg.head_dim if cfg.qk_norm else 0
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


def forward_flops(cfg: DiTConfig, latent_shape: tuple[int, int, int], text_len: int, per_frame_t: bool = False) -> int:
    """Matmul FLOPs of one forward pass of one sample of latent (T, h, w) and text_len tokens.
    With ``per_frame_t`` (a timestep per latent frame) the timestep MLP and the adaLN
    modulation run once per patch frame instead of once per sample."""
    d, m, p_c = cfg.hidden_size, cfg.mlp_hidden, cfg.patch_volume * cfg.in_channels
    n, ctx = cfg.num_tokens(latent_shape), text_len + 1  # +1: the null text token
    conditions = cfg.grid(latent_shape)[0] if per_frame_t else 1
    per_block = (
        2 * n * 4 * d * d  # self-attention q, k, v, out projections
        + 4 * n * n * d  # q k^T and attention @ v
        + 2 * n * 2 * d * d + 2 * ctx * 2 * d * d  # cross-attention q/out and k/v projections
        + 4 * n * ctx * d  # cross-attention scores and values
        + 2 * n * 2 * d * m  # MLP
        + conditions * 2 * d * 6 * d  # adaLN modulation (once per sample or per frame)
    )
    return (
        2 * n * p_c * d
        + conditions * 2 * (TIMESTEP_FREQ_DIM * d + d * d)
        + 2 * text_len * (cfg.text_dim * d + d * d)
        + cfg.depth * per_block
        + conditions * 2 * d * 2 * d + 2 * n * d * p_c
    )


def train_flops(cfg: DiTConfig, latent_shape: tuple[int, int, int], text_len: int, per_frame_t: bool = False) -> int:
    """Model FLOPs of one training sample: forward plus backward (2x forward)."""
    return 3 * forward_flops(cfg, latent_shape, text_len, per_frame_t)
