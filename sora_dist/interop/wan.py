"""Wan 2.x transformers (diffusers' ``WanTransformer3DModel`` folders: text-to-video, TI2V, and
Wan 2.1's image-to-video and first-last-frame models with CLIP image tokens) in and out of
``VideoDiT``, exactly.

The model expresses Wan with options (``wan_model_options``); what remains is a map of tensor
names and three layout changes, each exact:
- the patch embedding is a Conv3d, (D, C, p_t, p_h, p_w): the same numbers as our (D, C*p_t*p_h*p_w);
- the output projection's rows are ordered (p_t, p_h, p_w, c), ours (c, p_t, p_h, p_w), c the
  predicted channels (16 of an I2V model's 36 input channels);
- Wan rotates interleaved channel pairs (2i, 2i+1) of each head, our kernels the halves (i, i+Dh/2)
  with the same angle i. Permuting every head's query and key rows (and their QK-norm weights)
  the same way at load turns one into the other, and leaves q.k and the all-heads RMS unchanged;
  export applies the inverse. Chosen over a second rotary layout in every kernel (reference,
  Triton, torch_npu's npu_rotary_mul, the sequence-parallel paths): no kernel changes, no cost
  per step, and one layout to test.

``tensor_maps`` lists, per tensor of ours, the Wan tensor it comes from and the rows it takes, so
that a rank reads only the rows of its own shard (``sora_dist.interop.load``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from sora_dist.errors import SoraDistError
from sora_dist.models.dit import TIMESTEP_FREQ_DIM, DiTConfig
from sora_dist.models.flops import IMAGE_TOKENS

DIFFUSERS_CLASS = "WanTransformer3DModel"
QK_NORM = "rms_norm_across_heads"
EPS = 1e-6
TEXT_LEN = 512


@dataclass(frozen=True)
class TensorMap:
    """Our tensor ``ours`` is Wan's ``theirs`` (shape ``theirs_shape``), reshaped to our shape,
    taking at our row i its row ``rows[i]`` (all rows in order when ``rows`` is None)."""

    ours: str
    theirs: str
    theirs_shape: tuple[int, ...]
    rows: Optional[torch.Tensor] = None


def transformer_folder(path: str | Path) -> Path:
    """The folder with the transformer's config.json: ``path`` itself, or a pipeline root's
    ``transformer/``."""
    path = Path(path)
    for folder in (path, path / "transformer"):
        if (folder / "config.json").is_file():
            return folder
    raise SoraDistError(f"{path} holds no config.json (nor transformer/config.json): point checkpoint.init_from at a diffusers Wan "
                        "pipeline folder or its transformer/ folder")


ORIGINAL_CLASS = "WanModel"
"""The original Wan repository's model class; its folders hold the same tensors under other names."""
ORIGINAL_NAMES = [  # (original name pattern, diffusers name), applied in order, first match wins
    (r"time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
    (r"time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
    (r"time_projection\.1\.", "condition_embedder.time_proj."),
    (r"text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
    (r"text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
    (r"head\.modulation$", "scale_shift_table"),
    (r"head\.head\.", "proj_out."),
    (r"(blocks\.\d+)\.modulation$", r"\1.scale_shift_table"),
    (r"(blocks\.\d+)\.self_attn\.o\.", r"\1.attn1.to_out.0."),
    (r"(blocks\.\d+)\.self_attn\.([qkv])\.", r"\1.attn1.to_\2."),
    (r"(blocks\.\d+)\.self_attn\.", r"\1.attn1."),
    (r"img_emb\.proj\.0\.", "condition_embedder.image_embedder.norm1."),
    (r"img_emb\.proj\.1\.", "condition_embedder.image_embedder.ff.net.0.proj."),
    (r"img_emb\.proj\.3\.", "condition_embedder.image_embedder.ff.net.2."),
    (r"img_emb\.proj\.4\.", "condition_embedder.image_embedder.norm2."),
    (r"img_emb\.emb_pos$", "condition_embedder.image_embedder.pos_embed"),
    (r"(blocks\.\d+)\.cross_attn\.([kv])_img\.", r"\1.attn2.add_\2_proj."),
    (r"(blocks\.\d+)\.cross_attn\.norm_k_img\.", r"\1.attn2.norm_added_k."),
    (r"(blocks\.\d+)\.cross_attn\.o\.", r"\1.attn2.to_out.0."),
    (r"(blocks\.\d+)\.cross_attn\.([qkv])\.", r"\1.attn2.to_\2."),
    (r"(blocks\.\d+)\.cross_attn\.", r"\1.attn2."),
    (r"(blocks\.\d+)\.norm3\.", r"\1.norm2."),  # the original names the cross-attention norm norm3
    (r"(blocks\.\d+)\.ffn\.0\.", r"\1.ffn.net.0.proj."),
    (r"(blocks\.\d+)\.ffn\.2\.", r"\1.ffn.net.2."),
]


def diffusers_name(original: str) -> str:
    """The diffusers name of an original Wan tensor name (a ComfyUI ``model.diffusion_model.``
    prefix dropped); names that need no change come back as they are."""
    name = original.removeprefix("model.diffusion_model.")
    for pattern, replacement in ORIGINAL_NAMES:
        renamed, count = re.subn("^" + pattern, replacement, name, count=1)
        if count:
            return renamed
    return name


CLIP_IMAGE_DIM = 1280
"""Width of the CLIP ViT-H/14 image tokens Wan 2.1's I2V and FLF2V models read (fixed in the original code)."""


def original_config(config: dict) -> dict:
    """A diffusers config for an original Wan config.json (model_type t2v, ti2v, i2v or flf2v)."""
    model_type = config.get("model_type", "t2v")
    if model_type not in ("t2v", "ti2v", "i2v", "flf2v"):
        raise SoraDistError(f"Wan model_type {model_type!r}: the supported ones are t2v, ti2v, i2v and flf2v")
    dim = config["dim"]
    image = {"image_dim": CLIP_IMAGE_DIM, "added_kv_proj_dim": dim} if model_type in ("i2v", "flf2v") else {}
    if model_type == "flf2v":
        image["pos_embed_seq_len"] = 2 * IMAGE_TOKENS  # FLF2V's position table covers two images
    return {**image, "_class_name": DIFFUSERS_CLASS, "patch_size": config.get("patch_size", [1, 2, 2]),
            "num_attention_heads": config["num_heads"], "attention_head_dim": config["dim"] // config["num_heads"],
            "in_channels": config["in_dim"], "out_channels": config["out_dim"], "text_dim": config["text_dim"],
            "freq_dim": config["freq_dim"], "ffn_dim": config["ffn_dim"], "num_layers": config["num_layers"],
            "cross_attn_norm": config.get("cross_attn_norm", True), "qk_norm": QK_NORM if config.get("qk_norm", True) else None,
            "eps": config.get("eps", EPS)}


def read_config(folder: Path) -> tuple[dict, bool]:
    """(the diffusers config, whether the folder is an original Wan checkpoint) of a folder."""
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise SoraDistError(f"{config_path} is not valid JSON ({err}): re-download the model's config.json") from err
    if config.get("_class_name") == ORIGINAL_CLASS:
        return original_config(config), True
    if config.get("_class_name") != DIFFUSERS_CLASS:
        raise SoraDistError(f"{config_path} describes a {config.get('_class_name')!r}, not a {DIFFUSERS_CLASS}: "
                            "checkpoint.init_from takes diffusers Wan 2.x transformer folders or original Wan checkpoint folders")
    return config, False


def wan_model_options(config: dict) -> dict:
    """DiTConfig keyword arguments for a diffusers Wan transformer config; one line naming the key
    for what VideoDiT does not express yet."""
    get = lambda key, default=None: config.get(key, default)  # noqa: E731 - diffusers' defaults
    heads, head_dim = get("num_attention_heads", 40), get("attention_head_dim", 128)
    image_kv = heads * head_dim if get("image_dim") is not None else None
    unsupported = {
        "added_kv_proj_dim": (get("added_kv_proj_dim"), image_kv, "the image key/value projections read the embedded image tokens, "
                              "as wide as the model, and exist exactly when image_dim is set"),
        "freq_dim": (get("freq_dim", 256), TIMESTEP_FREQ_DIM, f"VideoDiT's timestep features are {TIMESTEP_FREQ_DIM} wide"),
        "qk_norm": (get("qk_norm", QK_NORM), QK_NORM, f"only {QK_NORM} QK-norm is mapped"),
        "cross_attn_norm": (get("cross_attn_norm", True), True, "VideoDiT always normalizes before cross-attention"),
        "eps": (get("eps", EPS), EPS, f"VideoDiT's norms use eps {EPS}"),
    }
    for key, (value, wanted, why) in unsupported.items():
        if value != wanted:
            raise SoraDistError(f"Wan config {key}={value!r} (not {wanted!r}): {why}")
    return {
        "in_channels": get("in_channels", 16), "text_dim": get("text_dim", 4096), "hidden_size": heads * head_dim,
        "depth": get("num_layers", 40), "num_heads": heads, "ffn_dim": get("ffn_dim", 13824),
        "patch_size": tuple(get("patch_size", (1, 2, 2))), "qk_norm": True, "qk_norm_scope": "all_heads",
        "modulation": "shared", "text_context": "padded", "text_len": TEXT_LEN,
        "out_channels": None if get("out_channels", 16) == get("in_channels", 16) else get("out_channels", 16), "image_dim": get("image_dim"), "image_len": get("pos_embed_seq_len"),
    }


def diffusers_config(cfg: DiTConfig) -> dict:
    """The diffusers config.json of a VideoDiT with Wan's options (the inverse of wan_model_options)."""
    check_wan_layout(cfg)
    return {
        "_class_name": DIFFUSERS_CLASS, "patch_size": list(cfg.patch_size), "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.head_dim, "in_channels": cfg.in_channels, "out_channels": cfg.predicted_channels,
        "text_dim": cfg.text_dim, "freq_dim": TIMESTEP_FREQ_DIM, "ffn_dim": cfg.mlp_hidden, "num_layers": cfg.depth,
        "cross_attn_norm": True, "qk_norm": QK_NORM, "eps": EPS, "image_dim": cfg.image_dim,
        "added_kv_proj_dim": cfg.hidden_size if cfg.image_dim is not None else None, "rope_max_seq_len": 1024,
        "pos_embed_seq_len": cfg.image_len,
    }


def check_wan_layout(cfg: DiTConfig) -> None:
    """Refuse a model whose options are not Wan's: its weights mean something else there."""
    wanted = {"modulation": "shared", "text_context": "padded", "qk_norm": True, "qk_norm_scope": "all_heads"}
    for key, value in wanted.items():
        if getattr(cfg, key) != value:
            raise SoraDistError(f"model.{key}={getattr(cfg, key)!r}: a Wan model has {key} {value!r} (use a wan preset)")


def interleaved_to_halves(num_heads: int, head_dim: int) -> torch.Tensor:
    """Row permutation of a (num_heads * head_dim)-row q or k projection: our row h*Dh + j takes
    Wan's row h*Dh + 2j for j < Dh/2 and h*Dh + 2(j - Dh/2) + 1 after."""
    half = torch.arange(head_dim // 2)
    within = torch.cat([2 * half, 2 * half + 1])
    return (torch.arange(num_heads)[:, None] * head_dim + within[None]).flatten()


def channels_last_to_first(channels: int, patch_volume: int) -> torch.Tensor:
    """Row permutation of the output projection: our row c*P + p takes Wan's row p*C + c."""
    c, p = torch.meshgrid(torch.arange(channels), torch.arange(patch_volume), indexing="ij")
    return (p * channels + c).flatten()


def tensor_maps(cfg: DiTConfig) -> list[TensorMap]:
    """Every tensor of a Wan-layout VideoDiT and where it comes from in a diffusers Wan folder."""
    check_wan_layout(cfg)
    d, m, text, p_c = cfg.hidden_size, cfg.mlp_hidden, cfg.text_dim, cfg.patch_volume * cfg.predicted_channels
    rope = interleaved_to_halves(cfg.num_heads, cfg.head_dim)

    def linear(ours: str, theirs: str, n_out: int, n_in: int, rows=None) -> list[TensorMap]:
        return [TensorMap(f"{ours}.weight", f"{theirs}.weight", (n_out, n_in), rows), TensorMap(f"{ours}.bias", f"{theirs}.bias", (n_out,), rows)]

    maps = [
        TensorMap("x_embedder.weight", "patch_embedding.weight", (d, cfg.in_channels, *cfg.patch_size)),
        TensorMap("x_embedder.bias", "patch_embedding.bias", (d,)),
        *linear("t_embedder.mlp.0", "condition_embedder.time_embedder.linear_1", d, TIMESTEP_FREQ_DIM),
        *linear("t_embedder.mlp.2", "condition_embedder.time_embedder.linear_2", d, d),
        *linear("time_proj.1", "condition_embedder.time_proj", 6 * d, d),
        *linear("text_embedder.0", "condition_embedder.text_embedder.linear_1", d, text),
        *linear("text_embedder.2", "condition_embedder.text_embedder.linear_2", d, d),
        *image_embedder_maps(cfg),
    ]
    for i in range(cfg.depth):
        ours, theirs = f"blocks.{i}", f"blocks.{i}"
        for attn, wan_attn, rows in (("attn", "attn1", rope), ("cross_attn", "attn2", None)):
            maps += linear(f"{ours}.{attn}.to_q", f"{theirs}.{wan_attn}.to_q", d, d, rows)
            maps += linear(f"{ours}.{attn}.to_k", f"{theirs}.{wan_attn}.to_k", d, d, rows)
            maps += linear(f"{ours}.{attn}.to_v", f"{theirs}.{wan_attn}.to_v", d, d)
            maps += linear(f"{ours}.{attn}.proj", f"{theirs}.{wan_attn}.to_out.0", d, d)
            maps.append(TensorMap(f"{ours}.{attn}.q_norm.weight", f"{theirs}.{wan_attn}.norm_q.weight", (d,), rows))
            maps.append(TensorMap(f"{ours}.{attn}.k_norm.weight", f"{theirs}.{wan_attn}.norm_k.weight", (d,), rows))
        if cfg.image_dim is not None:  # the image tokens' keys and values, in the cross-attention
            maps += linear(f"{ours}.cross_attn.image_k", f"{theirs}.attn2.add_k_proj", d, d)
            maps += linear(f"{ours}.cross_attn.image_v", f"{theirs}.attn2.add_v_proj", d, d)
            maps.append(TensorMap(f"{ours}.cross_attn.image_k_norm.weight", f"{theirs}.attn2.norm_added_k.weight", (d,)))
        maps += [TensorMap(f"{ours}.norm2.weight", f"{theirs}.norm2.weight", (d,)), TensorMap(f"{ours}.norm2.bias", f"{theirs}.norm2.bias", (d,))]
        maps += linear(f"{ours}.mlp.fc1", f"{theirs}.ffn.net.0.proj", m, d)
        maps += linear(f"{ours}.mlp.fc2", f"{theirs}.ffn.net.2", d, m)
        maps.append(TensorMap(f"{ours}.scale_shift_table.table", f"{theirs}.scale_shift_table", (1, 6, d)))
    maps.append(TensorMap("final_layer.scale_shift_table.table", "scale_shift_table", (1, 2, d)))
    maps += linear("final_layer.linear", "proj_out", p_c, d, channels_last_to_first(cfg.predicted_channels, cfg.patch_volume))
    return maps


def image_embedder_maps(cfg: DiTConfig) -> list[TensorMap]:
    """The CLIP image-token embedder's tensors (Wan 2.1 I2V and FLF2V); none without image_dim."""
    if cfg.image_dim is None:
        return []
    img, d, theirs = cfg.image_dim, cfg.hidden_size, "condition_embedder.image_embedder"
    pairs = [("norm1", "norm1", (img,), (img,)), ("fc1", "ff.net.0.proj", (img, img), (img,)),
             ("fc2", "ff.net.2", (d, img), (d,)), ("norm2", "norm2", (d,), (d,))]
    maps = [TensorMap(f"image_embedder.{ours}.{kind}", f"{theirs}.{name}.{kind}", shape)
            for ours, name, weight, bias in pairs for kind, shape in (("weight", weight), ("bias", bias))]
    if cfg.image_len is not None:
        maps.append(TensorMap("image_embedder.pos_embed", f"{theirs}.pos_embed", (1, cfg.image_len, img)))
    return maps


def to_ours(theirs: torch.Tensor, tmap: TensorMap, ours_shape: tuple[int, ...]) -> torch.Tensor:
    """A whole Wan tensor in our layout."""
    rows = theirs.reshape(theirs.shape[0], -1)
    if tmap.rows is not None:
        rows = rows.index_select(0, tmap.rows)
    return rows.reshape(ours_shape)


def to_theirs(ours: torch.Tensor, tmap: TensorMap) -> torch.Tensor:
    """A whole tensor of ours in Wan's layout (to_ours's inverse)."""
    rows = ours.reshape(ours.shape[0], -1)
    if tmap.rows is not None:
        rows = rows.index_select(0, torch.argsort(tmap.rows))
    return rows.reshape(tmap.theirs_shape)


def state_dict_to_theirs(ours: dict[str, torch.Tensor], cfg: DiTConfig) -> dict[str, torch.Tensor]:
    """A whole state dict of ours in diffusers Wan names and layouts."""
    return {m.theirs: to_theirs(ours[m.ours], m) for m in tensor_maps(cfg)}
