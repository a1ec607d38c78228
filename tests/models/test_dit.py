import pytest
import torch
from einops import rearrange

from sora_dist.config import ModelConfig
from sora_dist.kernels import BACKENDS, attention, set_attention_backend
from sora_dist.config import resolve_model_config
from sora_dist.models import DiTConfig, VideoDiT, count_parameters
from sora_dist.kernels.fused import rope as apply_rope
from sora_dist.models.dit import AllHeadsRMSNorm, rope_angles, rope_dims

TEXT_DIM = 24


def tiny(patch_size=(1, 2, 2), **overrides):
    torch.manual_seed(0)
    cfg = resolve_model_config(ModelConfig(preset="debug", patch_size=patch_size, **overrides), in_channels=4, text_dim=TEXT_DIM)
    model = VideoDiT(cfg)
    # Zero-initialized outputs would hide every bug below: give all weights random values.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def inputs(b, shape, text_len=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, *shape, generator=g)
    t = torch.rand(b, generator=g) * 1000
    text = torch.randn(b, text_len, TEXT_DIM, generator=g)
    mask = torch.ones(b, text_len, dtype=torch.bool)
    mask[0, text_len // 2 :] = False
    return x, t, text, mask


@pytest.mark.parametrize(
    "shape",
    [(1, 16, 16), (1, 12, 20), (1, 20, 12), (8, 16, 16), (5, 12, 20), (3, 9, 15), (17, 6, 30)],
    ids=["image-square", "image-wide", "image-tall", "clip-square", "clip-wide", "clip-odd", "clip-long"],
)
@pytest.mark.parametrize("patch_size", [(1, 2, 2), (2, 2, 2)])
def test_output_has_input_shape_for_images_and_videos(shape, patch_size):
    model = tiny(patch_size)
    out = model(*inputs(2, shape))
    assert out.shape == (2, 4, *shape)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("shape", [(1, 8, 8), (4, 6, 10), (3, 7, 9)])
@pytest.mark.parametrize("patch_size", [(1, 2, 2), (2, 2, 2), (1, 1, 1)])
def test_unpatchify_inverts_patchify(shape, patch_size):
    model = tiny(patch_size)
    x = torch.randn(2, 4, *shape)
    tokens = model.patchify(x)
    assert tokens.shape == (2, model.cfg.num_tokens(shape), 4 * model.cfg.patch_volume)
    torch.testing.assert_close(model.unpatchify(tokens, shape), x)


def test_patch_holds_a_contiguous_spacetime_block():
    model = tiny((2, 2, 2))
    x = torch.arange(4 * 4 * 4 * 4, dtype=torch.float32).reshape(1, 4, 4, 4, 4)
    first = model.patchify(x)[0, 0].reshape(4, 2, 2, 2)  # token 0: frames 0-1, rows 0-1, cols 0-1
    torch.testing.assert_close(first, x[0, :, :2, :2, :2])


def test_fresh_model_predicts_zero():
    """adaLN-Zero: at init every block is the identity and the output layer is zero."""
    cfg = resolve_model_config(ModelConfig(preset="debug"), in_channels=4, text_dim=TEXT_DIM)
    out = VideoDiT(cfg)(*inputs(2, (2, 8, 8)))
    assert torch.count_nonzero(out) == 0


def test_padded_text_tokens_are_ignored():
    model = tiny()
    x, t, text, mask = inputs(2, (2, 8, 8))
    changed = text.clone()
    changed[~mask] = 100.0  # garbage where the mask says padding
    torch.testing.assert_close(model(x, t, text, mask), model(x, t, changed, mask))
    changed[0, 0] = 100.0  # but a real token matters
    assert not torch.allclose(model(x, t, text, mask)[0], model(x, t, changed, mask)[0])


def test_dropped_caption_is_well_defined():
    """All text masked (classifier-free guidance) attends to the null token only: no NaN."""
    model = tiny()
    x, t, text, mask = inputs(2, (2, 8, 8))
    out = model(x, t, text, torch.zeros_like(mask))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, model(x, t, torch.randn_like(text), torch.zeros_like(mask)))


def test_samples_in_a_batch_are_independent():
    model = tiny()
    x, t, text, mask = inputs(3, (2, 6, 10))
    batched = model(x, t, text, mask)
    for i in range(3):
        torch.testing.assert_close(model(x[i : i + 1], t[i : i + 1], text[i : i + 1], mask[i : i + 1])[0], batched[i], atol=1e-5, rtol=1e-5)


def test_rope_depends_only_on_relative_position():
    head_dim = 30
    assert sum(rope_dims(head_dim)) == head_dim and all(d % 2 == 0 for d in rope_dims(head_dim))
    grid = (3, 4, 5)
    cos, sin = rope_angles(grid, head_dim, 10000.0, torch.device("cpu"))
    q, k = torch.randn(head_dim), torch.randn(head_dim)
    n = cos.shape[0]
    q_rot = apply_rope(q.expand(1, 1, n, -1), cos, sin)[0, 0]
    k_rot = apply_rope(k.expand(1, 1, n, -1), cos, sin)[0, 0]
    torch.testing.assert_close(q_rot.norm(dim=-1), q.norm().expand(n))  # rotations keep norms
    index = lambda t, h, w: (t * grid[1] + h) * grid[2] + w  # noqa: E731
    # Same (dt, dh, dw) offset at two places in the grid -> same score.
    a = q_rot[index(0, 1, 1)] @ k_rot[index(1, 2, 3)]
    b = q_rot[index(1, 2, 2)] @ k_rot[index(2, 3, 4)]
    torch.testing.assert_close(a, b)
    c = q_rot[index(0, 1, 1)] @ k_rot[index(1, 2, 4)]  # another offset -> another score
    assert not torch.allclose(a, c)


def test_video_model_handles_sizes_never_seen():
    """No learned position table: a grid larger than any other in this file just works."""
    out = tiny()(*inputs(1, (4, 40, 24)))
    assert out.shape == (1, 4, 4, 40, 24)


@pytest.mark.parametrize("backend", ["sdpa", "reference"])  # device backends: tests/kernels
def test_attention_backends_match_reference(backend):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for n in (10, 7, 7))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    expected = BACKENDS["reference"](q, k, v, mask)
    set_attention_backend(backend)
    try:
        torch.testing.assert_close(attention(q, k, v, mask), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(attention(q, k, v), BACKENDS["reference"](q, k, v), atol=1e-5, rtol=1e-5)
    finally:
        set_attention_backend("sdpa")


def test_meta_build_then_init_is_deterministic():
    cfg = resolve_model_config(ModelConfig(preset="debug"), in_channels=4, text_dim=TEXT_DIM)

    def build(seed):
        with torch.device("meta"):
            model = VideoDiT(cfg)
        assert all(p.is_meta for p in model.parameters())
        model.to_empty(device="cpu")
        torch.manual_seed(seed)
        model.init_weights()
        return model.state_dict()

    first, again, other = build(3), build(3), build(4)
    for name in first:
        torch.testing.assert_close(first[name], again[name], msg=name)
    assert not torch.equal(first["blocks.0.attn.to_q.weight"], other["blocks.0.attn.to_q.weight"])
    assert torch.count_nonzero(first["final_layer.linear.weight"]) == 0  # adaLN-Zero init applied


@pytest.mark.parametrize("shape, patch_size", [((5, 12, 20), (1, 2, 2)), ((5, 8, 8), (2, 2, 2)), ((1, 16, 16), (1, 2, 2))])
def test_the_same_timestep_on_every_frame_equals_one_per_sample(shape, patch_size):
    model = tiny(patch_size)
    x, t, text, mask = inputs(2, shape)
    frames = model.cfg.grid(shape)[0]
    # Equal up to fp32 rounding (seen: 1.7e-6): the modulation matmul runs over B*T' rows, not B.
    torch.testing.assert_close(model(x, t[:, None].expand(-1, frames), text, mask), model(x, t, text, mask), rtol=1e-5, atol=1e-5)


def per_token_reference(op, span, tokens, mods):
    """op on modulation materialized for every token (the plain way): token i of the span gets
    the modulation of frame min((first + i) // S, T' - 1)."""
    index = torch.clamp((span.first + torch.arange(span.count)) // span.frame_tokens, max=span.num_frames - 1)
    per_token = [m[:, index] for m in mods]  # (B, n, D)
    return op(*tokens, *per_token)


@pytest.mark.parametrize("first, count", [(0, 24), (0, 12), (6, 12), (3, 5), (10, 14), (20, 8), (4, 20)])
def test_per_frame_modulation_equals_broadcasting_to_every_token(first, count):
    from sora_dist.kernels.fused import reference_modulated_layer_norm
    from sora_dist.models.dit import FrameSpan, per_frame

    span = FrameSpan(first=first, count=count, frame_tokens=6, num_frames=4)  # 24 tokens; 20+8 pads
    runs = span.segments()
    assert sum(tokens for _, _, tokens in runs) == count and runs[0][0] == min(first // 6, 3)
    g = torch.Generator().manual_seed(first * 100 + count)
    x = torch.randn(2, count, 8, generator=g)
    shift, scale = torch.randn(2, 4, 8, generator=g), torch.randn(2, 4, 8, generator=g)

    def op(x, shift, scale):  # per-token reference accepts (B, n, D) modulation
        if shift.dim() == 2:
            return reference_modulated_layer_norm(x, shift, scale)
        return torch.nn.functional.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale) + shift

    torch.testing.assert_close(per_frame(op, span, (x,), (shift, scale)), per_token_reference(op, span, (x,), (shift, scale)))


def test_all_heads_qk_norm_is_one_rms_norm_over_the_flat_projection():
    """Wan's QK-norm: torch.nn.RMSNorm over all heads' channels of q (or k) together, exactly."""
    heads, head_dim = 6, 8
    norm = AllHeadsRMSNorm(heads, head_dim).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    flat = torch.nn.RMSNorm(heads * head_dim, eps=1e-6, dtype=torch.float64)
    flat.load_state_dict(norm.state_dict())
    q = torch.randn(2, 7, heads * head_dim, dtype=torch.float64)
    ours = rearrange(norm(rearrange(q, "b n (h d) -> b h n d", h=heads)), "b h n d -> b n (h d)")
    assert torch.equal(ours, flat(q))
    per_head = resolve_model_config(ModelConfig(preset="debug"), 4, TEXT_DIM)
    all_heads = resolve_model_config(ModelConfig(preset="debug", qk_norm_scope="all_heads"), 4, TEXT_DIM)
    model = VideoDiT(all_heads)
    assert model.blocks[0].attn.q_norm.weight.shape == (all_heads.hidden_size,)
    assert count_parameters(all_heads) == sum(p.numel() for p in model.parameters())
    assert count_parameters(all_heads) - count_parameters(per_head) == 4 * all_heads.depth * (all_heads.hidden_size - all_heads.head_dim)


def test_a_dropped_caption_is_the_empty_prompt_under_padded_context():
    """Wan's unconditional input: the text encoder's states for "" zero-padded, not zeros; a row
    with no caption token (caption dropout, guidance's unconditional half) gets exactly that."""
    cfg = DiTConfig(in_channels=4, text_dim=8, hidden_size=32, depth=1, num_heads=2, modulation="shared", text_context="padded", text_len=6)
    torch.manual_seed(0)
    model = VideoDiT(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    empty = torch.randn(2, 8)
    model.empty_caption[:2] = empty
    x, t = torch.randn(2, 4, 1, 4, 4), torch.tensor([300.0, 300.0])
    text, mask = torch.randn(2, 3, 8), torch.tensor([[True, True, False], [False, False, False]])
    out = model(x, t, text, mask)
    given = text.clone()
    given[1] = torch.cat([empty, torch.zeros(1, 8)])  # the empty prompt's states given as a caption
    as_empty = model(x, t, given, torch.tensor([[True, True, False], [True, True, False]]))
    torch.testing.assert_close(out, as_empty, rtol=0, atol=0)
    zeros = model(x, t, torch.zeros_like(text), torch.ones_like(mask))
    assert not torch.allclose(out[1], zeros[1])
