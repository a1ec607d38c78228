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

from sora_dist.models.dit import EMPTY_CAPTION_TOKENS, TIMESTEP_FREQ_DIM, DiTConfig

IMAGE_TOKENS = 257
"""Image tokens of an image-conditioned model without a position table: one CLIP ViT-H/14 image
(256 patches and the class token), as Wan 2.1 I2V reads them."""


def _linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def image_tokens(cfg: DiTConfig) -> int:
    """Image tokens every cross-attention reads: the position table's length, one CLIP image, or none."""
    return 0 if cfg.image_dim is None else cfg.image_len or IMAGE_TOKENS


def count_parameters(cfg: DiTConfig) -> int:
    d, p_c, p_out = cfg.hidden_size, cfg.patch_volume * cfg.in_channels, cfg.patch_volume * cfg.predicted_channels
    qk_norm = 2 * (d if cfg.qk_norm_scope == "all_heads" else cfg.head_dim) if cfg.qk_norm else 0
    attention = 4 * _linear(d, d) + qk_norm
    shared = cfg.modulation == "shared"
    image = cfg.image_dim is not None
    img = cfg.image_dim or 0
    image_embedder = 2 * img + _linear(img, img) + _linear(img, d) + 2 * d + (cfg.image_len or 0) * img if image else 0
    block = (
        2 * attention  # self- and cross-attention
        + (2 * _linear(d, d) + d if image else 0)  # the image tokens' keys, values and key norm
        + 2 * d  # affine LayerNorm before cross-attention
        + _linear(d, cfg.mlp_hidden) + _linear(cfg.mlp_hidden, d)
        + (6 * d if shared else _linear(d, 6 * d))  # modulation: the block's table, or its adaLN-Zero projection
    )
    return (
        _linear(p_c, d)  # patch embedding
        + _linear(TIMESTEP_FREQ_DIM, d) + _linear(d, d)  # timestep MLP
        + (_linear(d, 6 * d) if shared else 0)  # the blocks' shared modulation projection
        + _linear(cfg.text_dim, d) + _linear(d, d)  # caption projection
        + (d if cfg.text_context == "masked" else 0)  # null text token
        + image_embedder
        + cfg.depth * block
        + (2 * d if shared else _linear(d, 2 * d)) + _linear(d, p_out)  # final layer: modulation, projection
    )


def context_len(cfg: DiTConfig, text_len: int) -> int:
    """Cross-attention keys for a caption of ``text_len`` tokens: those plus the null token, or
    under text_context "padded" the model's fixed cfg.text_len."""
    return cfg.text_len if cfg.text_context == "padded" else text_len + 1


def projected_text_rows(cfg: DiTConfig, text_len: int) -> int:
    """Rows the caption projection runs on for a caption of ``text_len`` tokens: those, or under
    text_context "padded" the caption's rows (at least the empty prompt's) plus one zero token
    standing for the padding (VideoDiT.padded_context)."""
    if cfg.text_context != "padded":
        return text_len
    rows = min(cfg.text_len, max(text_len, EMPTY_CAPTION_TOKENS))
    return rows + (1 if rows < cfg.text_len else 0)


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
    """Every matmul of one forward pass of one sample of latent (T, h, w) and text_len tokens
    (under text_context "padded" the model's cfg.text_len instead, whatever the caption's).
    With ``per_frame_t`` (a timestep per latent frame) the timestep MLP and the adaLN
    modulation run once per patch frame instead of once per sample."""
    d, m, p_c, p_out = cfg.hidden_size, cfg.mlp_hidden, cfg.patch_volume * cfg.in_channels, cfg.patch_volume * cfg.predicted_channels
    ctx, img, n_img = context_len(cfg, text_len), cfg.image_dim or 0, image_tokens(cfg)
    text_len = projected_text_rows(cfg, text_len)
    n = cfg.num_tokens(latent_shape)
    conditions = cfg.grid(latent_shape)[0] if per_frame_t else 1
    blocks = cfg.depth
    shared = cfg.modulation == "shared"
    return [
        Matmuls(2 * n * p_c * d, by_sp=False, by_tp=False, input_grad=False),  # patch embedding, before the SP split
        Matmuls(conditions * 2 * TIMESTEP_FREQ_DIM * d, False, False, input_grad=False),  # timestep MLP
        Matmuls(conditions * 2 * d * d, False, False),
        Matmuls(2 * text_len * cfg.text_dim * d, False, False, input_grad=False),  # caption projection
        Matmuls(2 * text_len * d * d, False, False),
        Matmuls(2 * n_img * img * img, False, False),  # image embedder (fed by its affine LayerNorm: input gradients too)
        Matmuls(2 * n_img * img * d, False, False),
        Matmuls(blocks * 2 * n * 4 * d * d, True, True, in_blocks=True),  # self-attention q, k, v, out
        Matmuls(blocks * 4 * n * n * d, True, True, in_blocks=True),  # q k^T and attention @ v
        Matmuls(blocks * 2 * n * 2 * d * d, True, True, in_blocks=True),  # cross-attention q and out
        Matmuls(blocks * 2 * ctx * 2 * d * d, False, True, in_blocks=True),  # cross-attention k, v of the text
        Matmuls(blocks * 4 * n * ctx * d, True, True, in_blocks=True),  # cross-attention scores and values
        Matmuls(blocks * 2 * n_img * 2 * d * d, False, True, in_blocks=True),  # the image tokens' keys and values
        Matmuls(blocks * 4 * n * n_img * d, True, True, in_blocks=True),  # and their scores and values
        Matmuls(blocks * 2 * n * 2 * d * m, True, True, in_blocks=True),  # MLP
        Matmuls((1 if shared else blocks) * conditions * 2 * d * 6 * d, False, False, in_blocks=not shared),  # modulation
        Matmuls(0 if shared else conditions * 2 * d * 2 * d, False, False),  # final layer: modulation
        Matmuls(2 * n * d * p_out, True, False),  # and its projection to patches
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
