"""Typed experiment config: defaults < YAML file < dotted command-line overrides.

Every section is a dataclass and every field carries a docstring. ``load_config`` builds a
``Config`` from a YAML file and overrides such as ``--optim.lr=3e-4``; an unknown key, a wrong
type or an impossible value raises ``ConfigError`` naming the key, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from sora_dist.errors import ConfigError
from sora_dist.models.dit import DiTConfig
from sora_dist.models.presets import PRESETS


@dataclass
class ModelConfig:
    preset: str = "debug"
    """Named model from ``sora_dist.models.PRESETS``: sizes of our DiT (debug, S, B, L, XL, 1B, 3B,
    7B), or a published Wan model's whole architecture (wan2.1-t2v-1.3b, wan2.1-t2v-14b,
    wan2.1-i2v-14b, wan2.1-flf2v-14b, wan2.2-ti2v-5b, wan2.2-t2v-a14b; docs/wan.md)."""
    hidden_size: Optional[int] = None
    """Transformer width; None takes the preset's."""
    depth: Optional[int] = None
    """Number of DiT blocks; None takes the preset's."""
    num_heads: Optional[int] = None
    """Attention heads; None takes the preset's. Must divide hidden_size."""
    mlp_ratio: float = 4.0
    """MLP hidden size as a multiple of hidden_size (unless ffn_dim is given)."""
    ffn_dim: Optional[int] = None
    """MLP hidden size given directly, for published models whose width is no whole multiple of
    hidden_size (Wan 2.1 1.3B: 8960 for 1536); None: hidden_size x mlp_ratio."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """Spacetime patch (p_t, p_h, p_w) in latent units."""
    in_channels: Optional[int] = None
    """Latent channels; None reads them from the dataset manifest."""
    text_dim: Optional[int] = None
    """Width of the text-encoder hidden states; None reads it from the dataset manifest."""
    qk_norm: bool = True
    """RMS-normalize queries and keys (stabilizes bf16 training at scale)."""
    qk_norm_scope: Optional[Literal["head", "all_heads"]] = None
    """The QK-norm's RMS over each head's channels, or over all heads' together (Wan); under
    tensor parallelism the all-heads sum of squares spans the ranks' heads. None: the preset's
    (head for ours)."""
    rope_theta: float = 10000.0
    """Base of the 3D rotary position frequencies."""
    modulation: Optional[Literal["per_block", "shared"]] = None
    """adaLN-Zero: each block projects the timestep embedding itself (per_block), or one projection
    serves every block, plus a learned table per block and a table for the final layer (shared:
    PixArt-alpha's adaLN-single, Wan's; saves depth x 6 x hidden^2 parameters). None: the
    preset's (per_block for ours)."""
    text_context: Optional[Literal["masked", "padded"]] = None
    """The caption as cross-attention context: its tokens under a key mask plus a learned null
    token (masked), or its tokens zero-padded to text_len with no mask and no null token (padded,
    as Wan was trained). None: the preset's (masked for ours)."""
    text_len: Optional[int] = None
    """Caption tokens under text_context padded; longer captions are cut. None: the preset's (512)."""
    attention_backend: str = "auto"
    """Attention kernel: auto (the device's best), or a name from ``sora_dist.kernels.BACKENDS``."""
    fused_backend: str = "auto"
    """Norm / RoPE / residual kernels: auto (triton on CUDA, npu on Ascend, reference on CPU), triton, npu or reference."""


@dataclass
class DiffusionConfig:
    objective: Literal["flow", "ddpm"] = "flow"
    """Training objective: rectified flow, or DDPM (Ho et al. 2020)."""
    prediction: Literal["eps", "v"] = "eps"
    """DDPM only: the network predicts the noise (eps) or the velocity (v)."""
    schedule: Literal["linear", "cosine"] = "linear"
    """DDPM only: beta schedule."""
    num_timesteps: int = 1000
    """DDPM only: number of discrete diffusion steps."""
    logit_normal_mean: float = 0.0
    """Flow only: mean of the logit-normal timestep distribution."""
    logit_normal_std: float = 1.0
    """Flow only: std of the logit-normal timestep distribution."""
    shift: Optional[float] = None
    """Flow only: fixed timestep shift; None makes it resolution dependent, sqrt(tokens / shift_reference_tokens)."""
    shift_reference_tokens: int = 256
    """Flow only: token count at which the resolution-dependent shift is 1."""
    caption_dropout: float = 0.1
    """Probability of dropping a sample's caption during training (enables guidance)."""
    timestep_range: Optional[tuple[float, float]] = None
    """Flow only: train on timesteps in [low, high] of 0-1000 alone, drawn from the usual law
    truncated to it: one expert of a two-expert model (Wan 2.2 A14B: [875, 1000] for the
    high-noise expert, [0, 875] for the low-noise one). None: all timesteps."""
    sampler: Literal["euler", "ddpm", "ddim"] = "euler"
    """Sampler used at the end of training and by ``sora-dist sample``; euler goes with flow."""
    sample_steps: int = 50
    """Number of sampling steps (ddpm always uses num_timesteps)."""
    guidance_scale: float = 4.0
    """Classifier-free guidance scale; 1.0 disables guidance."""


@dataclass
class MaskConfig:
    """Frame-conditioned training (the mask strategy): per sample, some latent frames (after
    patching) are given, kept clean at t = 0 and left out of the loss, so that one model learns
    image-to-video, extension, connecting clips and editing. Each key is the probability of one
    choice; what they leave of 1 is plain text-to-video. Images (one frame) are never masked."""

    image_to_video: float = 0.0
    """Probability that the first frame is given."""
    extend_forward: float = 0.0
    """Probability that the first k frames are given (k from 1 to max_given_fraction of the frames)."""
    extend_backward: float = 0.0
    """Probability that the last k frames are given."""
    connect: float = 0.0
    """Probability that the first k and the last k frames are given (connecting two clips)."""
    random_frames: float = 0.0
    """Probability that each frame is given with probability 1/2 (at least one is generated)."""
    max_given_fraction: float = 0.5
    """Upper bound on k as a fraction of the clip's frames (at least 1 frame)."""

    def choices(self) -> dict[str, float]:
        """Choice name -> probability, text_to_video included."""
        given = {"image_to_video": self.image_to_video, "extend_forward": self.extend_forward, "extend_backward": self.extend_backward,
                 "connect": self.connect, "random_frames": self.random_frames}
        return {"text_to_video": max(0.0, 1.0 - sum(given.values())), **given}

    @property
    def enabled(self) -> bool:
        return self.choices()["text_to_video"] < 1.0

    def describe(self) -> str:
        """The share of clips that trains each case, as the trainer logs it."""
        if not self.enabled:
            return "off: every clip trains text-to-video"
        shares = ", ".join(f"{name.replace('_to_', '-to-').replace('_', ' ')} {p:.0%}" for name, p in self.choices().items() if p > 0)
        return f"{shares} of clips (given frames up to {self.max_given_fraction:.0%} of a clip; images never masked)"


@dataclass
class DataConfig:
    path: str = "data/synthetic"
    """Folder holding ``manifest.json`` and ``shard-*.tar``."""
    synthetic_if_missing: bool = False
    """Write a synthetic dataset at ``path`` when it does not exist (demo use)."""
    synthetic_samples: int = 768
    """Number of samples the synthetic dataset gets when created."""
    tokens_per_batch: int = 4096
    """Token budget per micro-batch; the batch size of each shape bucket follows from it."""
    max_batch_size: int = 64
    """Upper bound on samples per micro-batch, whatever the token budget allows."""
    max_text_len: int = 64
    """Text embeddings longer than this are truncated; batches are padded to their longest caption."""
    num_workers: int = 2
    """DataLoader worker processes per rank."""
    shuffle_buffer: int = 256
    """Samples held in the shuffle buffer of each worker."""
    seed: int = 0
    """Seed of the per-epoch shard order and sample shuffle."""
    on_corrupt: Literal["skip", "stop"] = "skip"
    """A corrupt sample is skipped and counted, or stops the run with its path."""


@dataclass
class ParallelConfig:
    device: Literal["auto", "cuda", "npu", "cpu"] = "auto"
    """Accelerator; auto picks cuda, then npu, then cpu. The SORA_DIST_DEVICE variable overrides it."""
    dp_replicate: int = 1
    """Replicated data-parallel degree (outermost mesh dimension)."""
    dp_shard: int = -1
    """Sharded data-parallel degree; -1 fills what the other degrees leave of the world size."""
    sp_ring: int = 1
    """Ring-attention sequence-parallel degree."""
    sp_ulysses: int = 1
    """Ulysses all-to-all sequence-parallel degree."""
    tp: int = 1
    """Tensor-parallel degree (innermost mesh dimension)."""
    engine: Literal["fsdp", "ddp", "deepspeed"] = "fsdp"
    """Data-parallel engine: FSDP2 (HSDP when dp_replicate > 1), DDP, or DeepSpeed ZeRO."""
    zero_stage: int = 2
    """DeepSpeed only: ZeRO stage 1, 2 or 3."""
    reshard_after_forward: bool = True
    """FSDP only: free gathered parameters after forward (ZeRO-3 like); false keeps them (ZeRO-2 like)."""
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    """Recompute block activations in backward: none, every block (full), or every ac_every-th block."""
    ac_every: int = 2
    """With selective activation checkpointing: checkpoint every k-th block."""
    compile: bool = False
    """torch.compile each DiT block."""
    collective_timeout_minutes: float = 10.0
    """A collective that waits longer than this fails the process group (so the agent can restart the job)."""


@dataclass
class OptimConfig:
    lr: float = 1e-4
    """Peak learning rate of AdamW."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.0
    """Decoupled weight decay, applied to matrices only (not norms, biases or embeddings' scales)."""
    warmup_steps: int = 100
    """Linear warmup from 0 to ``lr``."""
    schedule: Literal["cosine", "constant"] = "constant"
    """LR after warmup: cosine decay to ``min_lr_ratio * lr`` at the last step, or constant."""
    min_lr_ratio: float = 0.1
    """Final LR of the cosine schedule as a fraction of ``lr``."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    ema_decay: float = 0.9999
    """Decay of the exponential moving average of the weights; 0 disables EMA."""


@dataclass
class TrainConfig:
    steps: int = 1000
    """Optimizer steps to run."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    seed: int = 0
    """Seed for weights, noise and timesteps."""
    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto is bf16 autocast on GPU/NPU and fp32 on CPU."""
    out_dir: str = "runs/default"
    """Run folder: resolved config, metrics, TensorBoard events, weights, samples."""
    max_minutes: float = 0.0
    """Stop after this many minutes of training (0: no limit); the run still ends normally."""
    sample_at_end: bool = False
    """After training, sample what sample_every samples into sample.png (on the synthetic blobs with each clip's measured motion, also in samples.json) and plot the loss."""
    sample_caption: str = ""
    """The prompt sampled when sample_prompts is empty; empty takes the first caption of the dataset."""
    sample_shape: tuple[int, int, int] = (8, 16, 16)
    """Latent (T, h, w) of the clips sampled at the end and every sample_every steps."""
    sample_every: int = 0
    """Every this many steps, sample sample_prompts and one image-to-video case (the first video of the dataset) with the EMA weights into out_dir/samples/step-N/ and TensorBoard; 0 turns it off."""
    sample_prompts: list[str] = field(default_factory=list)
    """Prompts sampled every sample_every steps and at the end, through the dataset's text encoder; empty takes sample_caption."""
    sample_prompt_extend: str = ""
    """A language model (transformers folder or hub name) or OpenAI-compatible server URL that rewrites sample_prompts into dense captions once, at the start, as `sora-dist sample --prompt-extend` does; empty: the prompts as written."""


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None
    """Folder of step-N checkpoints; None is out_dir/checkpoints."""
    every_steps: int = 0
    """Save every N optimizer steps (0: not by steps)."""
    every_minutes: float = 0.0
    """Save every M minutes of training (0: not by time)."""
    keep_last: int = 3
    """Keep the newest K checkpoints (0 keeps all)."""
    async_save: Optional[bool] = None
    """Write checkpoints in the background while training goes on (FSDP/DDP engines); null: on GPU/NPU,
    where the copy to host memory is fast and the write overlaps the steps, and not on cpu."""
    resume: str = "auto"
    """auto: the newest complete checkpoint in dir, if any; a path: that checkpoint; none: start fresh."""
    init_from: Optional[str] = None
    """Start from these weights instead of random ones (fine-tuning): a safetensors file from
    `sora-dist export`, or a diffusers Wan folder (a pipeline root or its transformer/) or an
    original Wan checkpoint folder, of which each rank reads only its own shards' slices
    (docs/wan.md). A run that resumes from its own checkpoint continues from that instead."""
    save_final: bool = True
    """Write the final weights (and EMA weights) as safetensors with the config into out_dir."""
    max_failed_saves: int = 3
    """A failed save (no space, I/O error) is logged and training goes on; stop after this many in a row (0: never)."""


@dataclass
class LoggingConfig:
    log_every: int = 10
    """Steps between progress lines and metric records."""
    tensorboard: bool = True
    """Write TensorBoard events to out_dir/tb."""
    sample_ledger: bool = False
    """Each data-parallel rank writes the keys of every step's samples to out_dir/ledger/ (data audits)."""


@dataclass
class FaultConfig:
    step_timeout_s: float = 0.0
    """The step watchdog ends a rank whose step runs longer than this (stacks dumped; 0: no absolute limit)."""
    step_timeout_factor: float = 10.0
    """...or longer than this many times the median of the recent steps (0: no relative limit)."""
    step_timeout_min_s: float = 300.0
    """The relative limit never goes below this many seconds (noisy short steps, a slow first save)."""
    flight_recorder_entries: int = 2000
    """Collectives the process group's flight recorder keeps for the watchdog's dump (0: off)."""
    straggler_threshold: float = 1.3
    """Warn when a rank's device probe or data wait is this many times the median rank's (0: off)."""
    probe_ms: float = 10.0
    """Length of the per-rank device probe timed once per log window, in ms on the fastest rank."""
    health_check: bool = True
    """Before training: every rank answers, and each mesh group's bandwidth is checked against its peers."""
    health_check_mib: Optional[float] = None
    """Message size of the health check's all-reduce and all-to-all; null: 64 on GPU/NPU, 1 on cpu."""
    health_min_fraction: float = 0.5
    """Stop when a group's bus bandwidth is below this fraction of the median of its dimension's groups."""
    health_timeout_s: float = 120.0
    """Every rank must reach the health check's barrier within this many seconds."""


@dataclass
class AdapterConfig:
    rank: int = 0
    """LoRA rank of the adapters on the blocks' linear layers; 0: no adapters, every weight trains.
    With adapters the base weights are frozen and only the adapters train; they come from
    checkpoint.init_from, which training needs and which checkpoints (the adapters alone) read
    again at every start (docs/wan.md)."""
    alpha: Optional[float] = None
    """LoRA scale numerator: the adapters' product is scaled by alpha / rank. None: alpha = rank."""
    targets: list[str] = field(default_factory=lambda: ["attn.to_q", "attn.to_k", "attn.to_v", "attn.proj", "cross_attn.to_q",
                                                        "cross_attn.to_k", "cross_attn.to_v", "cross_attn.proj", "mlp.fc1", "mlp.fc2"])
    """Linear layers of each block that get adapters."""
    dropout: float = 0.0
    """Dropout on the adapters' input."""

    @property
    def resolved_alpha(self) -> float:
        return self.alpha if self.alpha is not None else self.rank

    @property
    def scale(self) -> float:
        """What the adapters' product is multiplied by: alpha / rank."""
        return self.resolved_alpha / self.rank


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    lora: AdapterConfig = field(default_factory=AdapterConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))


def field_docs() -> dict[str, dict[str, str]]:
    """Section -> key -> the field's docstring, read from this file (attribute docstrings are not
    kept at run time)."""
    import ast

    tree = ast.parse(Path(__file__).read_text())
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    by_class = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            docs, body = {}, node.body
            for item, after in zip(body, body[1:]):
                if isinstance(item, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
                    docs[item.target.id] = " ".join(str(after.value.value).split())
            by_class[node.name] = docs
    return {name: by_class.get(getattr(cls, "__name__", str(cls)), {}) for name, cls in sections.items()}


def describe_keys() -> str:
    """Every config key with its default and what it does, section by section (``train --help``)."""
    defaults = Config().to_dict()
    lines = []
    for section, docs in field_docs().items():
        lines.append(f"{section}:")
        for key, default in defaults[section].items():
            lines.append(f"  {f'--{section}.{key}={default}':<42} {docs.get(key, '')}")
    return "\n".join(lines)


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def resolve_model_config(cfg: ModelConfig, in_channels: int, text_dim: int) -> DiTConfig:
    """The model's hyper-parameters: the preset, explicit overrides, and the dataset's latent
    channels and text width (used where the config leaves them null)."""
    preset = preset_sizes(cfg.preset)

    def pick(key: str, default: Any = None) -> Any:  # the config's value, else the preset's, else the default
        value = getattr(cfg, key)
        return value if value is not None else preset.get(key, default)

    return DiTConfig(
        in_channels=pick("in_channels", in_channels),
        text_dim=pick("text_dim", text_dim),
        hidden_size=cfg.hidden_size or preset["hidden_size"],
        depth=cfg.depth or preset["depth"],
        num_heads=cfg.num_heads or preset["num_heads"],
        mlp_ratio=cfg.mlp_ratio,
        ffn_dim=pick("ffn_dim"),
        patch_size=tuple(cfg.patch_size),
        qk_norm=cfg.qk_norm,
        qk_norm_scope=pick("qk_norm_scope", "head"),
        rope_theta=cfg.rope_theta,
        modulation=pick("modulation", "per_block"),
        text_context=pick("text_context", "masked"),
        text_len=pick("text_len", 512),
        # image conditioning (Wan 2.1 I2V, FLF2V) is a preset's architecture, not a setting
        out_channels=preset.get("out_channels"),
        image_dim=preset.get("image_dim"),
        image_len=preset.get("image_len"),
    )


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a Config from defaults, then the YAML file at ``path``, then ``key=value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist: pass an existing YAML file to --config")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        key, value = _parse_override(item)
        section, _, name = key.partition(".")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"section '{section}' must be a mapping, got {raw[section]!r}")
        raw[section][name] = value
    cfg = _build(Config, raw, prefix="")
    validate(cfg)
    return cfg


def _parse_override(item: str) -> tuple[str, Any]:
    text = item[2:] if item.startswith("--") else item
    key, sep, value = text.partition("=")
    if not sep or "." not in key:
        raise ConfigError(
            f"override {item!r} is not of the form --section.key=value (e.g. --optim.lr=3e-4)"
        )
    return key, yaml.safe_load(value) if value != "" else ""


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown config key '{prefix}{key}'.{hint} Valid keys here: {', '.join(fields)}"
            )
    values = {}
    for name in fields:
        if name not in raw:
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, raw[name], prefix=f"{prefix}{name}.")
        else:
            values[name] = _coerce(raw[name], hint, f"{prefix}{name}")
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{key}={value!r} is not allowed: choose one of {choices}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list, e.g. [{_example(args)[0]!r}]")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}={value!r} must be a list of {len(args)} values, e.g. {list(_example(args))}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} must be an integer")
        return value
    if hint is float:
        if isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} must be a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} must be a string")
        return value
    raise AssertionError(f"config field {key} has an unsupported type {hint}")


def _example(args: tuple) -> tuple:
    return tuple(1 if a is int else 1.0 if a is float else "x" for a in args)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (it loads back with ``load_config``)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# ---------------------------------------------------------------------------------------------
# Validation of values and combinations


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Check values that types cannot express; raises ConfigError naming key, value and fix."""
    _validate_model(cfg.model)
    _validate_training(cfg)
    _validate_lora(cfg)


def _validate_lora(cfg: Config) -> None:
    lora = cfg.lora
    _require(lora.rank >= 0, f"lora.rank={lora.rank} must be 0 (no adapters) or positive")
    _require(0.0 <= lora.dropout < 1.0, f"lora.dropout={lora.dropout} must be in [0, 1)")
    if lora.rank:
        _require(bool(lora.targets), "lora.targets is empty: name the block layers that get adapters, e.g. [attn.to_q, attn.to_k]")
        _require(cfg.parallel.engine in ("fsdp", "ddp"), f"lora.rank={lora.rank} with parallel.engine={cfg.parallel.engine}: "
                                                          "adapters train under fsdp or ddp")


def preset_sizes(name: str) -> dict[str, Any]:
    """A model preset's width, depth, heads and any other settings it fixes; ConfigError naming
    the presets for an unknown one."""
    _require(name in PRESETS, f"model.preset={name!r} is unknown: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def _validate_model(m: ModelConfig) -> None:
    preset = preset_sizes(m.preset)
    hidden = m.hidden_size or preset["hidden_size"]
    heads = m.num_heads or preset["num_heads"]
    for key, value in (("hidden_size", hidden), ("depth", m.depth or preset["depth"]), ("num_heads", heads)):
        _require(value > 0, f"model.{key}={value} must be positive")
    if hidden % heads:
        divisors = [d for d in range(1, hidden + 1) if hidden % d == 0 and (hidden // d) % 2 == 0][-8:]
        raise ConfigError(
            f"model.num_heads={heads} does not divide model.hidden_size={hidden}: "
            f"choose num_heads from {divisors} or change hidden_size"
        )
    head_dim = hidden // heads
    _require(
        head_dim % 2 == 0 and head_dim >= 6,
        f"head dimension hidden_size/num_heads = {head_dim} must be even and at least 6 for 3D RoPE: "
        f"lower model.num_heads",
    )
    _require(m.mlp_ratio > 0, f"model.mlp_ratio={m.mlp_ratio} must be positive")
    _require(m.ffn_dim is None or m.ffn_dim > 0, f"model.ffn_dim={m.ffn_dim} must be positive (or null for hidden_size x mlp_ratio)")
    _require(all(p > 0 for p in m.patch_size), f"model.patch_size={list(m.patch_size)} must be positive")
    _require(m.text_len is None or m.text_len > 0, f"model.text_len={m.text_len} must be positive")


def _validate_mask(mask: MaskConfig) -> None:
    given = {name: p for name, p in mask.choices().items() if name != "text_to_video"}
    for name, probability in given.items():
        _require(0.0 <= probability <= 1.0, f"mask.{name}={probability} must be a probability in [0, 1]")
    total = sum(given.values())
    _require(total <= 1.0 + 1e-9, f"the mask.* probabilities add up to {total:.3g}: lower some of them (what they leave of 1 is text-to-video)")
    _require(0.0 < mask.max_given_fraction < 1.0, f"mask.max_given_fraction={mask.max_given_fraction} must be in (0, 1)")


def _validate_training(cfg: Config) -> None:
    d = cfg.diffusion
    _require(d.num_timesteps >= 2, f"diffusion.num_timesteps={d.num_timesteps} must be at least 2")
    _require(0.0 <= d.caption_dropout < 1.0, f"diffusion.caption_dropout={d.caption_dropout} must be in [0, 1)")
    _require(d.timestep_range is None or (0.0 <= d.timestep_range[0] < d.timestep_range[1] <= 1000.0 and d.objective == "flow"),
             f"diffusion.timestep_range={d.timestep_range} must be [low, high] with 0 <= low < high <= 1000, under objective flow")
    _require(d.logit_normal_std > 0, f"diffusion.logit_normal_std={d.logit_normal_std} must be positive")
    _require(d.shift is None or d.shift > 0, f"diffusion.shift={d.shift} must be positive (or null for auto)")
    _require(d.sample_steps >= 1, f"diffusion.sample_steps={d.sample_steps} must be at least 1")
    flow_sampler = d.sampler == "euler"
    _require(
        flow_sampler == (d.objective == "flow"),
        f"diffusion.sampler={d.sampler!r} does not go with diffusion.objective={d.objective!r}: "
        f"use sampler 'euler' with 'flow', and 'ddpm' or 'ddim' with 'ddpm'",
    )
    _validate_mask(cfg.mask)

    data = cfg.data
    _require(data.tokens_per_batch > 0, f"data.tokens_per_batch={data.tokens_per_batch} must be positive")
    _require(data.max_batch_size > 0, f"data.max_batch_size={data.max_batch_size} must be positive")
    _require(data.max_text_len > 0, f"data.max_text_len={data.max_text_len} must be positive")
    _require(data.num_workers >= 0, f"data.num_workers={data.num_workers} must be >= 0")

    p = cfg.parallel
    for key in ("dp_replicate", "sp_ring", "sp_ulysses", "tp"):
        value = getattr(p, key)
        _require(value >= 1, f"parallel.{key}={value} must be >= 1")
    _require(p.dp_shard == -1 or p.dp_shard >= 1, f"parallel.dp_shard={p.dp_shard} must be >= 1 or -1 (fill)")
    _require(p.zero_stage in (1, 2, 3), f"parallel.zero_stage={p.zero_stage} must be 1, 2 or 3")
    _require(p.ac_every >= 1, f"parallel.ac_every={p.ac_every} must be at least 1")

    o = cfg.optim
    _require(o.lr > 0, f"optim.lr={o.lr} must be positive")
    _require(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    _require(0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    _require(o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip} must be >= 0 (0 disables clipping)")
    _require(0.0 <= o.ema_decay < 1.0, f"optim.ema_decay={o.ema_decay} must be in [0, 1) (0 disables EMA)")

    t = cfg.train
    _require(t.steps >= 1, f"train.steps={t.steps} must be at least 1")
    _require(t.grad_accum >= 1, f"train.grad_accum={t.grad_accum} must be at least 1")
    _require(t.sample_every >= 0, f"train.sample_every={t.sample_every} must be >= 0 (0 turns periodic samples off)")
    _require(all(s >= 1 for s in t.sample_shape), f"train.sample_shape={list(t.sample_shape)} must be positive")
    c = cfg.checkpoint
    _require(c.every_steps >= 0, f"checkpoint.every_steps={c.every_steps} must be >= 0 (0 disables)")
    _require(c.every_minutes >= 0, f"checkpoint.every_minutes={c.every_minutes} must be >= 0 (0 disables)")
    _require(c.keep_last >= 0, f"checkpoint.keep_last={c.keep_last} must be >= 0 (0 keeps all)")
    _require(c.resume.strip() != "", "checkpoint.resume must be auto, none or a checkpoint path")
    _require(cfg.logging.log_every >= 1, f"logging.log_every={cfg.logging.log_every} must be at least 1")
    f = cfg.fault
    for key in ("step_timeout_s", "step_timeout_factor", "step_timeout_min_s", "straggler_threshold", "probe_ms"):
        _require(getattr(f, key) >= 0, f"fault.{key}={getattr(f, key)} must be >= 0 (0 disables)")
    _require(f.straggler_threshold == 0 or f.straggler_threshold > 1, f"fault.straggler_threshold={f.straggler_threshold} must be above 1 (or 0 to disable)")
    _require(f.flight_recorder_entries >= 0, f"fault.flight_recorder_entries={f.flight_recorder_entries} must be >= 0")
    _require(f.health_check_mib is None or f.health_check_mib > 0, f"fault.health_check_mib={f.health_check_mib} must be positive (or null)")
    _require(0 < f.health_min_fraction < 1, f"fault.health_min_fraction={f.health_min_fraction} must be in (0, 1)")
    _require(f.health_timeout_s > 0, f"fault.health_timeout_s={f.health_timeout_s} must be positive")
