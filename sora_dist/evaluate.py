"""``sora-dist eval-blobs``: proof by measurement that one trained model does Sora's applications,
on the synthetic moving-blob data (``sora_dist.data.synthetic``).

Fresh blob clips (8 x 16 x 16 latents, large blobs, 1 latent pixel per frame) are rendered for
every direction; each application gets the frames it is given and the caption of the clip:

- image-to-video from the first frame, and forward extension from the first 4 frames: the blob
  must keep moving the captioned way, at about 1 pixel per frame, in the generated frames;
- backward extension from the last 4 frames: the generated earlier frames must lead into them,
  so the whole clip still moves the captioned way in time;
- connecting the first and the last frame: the generated middle must pass between the two
  positions (distance from the straight path, against the distance the blob travels);
- text-to-video with the held-out colour-direction pairs (never in training): the blob must have
  that colour and move that way; the same for pairs training had (the control: an unseen pair
  can only be expected to move where seen ones do);
- image-to-video with the held-out pairs, from a first frame of that colour: whether the model
  reads the unseen caption's direction when the frame already fixes colour and place, which
  tells a caption the model cannot compose from a clip it cannot lay out from text alone.

The blob's position in a frame is the centroid of its brightness channel (3) above a floor; its
direction is the nearest of the four to its displacement. Untrained models score at chance (25%
direction accuracy, speed near 0 or erratic), which is what the tests check against.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from sora_dist.applications import Request, encode_prompt
from sora_dist.console import CommandParser, user_command
from sora_dist.data.synthetic import COLORS, DIRECTIONS, HELD_OUT, caption_for, centroids, colour_of, direction_of, render, speed_along
from sora_dist.errors import ConfigError

log = logging.getLogger("sora_dist")

CLIP_SHAPE = (8, 16, 16)
CONTEXT = 4  # frames given for extension


# ---------------------------------------------------------------------------------------------
# Cases


@dataclass
class Case:
    """One prompt's batch of clips to sample, with the truth they were cut from."""

    application: str
    colour: str
    direction: str
    truth: np.ndarray
    """(N, C, T, h, w) rendered clips."""
    given: Optional[np.ndarray]
    """(T,) bool given frames, or None."""

    @property
    def kind(self) -> str:
        """The application without the held-out suffix: what is given and what is measured."""
        return self.application.removesuffix("_unseen")

    @property
    def prompt(self) -> str:
        return caption_for(self.colour, "large", self.direction)

    def request(self) -> Request:
        if self.given is None:
            return Request(self.kind, CLIP_SHAPE)
        given = torch.from_numpy(self.given)
        latents = torch.from_numpy(self.truth) * given[None, None, :, None, None]
        return Request(self.kind, CLIP_SHAPE, latents, given)


GIVEN = {
    "image_to_video": np.arange(CLIP_SHAPE[0]) < 1,
    "extend_forward": np.arange(CLIP_SHAPE[0]) < CONTEXT,
    "extend_backward": np.arange(CLIP_SHAPE[0]) >= CLIP_SHAPE[0] - CONTEXT,
    "connect": np.isin(np.arange(CLIP_SHAPE[0]), [0, CLIP_SHAPE[0] - 1]),
}


def make_cases(per_direction: int, seed: int) -> list[Case]:
    """Every application for every direction, with a colour that training paired with it
    (text-to-video included, as the control), and text-to-video and image-to-video for the
    held-out pairs."""
    rng = np.random.default_rng(seed)
    colours = list(COLORS)
    cases = []
    for application, given in {**GIVEN, "text_to_video": None}.items():
        for i, direction in enumerate(DIRECTIONS):
            colour = next(c for c in colours[i:] + colours if (c, direction) not in HELD_OUT)
            truth = np.stack([render(colour, "large", direction, CLIP_SHAPE, rng) for _ in range(per_direction)]).astype(np.float32)
            cases.append(Case(application, colour, direction, truth, given))
    for colour, direction in sorted(HELD_OUT):
        cases.append(Case("text_to_video_unseen", colour, direction, np.zeros((per_direction, 4, *CLIP_SHAPE), np.float32), None))
    for colour, direction in sorted(HELD_OUT):  # after the others, so their clips stay as they were
        truth = np.stack([render(colour, "large", direction, CLIP_SHAPE, rng) for _ in range(per_direction)]).astype(np.float32)
        cases.append(Case("image_to_video_unseen", colour, direction, truth, GIVEN["image_to_video"]))
    return cases


# ---------------------------------------------------------------------------------------------
# Scoring


def score(case: Case, clips: np.ndarray) -> list[dict]:
    """Per generated clip: the measured direction, speed and, per application, its extra check."""
    rows = []
    generated = ~case.given if case.given is not None else np.ones(CLIP_SHAPE[0], bool)
    for clip in clips:
        track = centroids(clip)
        row = {"colour": colour_of(clip[:, generated])}
        if case.kind in ("image_to_video", "extend_forward"):
            last_given = int(np.flatnonzero(case.given)[-1])
            moving = track[last_given:]
        elif case.kind == "extend_backward":
            moving = track[: int(np.flatnonzero(case.given)[0]) + 1]
        elif case.kind == "connect":  # the generated middle alone: the given ends fix the way
            moving = track[1:-1]
        else:
            moving = track
        row["direction"] = direction_of(moving[-1] - moving[0])
        row["speed"] = speed_along(moving, case.direction)
        if case.kind == "connect":
            row["off_path"] = _off_path(track)
        rows.append(row)
    return rows


def _off_path(track: np.ndarray) -> float:
    """Mean distance of the middle frames' centroids from the straight path between the ends,
    with each frame expected at its share of the way."""
    t = np.linspace(0, 1, len(track))[:, None]
    expected = (1 - t) * track[0] + t * track[-1]
    return float(np.nanmean(np.linalg.norm(track[1:-1] - expected[1:-1], axis=1)))


def summarize(cases: list[Case], scores: list[list[dict]]) -> dict[str, dict]:
    """Application -> direction accuracy, mean speed (px/frame), and its extra numbers."""
    summary: dict[str, dict] = {}
    for case, rows in zip(cases, scores):
        entry = summary.setdefault(case.application, {"clips": 0, "direction_hits": 0, "colour_hits": 0, "speeds": [], "off_path": []})
        entry["clips"] += len(rows)
        entry["direction_hits"] += sum(r["direction"] == case.direction for r in rows)
        entry["colour_hits"] += sum(r["colour"] == case.colour for r in rows)
        entry["speeds"] += [r["speed"] for r in rows]
        entry["off_path"] += [r["off_path"] for r in rows if "off_path" in r]
    result = {}
    for application, entry in summary.items():
        speeds = np.asarray(entry["speeds"], dtype=float)
        result[application] = {
            "clips": entry["clips"],
            "direction_accuracy": entry["direction_hits"] / entry["clips"],
            "colour_accuracy": entry["colour_hits"] / entry["clips"],
            "speed_px_per_frame": float(np.nanmedian(speeds)) if np.isfinite(speeds).any() else float("nan"),
            **({"off_path_px": float(np.nanmean(entry["off_path"]))} if entry["off_path"] else {}),
        }
    return result


def along_direction(clips: np.ndarray, origin: np.ndarray, direction: str) -> np.ndarray:
    """(N, T) centroid positions of (N, C, T, h, w) clips along ``direction``, relative to the
    (N, 2) ``origin`` positions."""
    tracks = np.stack([centroids(clip) for clip in clips])  # (N, T, 2)
    return (tracks - origin[:, None]) @ np.asarray(DIRECTIONS[direction], dtype=float)


def format_table(result: dict[str, dict]) -> str:
    lines = [f"{'application':<22} {'clips':>5} {'direction':>9} {'colour':>7} {'speed px/frame':>15} {'off path px':>12}"]
    for application, r in result.items():
        off = f"{r['off_path_px']:.2f}" if "off_path_px" in r else "-"
        lines.append(f"{application:<22} {r['clips']:>5} {r['direction_accuracy']:>9.0%} {r['colour_accuracy']:>7.0%} "
                     f"{r['speed_px_per_frame']:>15.2f} {off:>12}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# One-step predictions: where a sample goes wrong


NOISE_LEVELS = (0.2, 0.5, 0.8, 0.95)


@torch.no_grad()
def one_step_offsets(model, objective, manifest, cases: list[Case], dev, levels=NOISE_LEVELS, seed: int = 0) -> dict[str, dict[float, list[float]]]:
    """Application -> noise level t -> per frame, the mean offset (px) along the true motion of
    the blob in the model's one-step clean prediction, x0 = x_t - t v, from the true clip noised
    to t (its given frames clean, at t = 0), with the clip's caption. A sampler commits to the
    layout at high t, so a model whose high-t prediction lags behind the truth samples slow
    motion; a model that knows the clips gives 0 everywhere. Text-to-video, with nothing given,
    shows whether the caption sets the motion while the layout is decided. Flow objective only."""
    from sora_dist.diffusion.masks import broadcast_to_latents
    from sora_dist.diffusion.objectives import FlowObjective

    if not isinstance(objective, FlowObjective):
        raise ConfigError("eval-blobs --one-step reads x0 = x_t - t v, which needs diffusion.objective=flow")
    model.eval()
    device, generator = dev.torch_device, torch.Generator().manual_seed(seed)
    sums: dict[str, dict[float, list[np.ndarray]]] = {}
    for case in (c for c in cases if c.truth.any()):  # every case with a true clip to noise
        text = torch.from_numpy(encode_prompt(manifest, case.prompt, "", model.cfg.text_dim, torch.device("cpu")))
        x0, n = torch.from_numpy(case.truth).to(device), len(case.truth)
        condition = case.request().condition(n, model.cfg.patch_size[0], device)
        true_along = along_direction(case.truth, np.zeros((n, 2)), case.direction)
        for level in levels:
            t = torch.full((n,), level, device=device)
            if condition is not None:
                t = condition.timesteps(t)  # (n, T'), 0 on the given frames
            t_latent = broadcast_to_latents(t, x0, model.cfg.patch_size[0])
            x_t = (1 - t_latent) * x0 + t_latent * torch.randn(x0.shape, generator=generator).to(device)
            v = model(x_t, t * 1000, text[None].expand(n, -1, -1).to(device), torch.ones(n, len(text), dtype=torch.bool, device=device))
            predicted = (x_t - t_latent * v.float()).cpu().numpy()
            offset = along_direction(predicted, np.zeros((n, 2)), case.direction) - true_along
            sums.setdefault(case.application, {}).setdefault(level, []).append(offset)
    model.train()
    return {app: {level: np.nanmean(np.concatenate(rows), axis=0).tolist() for level, rows in by_level.items()} for app, by_level in sums.items()}


def format_offsets(offsets: dict[str, dict[float, list[float]]]) -> str:
    lines = ["one-step clean prediction: mean offset along the true motion (px) per frame, from the truth noised to t"]
    for application, by_level in offsets.items():
        for level, row in by_level.items():
            lines.append(f"{application:<16} t={level:<5} " + " ".join(f"{v:+6.2f}" for v in row))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The command


def evaluate(cfg, model, objective, manifest, dev, per_direction: int, seed: int, guidance: Optional[float] = None,
             out: Optional[Path] = None) -> dict[str, dict]:
    """Sample every case with ``model`` and score it; writes frames per application under ``out``."""
    from sora_dist.sample import generate
    from sora_dist.visualize import save_frame_grid, save_track_plot

    cases, scores, shown, tracks = make_cases(per_direction, seed), [], {}, {}
    for index, case in enumerate(cases):
        text = encode_prompt(manifest, case.prompt, "", model.cfg.text_dim, torch.device("cpu"))
        clips = generate(cfg, model, objective, text, case.request(), per_direction, seed + index, dev, guidance=guidance)
        scores.append(score(case, clips))
        shown.setdefault(case.application, []).append((clips[0], f"{case.prompt}\n{scores[-1][0]['direction']}"))
        if case.given is not None:  # positions against the true clip's first frame
            origin = np.stack([centroids(t)[0] for t in case.truth])
            panel = tracks.setdefault(case.application, ([], [], case.given))
            panel[0].append(along_direction(case.truth, origin, case.direction))
            panel[1].append(along_direction(clips, origin, case.direction))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for application, rows in shown.items():
            save_frame_grid([clip for clip, _ in rows], [label for _, label in rows], out / f"{application}.png")
        save_track_plot({name: (np.concatenate(t), np.concatenate(g), given) for name, (t, g, given) in tracks.items()}, out / "tracks.png")
    return summarize(cases, scores)


@user_command
def main(argv: Optional[list[str]] = None) -> int:
    parser = CommandParser(prog="sora-dist eval-blobs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", required=True, metavar="RUN", help="a run trained on the synthetic blobs (configs/demo.yaml)")
    parser.add_argument("--per-direction", type=int, default=4, help="clips per direction and application (4 directions)")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the run's diffusion.guidance_scale)")
    parser.add_argument("--out", default="", help="folder for results.json and a frame grid per application (default: RUN/eval-blobs)")
    parser.add_argument("--one-step", action="store_true",
                        help="also the offset of the blob in the model's one-step clean prediction at several noise levels, per frame")
    args, overrides = parser.parse_known_args(argv)
    return _run(args, overrides)


def _run(args, overrides) -> None:
    from sora_dist import device as device_lib
    from sora_dist.config import load_config
    from sora_dist.data.format import read_manifest
    from sora_dist.diffusion import build_objective
    from sora_dist.sample import load_for_sampling, run_config

    source = Path(args.source)
    dev = device_lib.detect(load_config(run_config(source), overrides).parallel.device)
    saved, model, weights = load_for_sampling(source, raw=False, dev=dev)
    cfg = load_config(run_config(source), overrides) if overrides else saved
    out = Path(args.out or source / "eval-blobs")
    objective, manifest = build_objective(cfg.diffusion, model.cfg.patch_size), read_manifest(cfg.data.path)
    result = evaluate(cfg, model, objective, manifest, dev, args.per_direction, args.seed, args.guidance, out)
    print(f"{weights}: {4 * args.per_direction} clips per application, {cfg.diffusion.sample_steps} {cfg.diffusion.sampler} steps")
    print(format_table(result))
    report = {"weights": weights, "per_direction": args.per_direction, "results": result}
    if args.one_step:
        report["one_step_offsets"] = one_step_offsets(model, objective, manifest, make_cases(args.per_direction, args.seed), dev)
        print(format_offsets(report["one_step_offsets"]))
    (out / "results.json").write_text(json.dumps(report, indent=2))
