"""Parameterization conversions, the simple losses, the VLB weights (derived from the KL) and logvar reweighting."""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from ldm.modules.diffusionmodules.likelihood import normal_kl
from ldm.modules.diffusionmodules.objectives import elementwise_loss, reweight_by_logvar, vlb_weights
from ldm.modules.diffusionmodules.denoiser import PREDICTIONS, make_prediction
from ldm.modules.diffusionmodules.schedule import NoiseSchedule, extract, make_beta_schedule

T = 200
PARAMETERIZATIONS = tuple(PREDICTIONS)


def sample_problem(dtype=torch.float64, seed=0):
    schedule = NoiseSchedule(make_beta_schedule("linear", T), dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(6, 2, 3, 3, generator=g, dtype=dtype)
    eps = torch.randn(6, 2, 3, 3, generator=g, dtype=dtype)
    t = torch.tensor([1, 2, 20, 100, 150, T - 1])
    return schedule, x0, eps, t, schedule.q_sample(x0, t, eps)


@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_target_converts_back_to_x0_and_eps(parameterization):
    schedule, x0, eps, t, x_t = sample_problem()
    prediction, coefficients = make_prediction(parameterization), schedule.coefficients(t)
    target = prediction.target(x0, eps, *coefficients)
    v = extract(schedule.sqrt_alphas_cumprod, t, x0.shape) * eps - extract(schedule.sqrt_one_minus_alphas_cumprod, t,
                                                                            x0.shape) * x0
    expected = {"eps": eps, "x0": x0, "v": v, "flow": eps - x0}.get(parameterization)
    if expected is not None:
        torch.testing.assert_close(target, expected, rtol=0, atol=1e-15)
    tol = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(prediction.x0(target, x_t, *coefficients), x0, **tol)
    torch.testing.assert_close(prediction.eps(target, x_t, *coefficients), eps, **tol)


@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_output_from_x0_inverts_x0(parameterization):
    schedule, x0, eps, t, x_t = sample_problem()
    prediction, coefficients = make_prediction(parameterization), schedule.coefficients(t)
    output = torch.randn_like(x0)  # any model output, not only a consistent one
    x0_hat = prediction.x0(output, x_t, *coefficients)
    eps_hat = prediction.eps(output, x_t, *coefficients)
    torch.testing.assert_close(prediction.output_from_x0(x0_hat, x_t, *coefficients), output, rtol=1e-9, atol=1e-9)
    # The pair is consistent with x_t: it satisfies the forward process equation (DDPM eq. 4).
    torch.testing.assert_close(schedule.q_sample(x0_hat, t, eps_hat), x_t, rtol=1e-10, atol=1e-10)


def test_parameterization_errors():
    with pytest.raises(ValueError, match="unknown parameterization 'mu'; choose one of 'eps', 'x0', 'v', 'flow', 'edm'"):
        make_prediction("mu")


def test_elementwise_loss():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    torch.testing.assert_close(elementwise_loss(pred, target, "l1"), (pred - target).abs())
    torch.testing.assert_close(elementwise_loss(pred, target, "l2"), (pred - target) ** 2)
    with pytest.raises(ValueError, match="unknown loss_type 'huber'; choose one of l1, l2"):
        elementwise_loss(pred, target, "huber")
    with pytest.raises(ValueError, match="shapes differ"):
        elementwise_loss(pred, target[:, :1], "l2")


def paper_kl(betas, x0, eps, t, delta, parameterization):
    """KL(q(x_{t-1}|x_t,x_0) || p_θ(x_{t-1}|x_t)) summed over elements, written straight from DDPM / S&H.

    Uses only float64 β (not the schedule's buffers): ᾱ_t = Π(1 − β), posterior mean eq. 7, the ε-model
    mean of eq. 11, x̂_0 = √ᾱ x_t − √(1−ᾱ) v̂ (Salimans & Ho 2022), σ_t² = β̃_t of eq. 7.
    """
    betas = torch.from_numpy(betas)
    ac = torch.cumprod(1 - betas, 0)
    ac_prev = torch.cat([torch.ones(1, dtype=ac.dtype), ac[:-1]])
    view = (-1,) + (1,) * (x0.dim() - 1)
    beta, a_bar, a_bar_prev = (v[t].view(view) for v in (betas, ac, ac_prev))
    alpha = 1 - beta
    x_t = a_bar.sqrt() * x0 + (1 - a_bar).sqrt() * eps

    def posterior_mean(x0_):
        return a_bar_prev.sqrt() * beta / (1 - a_bar) * x0_ + alpha.sqrt() * (1 - a_bar_prev) / (1 - a_bar) * x_t

    if parameterization == "eps":
        model_mean = (x_t - beta / (1 - a_bar).sqrt() * (eps + delta)) / alpha.sqrt()
    elif parameterization == "x0":
        model_mean = posterior_mean(x0 + delta)
    else:
        v = a_bar.sqrt() * eps - (1 - a_bar).sqrt() * x0
        model_mean = posterior_mean(a_bar.sqrt() * x_t - (1 - a_bar).sqrt() * (v + delta))
    log_sigma2 = ((1 - a_bar_prev) / (1 - a_bar) * beta).log()
    kl = normal_kl(posterior_mean(x0), log_sigma2, model_mean, log_sigma2)
    return kl.flatten(1).sum(1)


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_vlb_weights_equal_the_kl_per_squared_error(parameterization):
    betas = make_beta_schedule("cosine", T)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(64, 2, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(64, 2, 4, generator=g, dtype=torch.float64)
    delta = 0.1 * torch.randn(64, 2, 4, generator=g, dtype=torch.float64)
    t = torch.randint(1, T, (64,), generator=g)
    kl = paper_kl(betas, x0, eps, t, delta, parameterization)
    squared_error = (delta ** 2).flatten(1).sum(1)
    for dtype, rtol in ((torch.float64, 1e-9), (torch.float32, 2e-6)):
        weights = vlb_weights(NoiseSchedule(betas, dtype=dtype), parameterization)
        assert weights.dtype == dtype and weights.shape == (T,)
        torch.testing.assert_close(weights.double()[t] * squared_error, kl, rtol=rtol, atol=0)
        assert weights[0] == weights[1]


def test_reference_x0_weight_has_a_precedence_bug():
    schedule = NoiseSchedule(make_beta_schedule("linear", T))
    ac = schedule.alphas_cumprod
    reference_x0 = 0.5 * torch.sqrt(ac) / (2.0 * 1 - ac)  # latent-diffusion ddpm.py, verbatim
    ours = vlb_weights(schedule, "x0")
    # Not a rounding difference: the buggy weight is O(1) at every t; the true one spans orders of magnitude.
    ratio = (reference_x0 / ours)[1:]
    assert ratio.min() < 0.01 and ratio.max() > 10


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_eps_weights_match_reference_lvlb_weights(reference_dir, name):
    with safe_open(str(reference_dir / f"schedule_{name}.safetensors"), "pt") as f:
        config = json.loads(f.metadata()["config"])
        reference = f.get_tensor("lvlb_weights").double()
    schedule = NoiseSchedule.from_config(**config)
    ours = vlb_weights(schedule, "eps").double()
    # The reference forms 1 − ᾱ_t from float32 ᾱ_t: its relative error is up to 2⁻²⁵/(1 − ᾱ_t), which
    # exceeds 1e-5 for the first cosine steps (β ≈ 4e-5). Ours avoids that cancellation.
    cancellation = 2.0 ** -24 / (1 - schedule.alphas_cumprod.double())
    relative = ((ours - reference) / reference).abs()
    assert bool((relative <= 1e-5 + cancellation).all()), relative.max()
    if name == "linear":  # β ≥ 8.5e-4, so the reference's cancellation stays below 1e-5
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=0)
    # ...and stays within float32 rounding of the weights of a schedule kept in float64 throughout.
    betas = make_beta_schedule(config["beta_schedule"], config["timesteps"], config["linear_start"],
                               config["linear_end"], config["cosine_s"])
    exact = vlb_weights(NoiseSchedule(betas, dtype=torch.float64), "eps")
    torch.testing.assert_close(ours, exact, rtol=1e-6, atol=0)


def test_vlb_weights_errors():
    with pytest.raises(ValueError, match="unknown parameterization"):
        vlb_weights(NoiseSchedule(make_beta_schedule("linear", 10)), "mu")
    with pytest.raises(ValueError, match="at least 2 timesteps"):
        vlb_weights(NoiseSchedule(np.array([0.1])), "eps")


def test_reweight_by_logvar():
    loss = torch.tensor([0.5, 2.0, 0.01])
    logvar = torch.tensor([0.0, 1.0, -3.0], requires_grad=True)
    out = reweight_by_logvar(loss, logvar)
    torch.testing.assert_close(out, loss / logvar.exp() + logvar)
    torch.testing.assert_close(reweight_by_logvar(loss, torch.zeros(3)), loss)
    # Stationary (and minimal) at logvar = log(loss): the learned scale tracks the loss of each timestep.
    at_optimum = torch.log(loss).requires_grad_(True)
    reweight_by_logvar(loss, at_optimum).sum().backward()
    torch.testing.assert_close(at_optimum.grad, torch.zeros(3), rtol=0, atol=1e-6)
