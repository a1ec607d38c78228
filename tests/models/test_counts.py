import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sora_dist.config import ModelConfig
from sora_dist.kernels import set_attention_backend
from sora_dist.config import resolve_model_config
from sora_dist.models import PRESETS, VideoDiT, count_parameters, executed_train_flops, forward_flops, train_flops
from sora_dist.models.flops import image_tokens

# Nominal size of each preset with a 4096-wide text encoder (T5-XXL) and 4 latent channels.
NOMINAL = {"debug": (0.4e6, 0.6e6), "S": (35e6, 50e6), "B": (140e6, 180e6), "L": (0.5e9, 0.62e9),
           "XL": (0.75e9, 0.9e9), "1B": (0.95e9, 1.15e9), "3B": (2.8e9, 3.3e9), "7B": (6.5e9, 7.5e9),
           # Wan's own latent channels and umT5 width, whatever is passed: the published 1.3B, 14B, 5B.
           "wan2.1-t2v-1.3b": (1.40e9, 1.43e9), "wan2.1-t2v-14b": (14.2e9, 14.3e9), "wan2.2-ti2v-5b": (4.9e9, 5.1e9),
           "wan2.2-t2v-a14b": (14.2e9, 14.3e9),
           # the 14B plus the image tokens' keys and values in 40 cross-attentions and the image embedder
           "wan2.1-i2v-14b": (16.3e9, 16.5e9), "wan2.1-flf2v-14b": (16.3e9, 16.5e9)}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_parameter_formula_matches_module_and_nominal_size(preset):
    cfg = resolve_model_config(ModelConfig(preset=preset), in_channels=4, text_dim=4096)
    with torch.device("meta"):
        model = VideoDiT(cfg)
    actual = sum(p.numel() for p in model.parameters())
    assert count_parameters(cfg) == actual
    low, high = NOMINAL[preset]
    assert low <= actual <= high, f"{preset}: {actual / 1e6:.1f}M parameters"


def test_an_ffn_width_given_directly_overrides_the_ratio():
    """Wan 2.1 1.3B's MLP is 8960 wide at width 1536 (5.833...x): no ratio gives it exactly."""
    cfg = resolve_model_config(ModelConfig(hidden_size=1536, depth=1, num_heads=12, ffn_dim=8960), in_channels=16, text_dim=4096)
    with torch.device("meta"):
        model = VideoDiT(cfg)
    assert cfg.mlp_hidden == 8960 and model.blocks[0].mlp.fc1.weight.shape == (8960, 1536)
    assert count_parameters(cfg) == sum(p.numel() for p in model.parameters())
    assert resolve_model_config(ModelConfig(hidden_size=1536, depth=1, num_heads=12), 16, 4096).mlp_hidden == 6144


# Wan's options: one shared modulation projection with per-block tables, fixed unmasked context.
WAN_OPTIONS = {"modulation": "shared", "text_context": "padded", "text_len": 40, "qk_norm_scope": "all_heads", "ffn_dim": 100}


def test_parameter_formula_counts_wan_options():
    """Shared modulation replaces depth projections of 6 x hidden^2 by one and small tables: the
    saving that keeps Wan 14B at 14B."""
    cfg = resolve_model_config(ModelConfig(hidden_size=1536, depth=3, num_heads=12, **WAN_OPTIONS), in_channels=16, text_dim=4096)
    with torch.device("meta"):
        model = VideoDiT(cfg)
    assert count_parameters(cfg) == sum(p.numel() for p in model.parameters())
    per_block = resolve_model_config(ModelConfig(hidden_size=1536, depth=3, num_heads=12, **{**WAN_OPTIONS, "modulation": "per_block"}), 16, 4096)
    d, depth = 1536, 3
    projections = depth * (6 * d * d + 6 * d) + (2 * d * d + 2 * d)  # every block's and the final layer's
    shared = (6 * d * d + 6 * d) + depth * 6 * d + 2 * d  # one projection, the tables
    assert count_parameters(per_block) - count_parameters(cfg) == projections - shared
    assert not hasattr(model, "null_text") and model.blocks[0].scale_shift_table.table.shape == (1, 6, d)


@pytest.mark.parametrize("preset", [name for name in PRESETS if name.startswith("wan")])
def test_wan_presets_have_exactly_diffusers_parameters(preset):
    """Each wan preset builds the transformer diffusers builds from that model's config."""
    diffusers = pytest.importorskip("diffusers")
    from sora_dist.interop.wan import diffusers_config

    cfg = resolve_model_config(ModelConfig(preset=preset), in_channels=4, text_dim=64)
    config = {key: value for key, value in diffusers_config(cfg).items() if not key.startswith("_")}
    with torch.device("meta"):
        reference = diffusers.WanTransformer3DModel(**config)
    assert count_parameters(cfg) == sum(p.numel() for p in reference.parameters())


# Image conditioning as Wan 2.1 I2V has it (12 channels read, 4 predicted, 24-wide image tokens), and FLF2V's position table.
I2V = {"in_channels": 12, "out_channels": 4, "image_dim": 24}
FLF2V = {**I2V, "image_len": 10}


def test_parameter_formula_counts_image_conditioning():
    for image in (I2V, FLF2V):
        cfg = dataclasses.replace(resolve_model_config(ModelConfig(preset="debug", **WAN_OPTIONS), 4, 32), **image)
        with torch.device("meta"):
            model = VideoDiT(cfg)
        assert count_parameters(cfg) == sum(p.numel() for p in model.parameters()), image


@pytest.mark.parametrize("per_frame_t", [False, True], ids=["t-per-sample", "t-per-frame"])
@pytest.mark.parametrize("shape, patch_size, options", [
    ((1, 16, 16), (1, 2, 2), {}), ((5, 12, 20), (1, 2, 2), {}), ((8, 10, 10), (1, 2, 2), {}),
    ((1, 16, 16), (2, 2, 2), {}), ((5, 12, 20), (2, 2, 2), {}), ((8, 10, 10), (2, 2, 2), {}),
    ((5, 12, 20), (1, 2, 2), WAN_OPTIONS), ((8, 10, 10), (2, 2, 2), WAN_OPTIONS),
    ((5, 12, 20), (1, 2, 2), {**WAN_OPTIONS, **I2V}), ((8, 10, 10), (2, 2, 2), {**WAN_OPTIONS, **FLF2V}),
], ids=lambda v: ("wan-image" if "image_dim" in v else "wan") if isinstance(v, dict) and v else None)
def test_flop_formula_matches_measured_count(shape, patch_size, options, per_frame_t):
    options = dict(options)  # the image options are DiTConfig's alone (presets set them), not ModelConfig's
    image = {key: options.pop(key) for key in ("in_channels", "out_channels", "image_dim", "image_len") if key in options}
    cfg = dataclasses.replace(resolve_model_config(ModelConfig(preset="debug", patch_size=patch_size, **options), in_channels=4, text_dim=32), **image)
    model = VideoDiT(cfg)
    batch, text_len = 2, 7
    t = torch.rand(batch, cfg.grid(shape)[0]) if per_frame_t else torch.rand(batch)
    args = (torch.randn(batch, cfg.in_channels, *shape), t * 1000, torch.randn(batch, text_len, 32), torch.ones(batch, text_len, dtype=torch.bool))
    image_states = torch.randn(batch, image_tokens(cfg), cfg.image_dim) if cfg.image_dim else None
    # The FLOP counter does not see CPU SDPA's fused kernel; the reference backend is plain matmuls.
    set_attention_backend("reference")
    try:
        with FlopCounterMode(display=False) as forward:
            out = model(*args, image=image_states)
        with FlopCounterMode(display=False) as backward:
            out.sum().backward()
    finally:
        set_attention_backend("sdpa")
    assert forward.get_total_flops() == batch * forward_flops(cfg, shape, text_len, per_frame_t)
    # The backward runs two forwards' worth, but no input gradient for the layers fed by data.
    measured_train = forward.get_total_flops() + backward.get_total_flops()
    assert measured_train == batch * executed_train_flops(cfg, shape, text_len, per_frame_t=per_frame_t)
    assert measured_train == pytest.approx(batch * train_flops(cfg, shape, text_len, per_frame_t), rel=0.05)
