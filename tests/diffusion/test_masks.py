"""The mask strategy: which frames are given, that they are clean at timestep 0 and carry no
loss in both objectives, and that samplers hold them and run SDEdit's partial schedules."""

import pytest
import torch

from sora_dist.config import ConfigError, DiffusionConfig, MaskConfig, load_config
from sora_dist.diffusion import build_objective, sample
from sora_dist.diffusion.masks import FrameCondition, draw_given

ALL_CHOICES = MaskConfig(image_to_video=0.2, extend_forward=0.2, extend_backward=0.2, connect=0.2, random_frames=0.1)


def test_each_choice_gives_its_frames_at_its_rate():
    given = draw_given(ALL_CHOICES, 20_000, 8, torch.Generator().manual_seed(0), torch.device("cpu"))
    count = given.sum(1)
    assert (count < 8).all(), "every sample keeps at least one frame to generate"
    runs = torch.diff(given.int(), dim=1).ne(0).sum(1)  # changes between given and generated
    first, last = given[:, 0], given[:, -1]
    rate = lambda rows: rows.float().mean().item()
    # Random frames (0.1) look like the structured choices now and then; the tolerances allow it.
    assert rate(count == 0) == pytest.approx(0.1, abs=0.01)  # text-to-video
    assert rate(first & ~last & (runs == 1)) == pytest.approx(0.2 + 0.2, abs=0.03)  # image-to-video, extend forward
    assert rate(first & (count == 1)) == pytest.approx(0.2 + 0.2 / 4, abs=0.02)  # k = 1 in a quarter of extensions
    assert rate(~first & last & (runs == 1)) == pytest.approx(0.2, abs=0.03)  # extend backward
    assert rate(first & last & (runs == 2)) == pytest.approx(0.2, abs=0.03)  # connect
    # k <= max_given_fraction * 8 = 4 (a random-frames draw shaped like a longer prefix is rare)
    assert rate(count[first & ~last & (runs == 1)] <= 4) > 0.99


def test_images_are_never_masked_and_draws_repeat_with_the_seed():
    images = draw_given(ALL_CHOICES, 64, 1, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert not images.any()
    a, b = (draw_given(ALL_CHOICES, 64, 6, torch.Generator().manual_seed(5), torch.device("cpu")) for _ in range(2))
    assert torch.equal(a, b)


class Recorder:
    """A denoiser that remembers its inputs; its output depends on x and t."""

    def __init__(self, offset_on_given=0.0):
        self.offset_on_given = offset_on_given

    def __call__(self, x, t, text, mask):
        self.x, self.t = x.clone(), t.clone()
        out = torch.tanh(x) * 0.5 + 0.001 * t.mean()
        if t.dim() == 2:  # something absurd on the frames seen at timestep 0
            out = out + self.offset_on_given * (t == 0)[:, None, :, None, None]
        return out


@pytest.mark.parametrize("objective_name", ["flow", "ddpm"])
def test_given_frames_are_clean_at_timestep_zero_and_out_of_the_loss(objective_name):
    mask_cfg = MaskConfig(extend_forward=0.5, extend_backward=0.5)
    objective = build_objective(DiffusionConfig(objective=objective_name, caption_dropout=0.0, sampler="euler" if objective_name == "flow" else "ddpm"),
                                (1, 2, 2), mask_cfg)
    x0 = torch.randn(16, 4, 6, 4, 4, generator=torch.Generator().manual_seed(1))
    text, text_mask = torch.zeros(16, 2, 8), torch.ones(16, 2, dtype=torch.bool)
    plain, absurd = Recorder(), Recorder(offset_on_given=1000.0)
    loss = objective.loss(plain, x0, text, text_mask, torch.Generator().manual_seed(2))
    loss_absurd = objective.loss(absurd, x0, text, text_mask, torch.Generator().manual_seed(2))
    torch.testing.assert_close(loss, loss_absurd)  # nothing on the given frames reaches the loss
    given = plain.t == 0  # (B, T')
    assert plain.t.shape == (16, 6) and given.any(1).all() and (~given).any(1).all()
    for i in range(16):
        torch.testing.assert_close(plain.x[i][:, given[i]], x0[i][:, given[i]], rtol=0, atol=0)
        assert (plain.x[i][:, ~given[i]] - x0[i][:, ~given[i]]).abs().mean() > 0.01


def test_off_means_one_timestep_per_sample():
    objective = build_objective(DiffusionConfig(caption_dropout=0.0), (1, 2, 2))
    recorder = Recorder()
    objective.loss(recorder, torch.randn(3, 4, 5, 4, 4), torch.zeros(3, 2, 8), torch.ones(3, 2, dtype=torch.bool))
    assert recorder.t.shape == (3,)


@pytest.mark.parametrize("sampler, objective_name", [("euler", "flow"), ("ddim", "ddpm"), ("ddpm", "ddpm")])
def test_samplers_hold_the_given_frames(sampler, objective_name):
    objective = build_objective(DiffusionConfig(objective=objective_name, sampler=sampler, num_timesteps=50), (1, 2, 2))
    clean = torch.randn(2, 4, 5, 4, 4)
    given = torch.tensor([[True, False, False, False, False], [False, False, False, True, True]])
    seen = []

    def denoise(x, t):
        seen.append(t.clone())
        return torch.tanh(x)

    out = sample(objective, sampler, denoise, torch.randn(2, 4, 5, 4, 4), steps=6, generator=torch.Generator().manual_seed(0),
                 condition=FrameCondition(clean, given, patch_t=1))
    assert torch.equal(out[:, :, 0][0], clean[0, :, 0]) and torch.equal(out[1, :, 3:], clean[1, :, 3:])
    assert all((t[given] == 0).all() for t in seen) and (seen[0][~given] > 0).all()


@pytest.mark.parametrize("sampler, objective_name", [("euler", "flow"), ("ddim", "ddpm"), ("ddpm", "ddpm")])
def test_edit_runs_the_last_part_of_the_schedule(sampler, objective_name):
    objective = build_objective(DiffusionConfig(objective=objective_name, sampler=sampler, num_timesteps=40), (1, 1, 1))
    calls = []

    def denoise(x, t):
        calls.append(float(t.flatten()[0]))
        return torch.zeros_like(x)

    init, noise = torch.ones(1, 1, 2, 2, 2), torch.randn(1, 1, 2, 2, 2)
    sample(objective, sampler, denoise, noise, steps=10)
    full = len(calls)
    calls.clear()
    sample(objective, sampler, denoise, noise, steps=10, init=init, strength=0.3)
    assert len(calls) == round(0.3 * full)
    assert max(calls) < 0.5 * (1000 if objective_name == "flow" else 40)


def test_mask_probabilities_are_checked():
    with pytest.raises(ConfigError, match="add up to 1.2"):
        load_config(overrides=["--mask.image_to_video=0.6", "--mask.connect=0.6"])
    with pytest.raises(ConfigError, match="max_given_fraction"):
        load_config(overrides=["--mask.max_given_fraction=1.0"])
