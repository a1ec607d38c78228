"""The diffusion math against closed forms: data x0 ~ N(mu, s^2) has an exactly known optimal
denoiser at every noise level, so samplers driven by it must recover mu and s, and the training
losses must equal the known conditional variances."""

import math

import pytest
import torch

from sora_dist.config import DiffusionConfig
from sora_dist.diffusion import (
    DDPMObjective,
    DDPMSchedule,
    FlowObjective,
    ddim_sample,
    ddpm_sample,
    drop_captions,
    euler_sample,
    guided,
    shift_time,
)

MU, STD = 0.7, 0.3
N = 20000


def ddpm_exact(schedule, prediction):
    """E[eps | x_t] (or E[v | x_t]) for Gaussian data, as a model(x, t, text, mask)."""

    def model(x, t, text=None, mask=None):
        ab = schedule.alphas_cumprod[t.long()].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        a, b = ab.sqrt(), (1 - ab).sqrt()
        var = a**2 * STD**2 + b**2
        eps = b * (x - a * MU) / var
        if prediction == "eps":
            return eps
        x0 = MU + a * STD**2 * (x - a * MU) / var
        return a * eps - b * x0

    return model


def flow_exact(x, t_model, text=None, mask=None):
    """E[noise - x0 | x_t] for x_t = (1 - t) x0 + t noise."""
    t = (t_model / 1000).view(-1, *([1] * (x.dim() - 1)))
    var = (1 - t) ** 2 * STD**2 + t**2
    centred = x - (1 - t) * MU
    return t * centred / var - (MU + (1 - t) * STD**2 * centred / var)


def noise(seed=0):
    return torch.randn(N, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_recovers(x):
    assert abs(x.mean().item() - MU) < 0.02, x.mean().item()
    assert abs(x.std().item() - STD) / STD < 0.05, x.std().item()


def test_linear_schedule_matches_ho_et_al():
    s = DDPMSchedule("linear", 1000)
    assert s.betas[0].item() == pytest.approx(1e-4)
    assert s.betas[-1].item() == pytest.approx(0.02)
    # Ho et al.'s linear schedule ends at alpha_bar_T ~ 4.0e-5 (SNR ~ 1e-5: data fully destroyed).
    assert s.alphas_cumprod[-1].item() == pytest.approx(4.04e-5, rel=0.02)


def test_cosine_schedule_follows_closed_form():
    n, s_off = 1000, 0.008
    s = DDPMSchedule("cosine", n)
    f = lambda t: math.cos((t / n + s_off) / (1 + s_off) * math.pi / 2) ** 2
    for t in (0, 100, 500, 900):
        assert s.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-6)
    assert s.betas.max().item() <= 0.999


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddpm_ancestral_recovers_data(kind, prediction):
    schedule = DDPMSchedule(kind, 1000)
    objective = DDPMObjective(schedule, prediction, caption_dropout=0.0)
    x = ddpm_sample(objective, ddpm_exact(schedule, prediction), noise(), generator=torch.Generator().manual_seed(1))
    assert_recovers(x)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_recovers_data(prediction):
    schedule = DDPMSchedule("linear", 1000)
    objective = DDPMObjective(schedule, prediction, caption_dropout=0.0)
    assert_recovers(ddim_sample(objective, ddpm_exact(schedule, prediction), noise(), steps=100))


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_flow_recovers_data(shift):
    objective = FlowObjective(DiffusionConfig(shift=shift), (1, 1, 1))
    assert_recovers(euler_sample(objective, flow_exact, noise(), steps=100))


def test_ddpm_loss_of_exact_denoiser_is_conditional_variance():
    schedule = DDPMSchedule("linear", 1000)
    objective = DDPMObjective(schedule, "eps", caption_dropout=0.0)
    x0 = MU + STD * torch.randn(200_000, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mask = torch.ones(x0.shape[0], 1, dtype=torch.bool)
    loss = objective.loss(ddpm_exact(schedule, "eps"), x0, None, mask, torch.Generator().manual_seed(3)).mean()
    ab = schedule.alphas_cumprod
    expected = (ab * STD**2 / (ab * STD**2 + 1 - ab)).mean()  # Var(eps | x_t), averaged over t
    assert loss.item() == pytest.approx(expected.item(), rel=0.02)
    # A denoiser that ignores x_t can do no better than Var(eps) = 1.
    blind = objective.loss(lambda x, t, c, m: torch.zeros_like(x), x0, None, mask, torch.Generator().manual_seed(3))
    assert blind.mean().item() == pytest.approx(1.0, rel=0.02)


def test_flow_loss_of_exact_denoiser_is_conditional_variance():
    cfg = DiffusionConfig(shift=2.0, logit_normal_mean=0.0, logit_normal_std=1.0, caption_dropout=0.0)
    objective = FlowObjective(cfg, (1, 1, 1))
    x0 = MU + STD * torch.randn(200_000, 1, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    mask = torch.ones(x0.shape[0], 1, dtype=torch.bool)
    loss = objective.loss(flow_exact, x0, None, mask, torch.Generator().manual_seed(5)).mean()
    # Var(noise - x0 | x_t) integrated over the shifted logit-normal law of t by quadrature.
    z = torch.linspace(-8, 8, 4001, dtype=torch.float64)
    weights = torch.exp(-z**2 / 2)
    weights /= weights.sum()
    t = shift_time(torch.sigmoid(z), 2.0)
    var = (1 - t) ** 2 * STD**2 + t**2
    cond_var = 1 + STD**2 - (t - (1 - t) * STD**2) ** 2 / var
    assert loss.item() == pytest.approx((weights * cond_var).sum().item(), rel=0.02)


def test_caption_dropout_drops_whole_captions_at_the_given_rate():
    mask = torch.ones(10_000, 7, dtype=torch.bool)
    dropped = drop_captions(mask, 0.25, torch.Generator().manual_seed(0))
    rows = dropped.any(dim=1)
    assert (dropped.all(dim=1) == rows).all()  # a caption is kept or dropped whole
    assert (1 - rows.float().mean()).item() == pytest.approx(0.25, abs=0.02)
    assert drop_captions(mask, 0.0, None) is mask


def test_classifier_free_guidance_extrapolates_from_unconditional():
    # A model whose output depends on whether any caption token is visible.
    def model(x, t, text, mask):
        return x + mask.any(dim=1).to(x.dtype).view(-1, 1) * 2.0

    x, t = torch.randn(3, 1), torch.zeros(3)
    text, mask = torch.zeros(3, 2, 1), torch.ones(3, 2, dtype=torch.bool)
    out = guided(model, text, mask, scale=4.0)(x, t)
    # uncond = x, cond = x + 2: guided = x + 4 * 2
    torch.testing.assert_close(out, x + 8.0)
    torch.testing.assert_close(guided(model, text, mask, scale=1.0)(x, t), x + 2.0)


@pytest.mark.parametrize("timestep_range", [(875.0, 1000.0), (0.0, 875.0), (300.0, 600.0)])
def test_an_experts_timesteps_follow_the_training_law_truncated_to_its_range(timestep_range):
    """One expert of a two-expert model trains on its range with the same law as the whole model
    restricted to it: the truncated draw against draws of the full law that fell in the range."""
    import numpy as np

    from sora_dist.config import DiffusionConfig
    from sora_dist.diffusion.objectives import FlowObjective

    low, high = timestep_range[0] / 1000, timestep_range[1] / 1000
    expert = FlowObjective(DiffusionConfig(shift=12.0, timestep_range=timestep_range), (1, 2, 2))
    t = expert.sample_t(200_000, 12.0, "cpu", torch.Generator().manual_seed(0)).numpy()
    everything = FlowObjective(DiffusionConfig(shift=12.0), (1, 2, 2)).sample_t(800_000, 12.0, "cpu", torch.Generator().manual_seed(1)).numpy()
    inside = everything[(everything >= low) & (everything <= high)]
    assert low <= t.min() and t.max() <= high
    quantiles = [0.05, 0.25, 0.5, 0.75, 0.95]
    np.testing.assert_allclose(np.quantile(t, quantiles), np.quantile(inside, quantiles), atol=0.004 * (high - low) / 0.125)
