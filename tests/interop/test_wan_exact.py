"""A diffusers WanTransformer3DModel, saved with save_pretrained and loaded by sora_dist, gives the
same output and the same parameter gradients as diffusers; and the same in reverse for export."""

import pytest
import torch

pytest.importorskip("diffusers")

from sora_dist.interop.load import load_wan  # noqa: E402
from sora_dist.interop.wan import TensorMap, state_dict_to_theirs, tensor_maps, to_ours  # noqa: E402
from sora_dist.kernels import set_attention_backend  # noqa: E402
from wan_reference import VARIANTS, diffusers_in_float64, empty_model, image_tokens, inputs, make_wan, our_config, save_wan, wan_image, wan_inputs  # noqa: E402

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run_both(tmp_path, dtype, per_frame_t, max_shard_size="5GB", variant="t2v"):
    """Outputs and gradients of diffusers' Wan and of ours loaded from its saved folder, the
    gradients of Wan's tensors given in our layout."""
    wan = make_wan(dtype, variant=variant)
    folder = save_wan(wan, tmp_path / "wan", max_shard_size)
    cfg = our_config(wan)
    ours = empty_model(cfg, dtype)
    load_wan(ours, folder)
    x, t, text, mask = inputs(cfg, dtype, per_frame_t)
    image = image_tokens(cfg, dtype)
    out = ours(x, t, text, mask, image=image)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=dtype)
    (out * weight).sum().backward()
    wx, wt, wtext = wan_inputs(cfg, x, t, text, mask)
    with diffusers_in_float64() if dtype == torch.float64 else torch.enable_grad():
        ref = wan(wx, wt, wtext, encoder_hidden_states_image=wan_image(cfg, image), return_dict=False)[0]
        (ref * weight).sum().backward()
    wan_params = dict(wan.named_parameters())
    ours_shapes = {name: tuple(p.shape) for name, p in ours.named_parameters()}
    grads = {m.ours: (dict(ours.named_parameters())[m.ours].grad, to_ours(wan_params[m.theirs].grad, m, ours_shapes[m.ours])) for m in tensor_maps(cfg)}
    return out, ref, grads, ours, wan


@pytest.fixture(autouse=True)
def plain_attention():
    set_attention_backend("sdpa")
    yield


CASES = [("t2v", False), ("t2v", True), ("i2v", False), ("flf2v", False)]  # TI2V: t2v with a timestep per frame


@pytest.mark.parametrize("variant, per_frame_t", CASES, ids=["t2v", "ti2v-t-per-frame", "i2v", "flf2v"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_loaded_wan_matches_diffusers_output_and_gradients(tmp_path, dtype, variant, per_frame_t):
    out, ref, grads, _, _ = run_both(tmp_path, dtype, per_frame_t, variant=variant)
    assert out.shape == ref.shape
    assert relative(out, ref) <= TOLERANCE[dtype], relative(out, ref)
    ours_grads, wan_grads = (torch.cat([pair[i].flatten() for pair in grads.values()]) for i in (0, 1))
    assert relative(ours_grads, wan_grads) <= TOLERANCE[dtype], relative(ours_grads, wan_grads)
    if dtype == torch.float64:  # every tensor's own gradient too (in fp32 a near-zero one is all rounding)
        worst = max(grads, key=lambda name: relative(*grads[name]))
        assert relative(*grads[worst]) <= TOLERANCE[dtype], (worst, relative(*grads[worst]))


def test_a_sharded_folder_loads_the_same(tmp_path):
    """save_pretrained with a small shard size writes many files and an index."""
    out, ref, _, _, _ = run_both(tmp_path, torch.float64, False, max_shard_size="20KB")
    assert len(list((tmp_path / "wan").glob("*.safetensors"))) > 3
    assert relative(out, ref) <= 1e-10


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_gives_back_diffusers_tensors_exactly(tmp_path, variant):
    wan = make_wan(torch.float64, variant=variant)
    cfg = our_config(wan)
    ours = empty_model(cfg)
    load_wan(ours, save_wan(wan, tmp_path / "wan"))
    exported = state_dict_to_theirs(dict(ours.state_dict()), cfg)
    assert exported.keys() == dict(wan.state_dict()).keys()
    for name, tensor in wan.state_dict().items():
        assert torch.equal(exported[name], tensor), name


def swapped(maps: list[TensorMap], a: str, b: str) -> list[TensorMap]:
    """The map with the Wan tensors named by ``a`` and ``b`` (e.g. "attn2.to_k") read in each other's place."""
    def other(name: str) -> str:
        return name.replace(f".{a}.", f".{b}.") if f".{a}." in name else name.replace(f".{b}.", f".{a}.")
    return [TensorMap(m.ours, other(m.theirs), m.theirs_shape, m.rows) for m in maps]


PLANTS = {  # name: (variant, the map planted wrong)
    "no_rope_permutation": ("t2v", lambda maps: [TensorMap(m.ours, m.theirs, m.theirs_shape, None) if ".attn.to_q" in m.ours else m for m in maps]),
    "no_output_permutation": ("i2v", lambda maps: [TensorMap(m.ours, m.theirs, m.theirs_shape, None) if m.ours.startswith("final_layer.linear") else m for m in maps]),
    "swapped_text_keys_and_values": ("t2v", lambda maps: swapped(maps, "attn2.to_k", "attn2.to_v")),
    "swapped_image_keys_and_values": ("i2v", lambda maps: swapped(maps, "attn2.add_k_proj", "attn2.add_v_proj")),
    "no_image_position_table": ("flf2v", lambda maps: [m for m in maps if not m.ours.endswith("pos_embed")]),
}


@pytest.mark.parametrize("plant", PLANTS)
def test_a_wrong_mapping_step_is_caught(tmp_path, monkeypatch, plant):
    """Each layout step of the map, planted wrong, moves the output far beyond the tolerance."""
    from sora_dist.interop import wan as wan_map

    real, (variant, plant_in) = wan_map.tensor_maps, PLANTS[plant]
    monkeypatch.setattr("sora_dist.interop.load.tensor_maps", lambda cfg: plant_in(real(cfg)))
    monkeypatch.setattr("sora_dist.interop.load.check_tensors", lambda files, maps: None)  # a dropped tensor stays as initialized
    out, ref, _, _, _ = run_both(tmp_path, torch.float64, False, variant=variant)
    assert relative(out, ref) > 1e-4, relative(out, ref)


# diffusers name -> the original Wan repository's (Wan-Video/Wan2.1 wan/modules/model.py), written
# out here independently of sora_dist.interop.wan.ORIGINAL_NAMES.
TO_ORIGINAL = [
    ("condition_embedder.image_embedder.norm1.", "img_emb.proj.0."), ("condition_embedder.image_embedder.ff.net.0.proj.", "img_emb.proj.1."),
    ("condition_embedder.image_embedder.ff.net.2.", "img_emb.proj.3."), ("condition_embedder.image_embedder.norm2.", "img_emb.proj.4."),
    ("condition_embedder.image_embedder.pos_embed", "img_emb.emb_pos"), (".attn2.add_k_proj.", ".cross_attn.k_img."),
    (".attn2.add_v_proj.", ".cross_attn.v_img."), (".attn2.norm_added_k.", ".cross_attn.norm_k_img."),
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."), ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."), ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."), ("proj_out.", "head.head."),
    (".attn1.to_out.0.", ".self_attn.o."), (".attn2.to_out.0.", ".cross_attn.o."), (".attn1.to_", ".self_attn."), (".attn2.to_", ".cross_attn."),
    (".attn1.", ".self_attn."), (".attn2.", ".cross_attn."), (".norm2.", ".norm3."), (".ffn.net.0.proj.", ".ffn.0."), (".ffn.net.2.", ".ffn.2."),
    (".scale_shift_table", ".modulation"),
]


def original_name(name: str) -> str:
    if name == "scale_shift_table":
        return "head.modulation"
    for old, new in TO_ORIGINAL:
        if old in name:
            return name.replace(old, new)
    return name


# The original code fixes the image tokens: 1280 wide (CLIP ViT-H/14), 257 per image.
ORIGINAL_VARIANTS = {"t2v": {}, "i2v": {"image_dim": 1280}, "flf2v": {"image_dim": 1280, "pos_embed_seq_len": 2 * 257}}


@pytest.mark.parametrize("variant", ORIGINAL_VARIANTS)
def test_an_original_wan_checkpoint_imports_to_the_same_model(tmp_path, variant):
    import json

    from safetensors.torch import save_file

    wan = make_wan(torch.float64, variant=variant, **ORIGINAL_VARIANTS[variant])
    folder = tmp_path / "original"
    folder.mkdir()
    state = {original_name(k): v.contiguous() for k, v in wan.state_dict().items()}
    assert len(state) == len(wan.state_dict())
    names = sorted(state)
    halves = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[: len(names) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in halves.items():
        save_file({k: state[k] for k in keys}, str(folder / file))
    index = {"weight_map": {k: file for file, keys in halves.items() for k in keys}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    c = wan.config
    (folder / "config.json").write_text(json.dumps({
        "_class_name": "WanModel", "model_type": variant, "patch_size": list(c.patch_size), "text_len": 512, "in_dim": c.in_channels,
        "dim": c.num_attention_heads * c.attention_head_dim, "ffn_dim": c.ffn_dim, "freq_dim": c.freq_dim, "text_dim": c.text_dim,
        "out_dim": c.out_channels, "num_heads": c.num_attention_heads, "num_layers": c.num_layers, "window_size": [-1, -1],
        "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6}))
    cfg = our_config(wan)
    from_original, from_diffusers = empty_model(cfg), empty_model(cfg)
    load_wan(from_original, folder)
    load_wan(from_diffusers, save_wan(wan, tmp_path / "diffusers"))
    for name, tensor in from_diffusers.state_dict().items():
        assert torch.equal(from_original.state_dict()[name], tensor), name
