"""The blob measurements of ``sora-dist eval-blobs``: they read true motion off rendered clips,
a denoiser that knows each clip passes every threshold through the real sampling path (given
frames, per-frame timesteps, guidance), and an untrained DiT fails them."""

import numpy as np
import pytest
import torch

from sora_dist.applications import SYNTHETIC_TEXT_ENCODER
from sora_dist.config import ModelConfig, load_config, resolve_model_config
from sora_dist.data.synthetic import DIRECTIONS, TEXT_DIM, render
from sora_dist.diffusion import build_objective
from sora_dist.evaluate import CLIP_SHAPE, NOISE_LEVELS, centroids, colour_of, direction_of, make_cases, one_step_offsets, score, summarize
from sora_dist.models import VideoDiT
from sora_dist.sample import generate
from sora_dist import device as device_lib

# What a model that does the applications must reach (the README reports the measured values).
THRESHOLDS = {"direction_accuracy": 0.75, "speed": (0.5, 1.5), "off_path_px": 1.5, "colour_accuracy": 0.75}


def passes(result: dict) -> dict[str, bool]:
    checks = {}
    for application, r in result.items():
        ok = r["direction_accuracy"] >= THRESHOLDS["direction_accuracy"] and r["colour_accuracy"] >= THRESHOLDS["colour_accuracy"]
        low, high = THRESHOLDS["speed"]
        ok &= low <= r["speed_px_per_frame"] <= high
        if "off_path_px" in r:
            ok &= r["off_path_px"] <= THRESHOLDS["off_path_px"]
        checks[application] = bool(ok)
    return checks


def test_measurements_read_the_rendered_motion():
    for direction, (dy, dx) in DIRECTIONS.items():
        clip = render("cyan", "large", direction, CLIP_SHAPE, np.random.default_rng(1))
        track = centroids(clip.astype(np.float32))
        assert direction_of(track[-1] - track[0]) == direction
        np.testing.assert_allclose(np.diff(track, axis=0) @ np.array([dy, dx]), 1.0, atol=0.1)  # 1 latent pixel per frame
        assert colour_of(clip.astype(np.float32)) == "cyan"
    assert direction_of(np.array([np.nan, 1.0])) is None


class KnowsTheClip(torch.nn.Module):
    """A flow denoiser that knows the clean clips: v = (x_t - x0) / t on the generated frames."""

    def __init__(self, cfg, clean: torch.Tensor):
        super().__init__()
        self.cfg, self.clean = cfg, clean

    def forward(self, x, t, text, mask):
        clean = self.clean.repeat(x.shape[0] // len(self.clean), 1, 1, 1, 1)
        t = (t / 1000).view(x.shape[0], 1, -1, 1, 1) if t.dim() == 2 else (t / 1000).view(-1, 1, 1, 1, 1)
        return torch.where(t > 0, (x - clean) / t.clamp_min(1e-6), torch.zeros_like(x))


@pytest.fixture(scope="module")
def setup():
    cfg = load_config(overrides=["--diffusion.sample_steps=8", "--diffusion.guidance_scale=1.5"])
    model_cfg = resolve_model_config(ModelConfig(preset="debug", hidden_size=64, depth=2), in_channels=4, text_dim=TEXT_DIM)
    return cfg, model_cfg, build_objective(cfg.diffusion, model_cfg.patch_size), device_lib.detect("cpu")


def test_a_denoiser_that_knows_the_clips_passes_and_an_untrained_dit_fails(setup):
    cfg, model_cfg, objective, dev = setup
    text = np.zeros((3, TEXT_DIM), np.float32)
    cases = make_cases(per_direction=2, seed=5)
    cases = [c for c in cases if c.application != "text_to_video_unseen"]  # the oracle's clips are the truth, no text needed
    known, untrained = [], []
    torch.manual_seed(0)
    random_dit = VideoDiT(model_cfg)
    with torch.no_grad():
        for p in random_dit.parameters():
            p.normal_(0, 0.05)
    for i, case in enumerate(cases):
        oracle = KnowsTheClip(model_cfg, torch.from_numpy(case.truth))
        known.append(score(case, generate(cfg, oracle, objective, text, case.request(), 2, i, dev)))
        untrained.append(score(case, generate(cfg, random_dit, objective, text, case.request(), 2, i, dev)))
    assert all(passes(summarize(cases, known)).values()), summarize(cases, known)
    assert not any(passes(summarize(cases, untrained)).values()), summarize(cases, untrained)


class Manifest:
    """The one field of a dataset manifest that encode_prompt reads."""

    text_encoder = SYNTHETIC_TEXT_ENCODER


def test_one_step_offsets_are_zero_for_the_truth_and_lag_for_a_blob_that_stays_still(setup):
    cfg, model_cfg, objective, dev = setup
    case = next(c for c in make_cases(per_direction=2, seed=5) if c.application == "extend_forward")
    still = case.truth.copy()
    still[:, :, 4:] = still[:, :, 3:4]  # the last given frame repeated: no motion after it
    for clean, expected in ((case.truth, [0, 0, 0, 0]), (still, [-1, -2, -3, -4])):
        oracle = KnowsTheClip(model_cfg, torch.from_numpy(clean))
        offsets = one_step_offsets(oracle, objective, Manifest(), [case], dev)["extend_forward"]
        assert set(offsets) == set(NOISE_LEVELS)
        for row in offsets.values():
            np.testing.assert_allclose(row[:4], 0, atol=1e-6)  # given frames are the truth
            np.testing.assert_allclose(row[4:], expected, atol=0.35)


def test_one_step_offsets_of_text_to_video_noise_the_whole_clip(setup):
    cfg, model_cfg, objective, dev = setup
    case = next(c for c in make_cases(per_direction=2, seed=5) if c.application == "text_to_video")
    still = np.repeat(case.truth[:, :, :1], CLIP_SHAPE[0], axis=2)  # the first frame held: no motion at all
    for clean, expected in ((case.truth, np.zeros(CLIP_SHAPE[0])), (still, -np.arange(CLIP_SHAPE[0]))):
        oracle = KnowsTheClip(model_cfg, torch.from_numpy(clean))
        offsets = one_step_offsets(oracle, objective, Manifest(), [case], dev)["text_to_video"]
        for row in offsets.values():
            np.testing.assert_allclose(row, expected, atol=0.35)
