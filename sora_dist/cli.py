"""``sora-dist`` command line: train | sample | export | checkpoint verify | make-synthetic | curate | caption | encode | decode | inspect | plot | goodput | fault-drill | bench-* | plan | ..."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path
from typing import NoReturn

from sora_dist.config import describe_keys
from sora_dist.console import CommandParser, exit_process, positive_int, run_command

log = logging.getLogger("sora_dist")


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> None:
    from sora_dist.config import load_config
    from sora_dist.trainer import train

    summary = train(load_config(args.config, overrides))
    if "first_loss" in summary:
        log.info(
            "done: %d steps in %.0f s; loss %.4f (first tenth) -> %.4f (last tenth)",
            summary["steps"], summary["seconds"], summary["first_loss"], summary["last_loss"],
        )


def cmd_make_synthetic(args: argparse.Namespace, overrides: list[str]) -> None:
    from sora_dist.data import make_synthetic, read_manifest

    make_synthetic(args.out, args.samples, args.seed, args.samples_per_shard)
    manifest = read_manifest(args.out)
    log.info("%s: %d samples in %d shards", args.out, manifest.num_samples, len(manifest.shards))


def cmd_encode(args: argparse.Namespace, overrides: list[str]) -> None:
    from sora_dist.data.encode import EncodeConfig, run_encode

    run_encode(EncodeConfig(**_dataclass_fields(EncodeConfig, args)))


def _dataclass_fields(cls, args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k in cls.__dataclass_fields__ and v is not None}


def cmd_curate(args: argparse.Namespace, overrides: list[str]) -> None:
    from sora_dist.data.curate import CurateConfig, run_curate

    run_curate(CurateConfig(**_dataclass_fields(CurateConfig, args)))


def cmd_caption(args: argparse.Namespace, overrides: list[str]) -> None:
    from sora_dist.data.caption import CaptionConfig, run_caption

    run_caption(CaptionConfig(**_dataclass_fields(CaptionConfig, args)))


def cmd_decode(args: argparse.Namespace, overrides: list[str]) -> None:
    from sora_dist import device as device_lib
    from sora_dist.data import read_manifest
    from sora_dist.data.decode import decode_dataset
    from sora_dist.data.encoders import VideoVAE

    read_manifest(args.data)  # a missing dataset is named before the VAE is loaded
    vae = VideoVAE(args.vae, args.vae_subfolder, device_lib.detect(args.device).torch_device)
    written = decode_dataset(args.data, vae, args.out, args.num, args.format)
    log.info("decoded %d samples of %s -> %s", len(written), args.data, args.out)


def cmd_inspect(args: argparse.Namespace, overrides: list[str]) -> None:
    from sora_dist.data import read_manifest

    manifest = read_manifest(args.dir)
    print(f"dataset        {args.dir}")
    print(f"samples        {manifest.num_samples} in {len(manifest.shards)} shards")
    print(f"latent         {manifest.latent_channels} channels, scaling {manifest.scaling_factor}, shift {manifest.shift_factor}")
    print(f"text           width {manifest.text_dim}")
    print(f"vae            {manifest.vae or '?'} (compression {manifest.compression})")
    print(f"text encoder   {manifest.text_encoder or '?'}")
    print("shapes (T x h x w)       samples   share")
    for shape, count in sorted(manifest.shapes.items(), key=lambda kv: -kv[1]):
        print(f"  {shape:<22} {count:>8}   {count / manifest.num_samples:6.1%}  {'#' * round(40 * count / manifest.num_samples)}")


def cmd_export(args: argparse.Namespace, overrides: list[str]) -> None:
    import json

    from safetensors.torch import save_file

    import torch

    from sora_dist.build import frozen_base_reader, single_model
    from sora_dist.checkpoint import load_weights_for_export, verify
    from sora_dist.config import load_config, resolve_model_config
    from sora_dist.errors import ConfigError

    path = Path(args.checkpoint)
    problems = verify(path)
    if problems:
        raise ConfigError(f"{path} is not a complete, undamaged checkpoint: {'; '.join(problems)}")
    if (path / "deepspeed").is_dir():
        raise ConfigError(f"{path} is a DeepSpeed checkpoint: consolidate it with DeepSpeed's zero_to_fp32.py, or train with engine=fsdp")
    cfg = load_config(path / "config.yaml")
    if args.format == "diffusers":
        return export_diffusers(path, cfg, resolve_model_config(cfg.model, cfg.model.in_channels, cfg.model.text_dim), args)
    model_cfg = resolve_model_config(cfg.model, cfg.model.in_channels, cfg.model.text_dim)
    model = single_model(cfg, model_cfg, torch.device("cpu"))
    base = frozen_base_reader(cfg, model_cfg, {name: t.shape for name, t in model.state_dict().items()})
    used = load_weights_for_export(path, model, ema=not args.raw, base=base)
    metadata = {"model_config": json.dumps(cfg.to_dict()["model"]), "weights": used, "checkpoint": str(path)}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out, metadata=metadata)
    log.info("exported the %s weights of %s (%d tensors) -> %s", used, path, len(model.state_dict()), args.out)


def export_diffusers(path: Path, cfg, model_cfg, args: argparse.Namespace) -> None:
    """A Wan-layout checkpoint as a diffusers transformer folder (or pipeline folder with --base),
    read and written one safetensors file's worth at a time."""
    import torch

    from sora_dist.build import add_adapters, frozen_base_reader
    from sora_dist.checkpoint import weight_reader
    from sora_dist.errors import ConfigError
    from sora_dist.interop.export import DTYPES, pipeline_around, write_diffusers, write_lora
    from sora_dist.models import VideoDiT
    from sora_dist.models.lora import adapted_modules, merging_reader

    with torch.device("meta"):
        model = VideoDiT(model_cfg)
        add_adapters(model, cfg)
    shapes = {name: t.shape for name, t in model.state_dict().items()}
    read, used = weight_reader(path, shapes, ema=not args.raw, base=frozen_base_reader(cfg, model_cfg, shapes))
    adapted = adapted_modules(shapes)
    if args.lora_only:
        if not adapted:
            raise ConfigError(f"{path} holds no LoRA adapters (lora.rank was 0): export the whole model without --lora-only")
        written = write_lora(read, model_cfg, adapted, cfg.lora.scale, Path(args.out), DTYPES[args.dtype])
        log.info("exported the %s LoRA adapters of %s (%d layers) -> %s", used, path, len(adapted), written)
        return
    if adapted:  # LoRA: each adapted weight leaves as W + (alpha / rank) B A
        read = merging_reader(read, adapted, cfg.lora.scale)
    out = Path(args.out)
    transformer = out / "transformer" if args.base else out
    write_diffusers(read, model_cfg, transformer, DTYPES[args.dtype], int(args.shard_gib * 2**30))
    if args.base:
        pipeline_around(Path(args.base), out)
    log.info("exported the %s weights of %s as a diffusers Wan %s -> %s", used, path, "pipeline" if args.base else "transformer", out)


def cmd_checkpoint_verify(args: argparse.Namespace, overrides: list[str]) -> None:
    import time

    from sora_dist.checkpoint import COMPLETE, finished_checkpoints, verify
    from sora_dist.checkpoint.manager import checkpoint_size
    from sora_dist.errors import CheckpointError

    path = Path(args.path)
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    paths = [path] if (path / COMPLETE).exists() or path.name.startswith("step-") else finished_checkpoints(folder)
    if not paths:
        raise CheckpointError(f"{path} holds no step-N checkpoint: pass a checkpoint folder, a checkpoint.dir or a run folder")
    damaged = 0
    for checkpoint in paths:
        start = time.perf_counter()
        problems = verify(checkpoint)
        if problems:
            damaged += 1
            print(f"{checkpoint.name:<14} DAMAGED  {'; '.join(problems)}")
        else:
            size = checkpoint_size(checkpoint)
            print(f"{checkpoint.name:<14} ok       {size / 2**20:.1f} MiB verified in {time.perf_counter() - start:.2f} s")
    if damaged:
        raise CheckpointError(f"{damaged} of {len(paths)} checkpoints in {folder} are damaged; a resume skips them and tries the one before")


def cmd_goodput(args: argparse.Namespace, overrides: list[str]) -> None:
    from sora_dist.errors import ConfigError
    from sora_dist.resilience.goodput import format_summary, read_attempts, summarize

    attempts = read_attempts(Path(args.run) / "goodput")
    if not attempts:
        raise ConfigError(f"{args.run} has no goodput records (goodput/attempt-N.json): pass a train.out_dir of a run")
    for attempt in attempts:
        seconds = attempt["seconds"]
        log.info("attempt %d: world size %d, resumed at step %d, last step %d | startup %.1f s, steps %.1f s, data wait %.1f s, "
                 "checkpoints %.1f s", attempt["attempt"], attempt["world_size"], attempt["resumed_from_step"], attempt["last_step"],
                 seconds["startup"], seconds["step"], seconds["data_wait"], seconds["checkpoint"])
    log.info(format_summary(summarize(attempts)))


def cmd_plot(args: argparse.Namespace, overrides: list[str]) -> None:
    from sora_dist.errors import ConfigError
    from sora_dist.metrics import read_history
    from sora_dist.visualize import save_loss_comparison

    curves = {}
    for run in args.runs:
        label, _, path = run.rpartition("=") if "=" in run else (run, "", run)
        metrics = Path(path) / "metrics.jsonl"
        if not metrics.exists():
            raise ConfigError(f"{metrics} does not exist: pass run folders (train.out_dir) as LABEL=FOLDER or FOLDER")
        history = read_history(metrics)
        curves[label] = ([r["step"] for r in history], [r["loss"] for r in history])
    save_loss_comparison(curves, args.out)
    for label, (steps, losses) in curves.items():
        print(f"{label:<30} steps {steps[-1]:>6}  first {losses[0]:.4f}  last {losses[-1]:.4f}")
    log.info("loss curves -> %s", args.out)


# Commands with their own argument parsers: modules that also run under torchrun (python -m ...).
MODULE_COMMANDS = {
    "sample": "sora_dist.sample",
    "eval-blobs": "sora_dist.evaluate",
    "gpu-proof": "sora_dist.perf.gpu_proof",
    "bench-train": "sora_dist.perf.bench_train",
    "bench-kernels": "sora_dist.perf.bench_kernels",
    "bench-checkpoint": "sora_dist.perf.bench_checkpoint",
    "bench-import": "sora_dist.perf.bench_import",
    "bench-wan": "sora_dist.perf.bench_wan",
    "bench-loader": "sora_dist.perf.bench_loader",
    "bench-data": "sora_dist.perf.bench_data",
    "bench-comm": "sora_dist.perf.bench_comm",
    "calibrate": "sora_dist.perf.calibration",
    "plan": "sora_dist.perf.plan",
    "bench-scaling": "sora_dist.perf.scaling",
    "scaling-report": "sora_dist.perf.scaling:report_main",
    "fault-drill": "sora_dist.resilience.chaos",
}


def add_curate_parser(sub) -> None:
    p = sub.add_parser("curate", help="raw videos -> a JSONL of scored clips: probe, scene split, motion/text/aesthetic scores, "
                       "filters, near-duplicates (runs under torchrun too; docs/data-engine.md)")
    p.add_argument("inputs", nargs="+", help="folders, globs, video files, or .csv / .jsonl lists of path[, caption]")
    p.add_argument("--out", required=True, help="the clip list to write, e.g. clips.jsonl (resumes if OUT.parts holds the same job)")
    split = p.add_argument_group("scene split")
    split.add_argument("--scene-threshold", dest="scene_threshold", type=float, help="mean absolute RGB change (0-255) that can start a scene (20)")
    split.add_argument("--scene-ratio", dest="scene_ratio", type=float, help="... and how many times the change around it it must be (3)")
    split.add_argument("--min-seconds", dest="min_seconds", type=float, help="shortest clip kept (2)")
    split.add_argument("--max-seconds", dest="max_seconds", type=float, help="longer scenes are cut into equal clips of at most this (10)")
    split.add_argument("--trim-frames", dest="trim_frames", type=int, help="frames dropped each side of a cut (1)")
    split.add_argument("--no-split", dest="split", action="store_false", default=None, help="one clip per file")
    scores = p.add_argument_group("scores")
    scores.add_argument("--analysis-size", dest="analysis_size", type=int, help="longer side of the frames every score sees (256)")
    scores.add_argument("--sample-fps", dest="sample_fps", type=float, help="frames per second sampled for the scores (4)")
    scores.add_argument("--no-text-area", dest="text_area", action="store_false", default=None, help="skip the OCR text-area score")
    scores.add_argument("--aesthetic-clip", dest="aesthetic_clip", help="a CLIP model (transformers folder or hub name) for the aesthetic score")
    scores.add_argument("--aesthetic-head", dest="aesthetic_head", help="its scoring head: .safetensors / .pt state dict of linear layers")
    scores.add_argument("--device", help="device of the aesthetic model (cpu)")
    keep = p.add_argument_group("filters (changing them re-runs only the selection)")
    for name in ("min_motion", "max_motion", "min_brightness", "max_brightness", "min_sharpness", "max_text_area", "min_aesthetic"):
        keep.add_argument("--" + name.replace("_", "-"), dest=name, type=float)
    keep.add_argument("--dedup-bits", dest="dedup_bits", type=int, help="near-duplicate distance, of 192 hash bits (12; -1 keeps duplicates)")
    keep.add_argument("--write-clips", dest="write_clips", help="also write each kept clip as an .mp4 into this folder")
    p.set_defaults(func=cmd_curate, overrides_allowed=False)


def add_caption_parser(sub) -> None:
    p = sub.add_parser("caption", help="caption a clip list with a vision-language model (transformers or an OpenAI-compatible "
                       "server; runs under torchrun too; docs/data-engine.md)")
    p.add_argument("input", help="a clip list (sora-dist curate's JSONL)")
    p.add_argument("--out", required=True, help="the captioned clip list to write (resumes if OUT.parts holds the same job)")
    p.add_argument("--model", required=True, help="a transformers VLM (folder or hub name), or a server URL, e.g. http://localhost:8000/v1")
    p.add_argument("--endpoint-model", dest="endpoint_model", help="with a URL: the served model's name (default: the first listed)")
    p.add_argument("--api-key-env", dest="api_key_env", help="with a URL: environment variable holding the API key (OPENAI_API_KEY)")
    p.add_argument("--instruction", help="what the model is asked (default: a dense, chronological ~80-word description)")
    p.add_argument("--frames", type=positive_int, help="frames per clip, spread over its span (8); with --fps the most")
    p.add_argument("--fps", type=float, help="sample this many frames per second of each clip instead, 1 to --frames (0: always --frames)")
    p.add_argument("--frame-size", dest="frame_size", type=positive_int, help="longer side of each frame, pixels (448)")
    p.add_argument("--batch-size", dest="batch_size", type=positive_int, help="clips per generate call, local model (4)")
    p.add_argument("--concurrency", type=positive_int, help="requests in flight, server (8)")
    p.add_argument("--workers", type=int, help="decoding processes (2)")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=positive_int, help="longest caption, tokens (200)")
    p.add_argument("--score-words", dest="score_words", nargs="+", help="append these scores as words: motion aesthetic brightness")
    p.add_argument("--chunk-size", dest="chunk_size", type=positive_int, help="clips per resumable chunk (32)")
    p.add_argument("--device", help="auto, cuda, npu or cpu")
    p.set_defaults(func=cmd_caption, overrides_allowed=False)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="sora-dist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train", help="train a video DiT; extra --section.key=value arguments override the config",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Config keys (defaults < the --config file < --section.key=value on the command line; every field is\n"
               "documented in sora_dist/config.py and docs/configuration.md):\n\n" + describe_keys(),
    )
    p.add_argument("--config", required=True, help="YAML experiment file, e.g. configs/demo.yaml")
    p.set_defaults(func=cmd_train, overrides_allowed=True)


    p = sub.add_parser("make-synthetic", help="write a synthetic dataset of moving coloured blobs")
    p.add_argument("--out", required=True)
    p.add_argument("--samples", type=positive_int, default=768)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples-per-shard", type=int, default=64)
    p.set_defaults(func=cmd_make_synthetic, overrides_allowed=False)

    p = sub.add_parser("encode", help="encode videos/images and captions into latent shards (runs under torchrun too)")
    p.add_argument("--input", required=True, help="folder of videos/images with <name>.txt captions, or a .csv / .jsonl of path, caption")
    p.add_argument("--out", required=True, help="dataset folder to write (resumes if it holds the same job)")
    p.add_argument("--vae", required=True, help="diffusers VAE: local folder or hub name")
    p.add_argument("--text-encoder", dest="text_encoder", required=True, help="transformers text encoder + tokenizer: local folder or hub name")
    p.add_argument("--vae-subfolder", dest="vae_subfolder")
    p.add_argument("--text-encoder-subfolder", dest="text_encoder_subfolder")
    p.add_argument("--tokenizer-subfolder", dest="tokenizer_subfolder")
    p.add_argument("--max-text-length", dest="max_text_length", type=int)
    p.add_argument("--buckets", nargs="+", help="FRAMESxHEIGHTxWIDTH sizes, e.g. 1x256x256 33x256x448 (1-frame buckets take images)")
    p.add_argument("--fps", type=float, help="sample video frames at this rate (0: the source rate)")
    p.add_argument("--samples-per-shard", dest="samples_per_shard", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--device", help="auto, cuda, npu or cpu")
    p.set_defaults(func=cmd_encode, overrides_allowed=False)

    add_curate_parser(sub)
    add_caption_parser(sub)

    p = sub.add_parser("decode", help="decode a dataset's latents back into videos with its VAE")
    p.add_argument("--data", required=True, help="dataset folder (manifest.json + shards)")
    p.add_argument("--vae", required=True, help="the diffusers VAE that encoded it")
    p.add_argument("--vae-subfolder", default="")
    p.add_argument("--out", required=True, help="folder for the decoded clips")
    p.add_argument("--num", type=int, default=4, help="how many samples, in dataset order")
    p.add_argument("--format", default=".mp4", choices=[".mp4", ".gif"])
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_decode, overrides_allowed=False)

    p = sub.add_parser("export", help="write a checkpoint's weights as safetensors, or as a diffusers Wan folder")
    p.add_argument("checkpoint", help="a step-N checkpoint folder")
    p.add_argument("--out", required=True, help="e.g. model.safetensors; with --format diffusers a folder")
    p.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA weights")
    p.add_argument("--format", default="sora-dist", choices=["sora-dist", "diffusers"],
                   help="diffusers: a WanTransformer3DModel folder (a Wan-preset model; docs/wan.md)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"], help="with --format diffusers: the weights' dtype")
    p.add_argument("--shard-gib", type=float, default=5.0, help="with --format diffusers: the largest safetensors file, GiB")
    p.add_argument("--base", default="", help="with --format diffusers: a diffusers Wan pipeline folder; writes a whole pipeline "
                   "around the exported transformer, its other components linked")
    p.add_argument("--lora-only", action="store_true", help="with --format diffusers: a LoRA run's adapters alone, as "
                   "WanPipeline.load_lora_weights reads them (without it they are folded into the weights)")
    p.set_defaults(func=cmd_export, overrides_allowed=False)

    sub.add_parser("gpu-proof", help="prove a GPU machine: GPU tests, demo in bf16, bench-train/kernels/loader; writes JSON + markdown (see --help)")
    sub.add_parser("sample", help="sample a run: text-to-video/-image, image-to-video, extend, connect, edit; under torchrun with SP / CFG-parallel (see --help)")
    sub.add_parser("eval-blobs", help="measure a blob-trained run's applications: direction, speed, colour, connecting (see --help)")
    sub.add_parser("bench-train", help="step time, tokens/s, MFU and memory of a preset and layout (see --help)")
    sub.add_parser("bench-kernels", help="attention TFLOP/s, fused kernels' GB/s, step time with fused kernels on/off")
    sub.add_parser("bench-checkpoint", help="time checkpoint save/load and async vs blocking overhead (see --help)")
    sub.add_parser("bench-import", help="peak memory per rank while importing a Wan folder onto FSDP (see --help)")
    sub.add_parser("bench-wan", help="a Wan training step in sora_dist against diffusers, same weights and input (see --help)")
    sub.add_parser("bench-loader", help="shard streaming samples/s and MB/s, and data wait against a step time (see --help)")
    sub.add_parser("bench-data", help="data-engine throughput per stage: curate, caption frame decoding, caption with a VLM (see --help)")
    sub.add_parser("bench-comm", help="all-gather, reduce-scatter, all-reduce, all-to-all, ring send/recv on every mesh group (under torchrun)")
    sub.add_parser("calibrate", help="measure this device's achieved FLOP/s and overheads for the performance model")
    sub.add_parser("plan", help="rank every layout on N accelerators: step time, exposed comm, memory, MFU; scaling tables (see --help)")
    sub.add_parser("bench-scaling", help="bench-train over many layouts and world sizes, against the model's predictions")
    sub.add_parser("scaling-report", help="predicted vs measured from bench-train JSON of separate jobs")
    sub.add_parser("fault-drill", help="chaos suite: inject faults (killed node, frozen rank, full disk, damaged checkpoints, NaN, ...) into real jobs; report what each cost")

    p = sub.add_parser("checkpoint", help="check checkpoints offline: every file against the checksums written with it")
    actions = p.add_subparsers(dest="action", required=True)
    v = actions.add_parser("verify", help="verify a step-N folder, or every checkpoint of a checkpoint.dir or run folder")
    v.add_argument("path", help="RUN/checkpoints/step-N, a checkpoint.dir, or a run folder (train.out_dir)")
    v.set_defaults(func=cmd_checkpoint_verify, overrides_allowed=False)

    p = sub.add_parser("goodput", help="where a run's wall time went, across its restarts: productive steps, lost work, saves, waits")
    p.add_argument("run", help="a run folder (train.out_dir)")
    p.set_defaults(func=cmd_goodput, overrides_allowed=False)

    p = sub.add_parser("plot", help="plot the loss curves of several runs on one chart")
    p.add_argument("runs", nargs="+", help="run folders, optionally labelled: LABEL=runs/x")
    p.add_argument("--out", default="loss_comparison.png")
    p.set_defaults(func=cmd_plot, overrides_allowed=False)

    p = sub.add_parser("inspect", help="print a dataset's manifest and shape histogram")
    p.add_argument("dir")
    p.set_defaults(func=cmd_inspect, overrides_allowed=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in MODULE_COMMANDS:
        module, _, function = MODULE_COMMANDS[argv[0]].partition(":")
        return getattr(importlib.import_module(module), function or "main")(argv[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not args.overrides_allowed:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return run_command(lambda: args.func(args, extra))


def run() -> NoReturn:
    """The ``sora-dist`` console script: main, then exit_process (a gloo job's clean exit)."""
    exit_process(main())


if __name__ == "__main__":
    run()
