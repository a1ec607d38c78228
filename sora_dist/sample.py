"""Sampling a trained model: ``sora-dist sample`` on one device, ``torchrun -m sora_dist.sample``
on several, and the samples a run writes while and after it trains.

One model does every application of Sora's report (see ``applications.py``): text-to-video and
-image from any prompt (encoded by the dataset's text encoder), image-to-video, extending a clip
forward or backward, connecting two clips and editing one (SDEdit). Several ranks sample with
the training wrappers: Ulysses and ring sequence parallelism split a long clip's tokens, and
CFG-parallel puts the conditional and unconditional halves of guidance on two ranks; every
layout gives the single-device result (to fp32 rounding). The same seed gives the same output.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from sora_dist.applications import LATENT_ONLY_VAES, MediaInputs, Request, build_request, encode_prompt, image_to_video, per_sample
from sora_dist.checkpoint import COMPLETE
from sora_dist.config import Config, ParallelConfig, load_config
from sora_dist.console import CommandParser, exit_process, user_command
from sora_dist.data.clips import read_still
from sora_dist.data.format import Manifest, read_manifest
from sora_dist.data.media import IMAGE_SUFFIXES
from sora_dist.diffusion import build_objective, guided, sample
from sora_dist.errors import ConfigError, DataError
from sora_dist.interop.load import pipeline_root
from sora_dist.metrics import ProgressLine
from sora_dist.models import VideoDiT
from sora_dist.visualize import save_frame_grid, save_loss_plot

log = logging.getLogger("sora_dist")

APPLICATIONS = """applications (one at a time; the prompt conditions all of them):
  text-to-video    sora-dist sample --from RUN --prompt "a red blob moving left" --frames 8
  text-to-image    sora-dist sample --from RUN --prompt "..." --frames 1
  image-to-video   sora-dist sample --from RUN --prompt "..." --image first.png|first.npy --frames 8
  extend forward   sora-dist sample --from RUN --prompt "..." --extend clip.mp4|clip.npy --direction forward --frames 4
  extend backward  sora-dist sample --from RUN --prompt "..." --extend clip.npy --direction backward --frames 4
  connect clips    sora-dist sample --from RUN --prompt "..." --connect a.npy b.npy --frames 4
  edit (SDEdit)    sora-dist sample --from RUN --prompt "..." --edit clip.mp4 --strength 0.6
--frames counts latent frames to generate (with --extend / --connect: new frames besides the
given ones). Inputs are latent .npy files (C x T x h x w, as the dataset stores them) or images and
videos, which the dataset's VAE encodes after the resize and centre crop `encode` applies.
Outputs go to --out: frames.png, latents.npy, request.json and, where the dataset has a VAE,
sample-N.mp4. Distributed: torchrun --nproc-per-node N -m sora_dist.sample ... --cfg-parallel
--sp-ulysses U --sp-ring R (2 x U x R x tp ranks with --cfg-parallel, else U x R x tp).
Config keys of the run override as in training, e.g. --diffusion.sample_steps=50."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    # No flag may start a torchrun option (torchrun takes abbreviations): --from, not --run.
    p.add_argument("--from", dest="source", required=True, metavar="RUN",
                   help="a run folder (its final weights, else its newest checkpoint), a checkpoint folder (RUN/checkpoints/step-N), "
                        "or a downloaded diffusers Wan pipeline folder")
    p.add_argument("--prompt", default="", help="text to sample, encoded by the dataset's text encoder (default: train.sample_caption, else the dataset's first caption)")
    p.add_argument("--prompt-extend", default="", metavar="MODEL_OR_URL",
                   help="rewrite --prompt into a dense caption first, with a transformers language model (folder or hub name; a "
                        "vision-language one with --image) or an OpenAI-compatible server URL; recorded in request.json")
    p.add_argument("--prompt-extend-examples", type=int, default=3, help="with --prompt-extend: dataset captions shown as examples of style")
    p.add_argument("--text-encoder", default="", help="transformers text encoder (local folder or hub name) instead of the one the dataset's manifest names")
    p.add_argument("--frames", type=int, default=0, help="latent frames to generate (default: train.sample_shape's); 1 is text-to-image")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="latent height and width (default: the inputs', else train.sample_shape's)")
    p.add_argument("--image", default="", help="image-to-video: the first frame (an image, or a latent .npy)")
    p.add_argument("--extend", default="", help="extend this clip (a video, or a latent .npy) by --frames")
    p.add_argument("--direction", default="forward", choices=["forward", "backward"], help="with --extend: after its end or before its start")
    p.add_argument("--connect", nargs=2, default=None, metavar=("A", "B"), help="generate --frames between the end of clip A and the start of clip B")
    p.add_argument("--context", type=int, default=0, help="latent frames of each --extend / --connect clip to keep as given (default: all of a .npy; half of --frames from a video, 1 with --connect)")
    p.add_argument("--edit", default="", help="SDEdit this clip (a latent .npy, or the first --frames latent frames of a video) towards the prompt")
    p.add_argument("--strength", type=float, default=0.6, help="with --edit: fraction of the schedule re-run, in (0, 1]; 1 ignores the clip")
    p.add_argument("--samples", type=int, default=2, help="clips to sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: diffusion.guidance_scale)")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--out", default="", help="output folder (default: RUN/samples/cli-<application>)")
    p.add_argument("--vae", default="", help="diffusers VAE for inputs and outputs instead of the dataset's")
    p.add_argument("--vae-subfolder", default="")
    p.add_argument("--video-format", default=".mp4", choices=[".mp4", ".gif"])
    p.add_argument("--fps", type=float, default=8.0, help="frame rate of the decoded videos")
    p.add_argument("--cfg-parallel", action="store_true", help="under torchrun: conditional and unconditional guidance halves on two ranks")
    p.add_argument("--sp-ulysses", type=int, default=1, help="under torchrun: Ulysses sequence-parallel degree")
    p.add_argument("--sp-ring", type=int, default=1, help="under torchrun: ring-attention sequence-parallel degree")
    p.add_argument("--tp", type=int, default=1, help="under torchrun: tensor-parallel degree")
    p.add_argument("--low-noise-from", default="", metavar="RUN",
                   help="a second expert (Wan 2.2 A14B): --from denoises timesteps >= --boundary, this run those below")
    p.add_argument("--boundary", type=float, default=875.0, help="with --low-noise-from: the timestep (0-1000) where the experts switch")


# ---------------------------------------------------------------------------------------------
# Loading


class TwoExperts(torch.nn.Module):
    """Two experts as one denoiser (Wan 2.2 A14B): the high-noise expert at steps whose timestep is
    at least ``boundary``, the low-noise one below, as Wan's pipeline switches them."""

    def __init__(self, high: VideoDiT, low: VideoDiT, boundary: float):
        super().__init__()
        if high.cfg != low.cfg:
            raise ConfigError(f"the two experts differ: {high.cfg} against {low.cfg}; pass two runs of the same model")
        self.high, self.low, self.boundary, self.cfg = high, low, boundary, high.cfg

    def forward(self, x, t, text, text_mask):
        expert = self.high if float(t.max()) >= self.boundary else self.low  # given frames hold t = 0: the step's is the max
        return expert(x, t, text, text_mask)


def run_config(source: Path) -> Path:
    """config.yaml of a run folder or a checkpoint folder."""
    from sora_dist.checkpoint import newest_complete

    if (source / "config.yaml").is_file():
        return source / "config.yaml"
    newest = newest_complete(source / "checkpoints")
    return (newest or source) / "config.yaml"


def load_for_sampling(path: Path, raw: bool, dev) -> tuple[Config, VideoDiT, str]:
    """The config and a single-device model from a finished run folder (its final safetensors
    weights), or from a checkpoint folder (``.../checkpoints/step-N``), or from a run folder
    without final weights (its newest complete checkpoint). Returns (config, model, source)."""
    from safetensors.torch import load_file

    from sora_dist.build import build_single_device_model, frozen_base_reader
    from sora_dist.checkpoint import load_weights_for_export, newest_complete, verify

    path = Path(path)
    weights = path / ("model.safetensors" if raw else "ema.safetensors")
    if not (path / COMPLETE).is_file() and not weights.is_file():
        newest = newest_complete(path / "checkpoints")
        if newest is None:
            raise ConfigError(
                f"{path} holds neither {weights.name} nor a complete checkpoint under {path / 'checkpoints'}: pass a "
                "finished run folder (checkpoint.save_final=true), or a checkpoint folder such as RUN/checkpoints/step-N"
            )
        log.info("%s has no final weights: sampling its newest complete checkpoint, %s", path, newest.name)
        path = newest
    if (path / COMPLETE).is_file():
        problems = verify(path)
        if problems:
            raise ConfigError(f"{path} is not a complete, undamaged checkpoint: {'; '.join(problems)}")
        cfg = load_config(path / "config.yaml")
        model = build_single_device_model(cfg, cfg.model.in_channels, cfg.model.text_dim, torch.device("cpu"))
        base = frozen_base_reader(cfg, model.cfg, {name: t.shape for name, t in model.state_dict().items()})
        used = load_weights_for_export(path, model, ema=not raw, base=base)
        return cfg, model.to(dev.torch_device), f"{path} ({used} weights)"
    cfg = load_config(path / "config.yaml")
    model = build_single_device_model(cfg, cfg.model.in_channels, cfg.model.text_dim, dev.torch_device)
    model.load_state_dict(load_file(str(weights), device=str(dev.torch_device)))
    return cfg, model, str(weights)


# Wan's own sampling settings (its pipelines' defaults: flow shift 5, guidance 5, 81 frames at
# 480 x 832, which its VAE makes 21 x 60 x 104 latents); the command line's overrides come after.
WAN_SAMPLING = ["--diffusion.objective=flow", "--diffusion.shift=5.0", "--diffusion.guidance_scale=5.0",
                "--diffusion.sampler=euler", "--train.sample_shape=[21,60,104]"]


def load_pipeline(root: Path, dev, overrides: list[str]) -> tuple[Config, VideoDiT, Manifest, str]:
    """A diffusers Wan pipeline folder as if it were a run: its transformer imported, its VAE and
    text encoder named in a manifest, and the empty prompt's states in the model for guidance."""
    from sora_dist.build import build_single_device_model, refuse_image_conditioning
    from sora_dist.data.encoders import TextEncoder, VideoVAE
    from sora_dist.interop.load import load_wan
    from sora_dist.interop.wan import TEXT_LEN, read_config, wan_model_options

    options = wan_model_options(read_config(root / "transformer")[0])
    refuse_image_conditioning(options["image_dim"], "sample")
    model_overrides = [f"--model.{key}={list(value) if isinstance(value, tuple) else value}" for key, value in options.items() if value is not None]
    cfg = load_config(None, [*model_overrides, *WAN_SAMPLING, *overrides])
    model = build_single_device_model(cfg, options["in_channels"], options["text_dim"], torch.device("cpu"))
    load_wan(model, root)
    text = TextEncoder(str(root), "text_encoder", "tokenizer", TEXT_LEN)
    model.set_empty_caption(torch.from_numpy(text.encode([""])[0][0].astype(np.float32)))
    vae = VideoVAE(str(root), "vae")
    manifest = Manifest(latent_channels=vae.latent_channels, text_dim=options["text_dim"], shards=[], shapes={},
                        text_encoder=str(root), text_encoder_subfolder="text_encoder", tokenizer_subfolder="tokenizer",
                        max_text_length=TEXT_LEN, **vae.manifest_fields())
    return cfg, model.to(dev.torch_device), manifest, f"{root} (a diffusers Wan pipeline)"


def first_caption(root: str) -> str:
    """The dataset's first caption, for sampling without a prompt."""
    from sora_dist.data.decode import iter_samples

    for found in iter_samples(root):
        return found.meta.get("caption", "")
    raise DataError(f"{root} holds no samples to take a caption from: pass --prompt")


# ---------------------------------------------------------------------------------------------
# Sampling


@torch.no_grad()
def generate(cfg: Config, model, objective, text: np.ndarray, request: Request, num: int, seed: int, dev,
             autocast_dtype=None, guidance_group=None, guidance: Optional[float] = None) -> np.ndarray:
    """Sample ``num`` latents (N, C, T, h, w) of ``request`` for one prompt's text states.

    The starting noise is drawn on the CPU from ``seed``, so it is the same on every device and
    rank. The model runs under the run's autocast (bf16 on GPU/NPU), as in training; the sampler
    state stays fp32. ``guidance_group`` (two ranks) makes guidance CFG-parallel."""
    from sora_dist.parallel.guidance import cfg_parallel

    model.eval()
    device = dev.torch_device
    text_t = torch.from_numpy(np.asarray(text, dtype=np.float32))[None].expand(num, -1, -1).to(device)
    mask = torch.ones(text_t.shape[:2], dtype=torch.bool, device=device)
    shape = (num, model.cfg.in_channels, *request.shape)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)
    generator = torch.Generator(device=device).manual_seed(seed + 1)  # the DDPM sampler's per-step noise
    scale = cfg.diffusion.guidance_scale if guidance is None else guidance
    denoise = cfg_parallel(model, text_t, mask, scale, guidance_group) if guidance_group is not None else guided(model, text_t, mask, scale)
    init = None if request.init is None else per_sample(request.init, num).to(device)
    with dev.autocast(autocast_dtype):
        latents = sample(objective, cfg.diffusion.sampler, denoise, noise, cfg.diffusion.sample_steps, generator,
                         progress=ProgressLine(f"sampling {num} x {tuple(shape[2:])}"),
                         condition=request.condition(num, model.cfg.patch_size[0], device), init=init, strength=request.strength)
    model.train()
    return latents.float().cpu().numpy()


def sampling_layout(args, model_cfg, dev):
    """(mesh dims, mesh) of a torchrun sampling job, with the SP / TP plans applied by the caller;
    (None, None) in a single process."""
    from sora_dist.parallel import build_mesh, resolve_dims

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        if args.cfg_parallel or args.sp_ulysses * args.sp_ring * args.tp > 1:
            raise ConfigError("--cfg-parallel, --sp-ulysses, --sp-ring and --tp need several ranks: run under torchrun -m sora_dist.sample")
        return None, None
    pcfg = ParallelConfig(dp_replicate=2 if args.cfg_parallel else 1, dp_shard=1, sp_ulysses=args.sp_ulysses, sp_ring=args.sp_ring, tp=args.tp)
    try:
        dims = resolve_dims(pcfg, world, model_cfg)
    except ConfigError as err:
        raise ConfigError(f"sampling layout: {err} (here: 2 if --cfg-parallel x --sp-ulysses x --sp-ring x --tp ranks)") from None
    if not dist.is_initialized():
        dist.init_process_group(dev.comm_backend)
    return dims, build_mesh(dims, dev.torch_device.type)


def parallel_model(model, args, dims, mesh):
    """The single-device model with the layout's SP and TP plans (weights stay replicated)."""
    from sora_dist.parallel import apply_model_parallel

    if dims is not None:
        apply_model_parallel(model, ParallelConfig(sp_ulysses=args.sp_ulysses, sp_ring=args.sp_ring, tp=args.tp), dims, mesh)
    return model


# ---------------------------------------------------------------------------------------------
# Outputs


def write_outputs(out: Path, latents: np.ndarray, request: Request, prompt: str, seed: int, inputs: MediaInputs, args,
                  extension: Optional[dict] = None) -> None:
    """frames.png (a row per clip), latents.npy, request.json and, with a VAE, decoded videos."""
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "latents.npy", latents.astype(np.float32))
    labels = [f"{request.application}: {prompt}\n(seed {seed}, #{i})" for i in range(len(latents))]
    save_frame_grid(list(latents), labels, out / "frames.png")
    given = [] if request.given_frames is None else request.given_frames.nonzero().flatten().tolist()
    record = {"application": request.application, "prompt": prompt, "seed": seed, "latent_shape": list(request.shape),
              "given_frames": given, "strength": request.strength, "num": len(latents)}
    if extension:
        record["prompt_extension"] = extension
    (out / "request.json").write_text(json.dumps(record, indent=2))
    if inputs.vae_name not in LATENT_ONLY_VAES:
        from sora_dist.data.decode import decode_to_file

        for i, latent in enumerate(latents):
            path, shape = decode_to_file(inputs.vae, latent, out / f"sample-{i}{args.video_format}", args.fps)
            log.info("decoded clip %d: %d frames of %dx%d -> %s", i, shape[0], shape[2], shape[1], path)
    log.info("sampled %d x %s of %r -> %s", len(latents), request.application, prompt, out)


def run(args: argparse.Namespace, overrides: list[str]) -> Path:
    """``sora-dist sample``: returns the output folder."""
    from sora_dist import device as device_lib
    from sora_dist.build import autocast_dtype

    source = Path(args.source)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    pipeline = pipeline_root(source) if source.is_dir() else None
    if pipeline is not None and not args.prompt:
        raise ConfigError(f"{pipeline} is a pretrained pipeline, with no dataset to take a caption from: pass --prompt")
    dev = device_lib.detect(load_config(None if pipeline else run_config(source), overrides).parallel.device, local_rank)
    if pipeline is not None:
        cfg, model, manifest, weights = load_pipeline(pipeline, dev, overrides)
    else:
        saved_cfg, model, weights = load_for_sampling(source, args.raw, dev)
        cfg = load_config(run_config(source), overrides) if overrides else saved_cfg
        manifest = read_manifest(cfg.data.path)
    log.info("sampling with %s", weights)
    dims, mesh = sampling_layout(args, model.cfg, dev)
    model = parallel_model(model, args, dims, mesh)
    if args.low_noise_from:
        _, low, low_weights = load_for_sampling(Path(args.low_noise_from), args.raw, dev)
        model = TwoExperts(model, parallel_model(low, args, dims, mesh), args.boundary)
        log.info("low-noise expert (timesteps below %g): %s", args.boundary, low_weights)
    prompt = args.prompt or cfg.train.sample_caption or first_caption(cfg.data.path)
    extension = None
    if args.prompt_extend:
        prompt, extension = extend_prompt(args, prompt, cfg.data.path, dev.kind)
    text = encode_prompt(manifest, prompt, args.text_encoder, model.cfg.text_dim, dev.torch_device)
    inputs = MediaInputs(manifest, model.cfg.in_channels, args.vae, args.vae_subfolder, dev.torch_device)
    request = build_request(args, inputs, cfg.train.sample_shape)
    objective = build_objective(cfg.diffusion, model.cfg.patch_size)
    group = mesh["dp_replicate"].get_group() if dims is not None and dims.dp_replicate == 2 else None
    latents = generate(cfg, model, objective, text, request, args.samples, args.seed, dev, autocast_dtype(cfg, dev), group, args.guidance)
    out = Path(args.out or (source if source.is_dir() else source.parent) / "samples" / f"cli-{request.application}")
    if not dist.is_initialized() or dist.get_rank() == 0:
        write_outputs(out, latents, request, prompt, args.seed, inputs, args, extension)
    return out


def extend_prompt(args, prompt: str, data_path: str, device: str) -> tuple[str, dict]:
    """The extended prompt and its record, made on rank 0 and given to every rank."""
    from sora_dist.prompt_extend import PromptExtender, example_captions

    result = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        image = read_still(args.image) if args.image and Path(args.image).suffix.lower() in IMAGE_SUFFIXES else None
        extender = PromptExtender(args.prompt_extend, example_captions(data_path, args.prompt_extend_examples), image is not None, device)
        result = [extender.extend(prompt, image, args.seed)]
        print(f"extended prompt: {result[0][0]}")
    if dist.is_initialized():
        dist.broadcast_object_list(result, src=0)
    return result[0]


# ---------------------------------------------------------------------------------------------
# Samples of a training run


def sample_report(cfg: Config, model, objective, manifest: Manifest, history: list[dict], out_dir: Path, dev) -> None:
    """The end of a run (rank 0): sample.png, a row per case of ``TrainingSamples`` (each prompt as
    text-to-video, and image-to-video); on the synthetic blobs each row also says which way and
    how fast the blob moved, and samples.json keeps those measurements. Then loss.png."""
    from sora_dist.data.synthetic import motion_of

    cases = TrainingSamples(cfg, manifest, model.cfg.text_dim)
    clips, labels = cases.generate(model, objective, dev)
    measured = []
    if manifest.vae == "synthetic-blobs":
        for i, ((prompt, request), clip) in enumerate(zip(cases.cases, clips)):
            motion = motion_of(clip, prompt)
            measured.append({"application": request.application, "prompt": prompt, **motion})
            labels[i] += f"\nmeasured: moved {motion['direction'] or 'nowhere'}; {motion['speed']:+.2f} px/frame {motion['captioned']} (true +1)"
        (out_dir / "samples.json").write_text(json.dumps(measured, indent=2))
    save_frame_grid(clips, labels, out_dir / "sample.png")
    if history:
        save_loss_plot([r["step"] for r in history], [r["loss"] for r in history], out_dir / "loss.png")
    for row in measured:
        log.info("sample %s %r: moved %s, %.2f px/frame along the caption's direction", row["application"], row["prompt"], row["direction"] or "nowhere", row["speed"])
    log.info("sampled %d clips -> %s; loss curve -> %s", len(clips), out_dir / "sample.png", out_dir / "loss.png")


def first_video_frame(root: str) -> Optional[tuple[str, torch.Tensor]]:
    """The caption and first latent frame (C, 1, h, w) of the dataset's first video, if any."""
    from sora_dist.data.decode import iter_samples

    for found in iter_samples(root):
        if found.latent.shape[1] > 1:
            return found.meta.get("caption", ""), torch.from_numpy(found.latent[:, :1].astype(np.float32))
    return None


class TrainingSamples:
    """What a run samples every ``train.sample_every`` steps (rank 0): each of
    ``train.sample_prompts`` as text-to-video, and image-to-video from the first frame of the
    dataset's first video with its caption, all at ``train.sample_shape`` and the run's seed."""

    def __init__(self, cfg: Config, manifest: Manifest, text_dim: int):
        self.cfg = cfg
        prompts = cfg.train.sample_prompts or [cfg.train.sample_caption or first_caption(cfg.data.path)]
        if cfg.train.sample_prompt_extend:
            from sora_dist.prompt_extend import PromptExtender, example_captions

            extender = PromptExtender(cfg.train.sample_prompt_extend, example_captions(cfg.data.path), device="cpu")
            prompts = [extender.extend(prompt, seed=cfg.train.seed)[0] for prompt in prompts]
        frames, h, w = cfg.train.sample_shape
        self.cases = [(prompt, Request("text_to_video", (frames, h, w))) for prompt in prompts]
        video = first_video_frame(cfg.data.path) if frames > 1 else None
        if video is not None:
            caption, first = video
            self.cases.append((caption, image_to_video(first, frames)))
        self.texts = [encode_prompt(manifest, prompt, "", text_dim, torch.device("cpu")) for prompt, _ in self.cases]

    def generate(self, model, objective, dev) -> tuple[list[np.ndarray], list[str]]:
        """One clip per case, and its label."""
        from sora_dist.build import autocast_dtype

        clips, labels = [], []
        for (prompt, request), text in zip(self.cases, self.texts):
            clips.append(generate(self.cfg, model, objective, text, request, 1, self.cfg.train.seed, dev, autocast_dtype(self.cfg, dev))[0])
            labels.append(f"{request.application}: {prompt}")
        return clips, labels

    def write(self, step: int, model, objective, out_dir: Path, dev, metrics) -> Path:
        """Sample every case with ``model`` (the EMA weights) into out_dir/samples/step-N/ and TensorBoard."""
        folder = Path(out_dir) / "samples" / f"step-{step}"
        folder.mkdir(parents=True, exist_ok=True)
        clips, labels = self.generate(model, objective, dev)
        for i, (clip, label) in enumerate(zip(clips, labels)):
            np.save(folder / f"{i}-{label.split(':')[0]}.npy", clip)
        save_frame_grid(clips, labels, folder / "frames.png")
        metrics.image("samples", folder / "frames.png", step)
        log.info("step %d: sampled %d clips with the EMA weights -> %s", step, len(clips), folder)
        return folder


@user_command
def main(argv: Optional[list[str]] = None) -> int:
    """``python -m sora_dist.sample`` (under torchrun for several ranks)."""
    parser = CommandParser(prog="sora-dist sample", description=__doc__.split("\n\n")[0], epilog=APPLICATIONS,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args, overrides = parser.parse_known_args(argv)
    try:
        return run(args, overrides)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    exit_process(main())
