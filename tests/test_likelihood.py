"""Variational bound in bits/dim, checked against closed forms for Gaussian data and an exact model."""
import math

import pytest
import torch

from ldm.modules.diffusionmodules.likelihood import (
    approx_standard_normal_cdf, discretized_gaussian_log_likelihood, prior_bpd, variational_bound,
)
from ldm.modules.diffusionmodules.denoiser import make_prediction
from ldm.modules.diffusionmodules.schedule import NoiseSchedule, extract, make_beta_schedule

T = 100
DATA_STD = 0.5
LN2 = math.log(2.0)
PARAMETERIZATIONS = ("eps", "x0", "v")


def gaussian_schedule(dtype=torch.float64):
    return NoiseSchedule(make_beta_schedule("cosine", T), dtype=dtype)


def exact_model(schedule, parameterization):
    """For data N(0, s² I): the Bayes-optimal output, from x̂_0 = E[x_0 | x_t] = √ᾱ s² / (ᾱ s² + 1 − ᾱ) · x_t."""
    def model_fn(x_t, t):
        a_bar = extract(schedule.alphas_cumprod, t, x_t.shape)
        x0_hat = a_bar.sqrt() * DATA_STD ** 2 / (a_bar * DATA_STD ** 2 + 1 - a_bar) * x_t
        return make_prediction(parameterization).output_from_x0(x0_hat, x_t, *schedule.coefficients(t))
    return model_fn


def posterior_variance_of_x0(a_bar):
    """Var(x_0 | x_t) for x_0 ~ N(0, s²) and x_t = √ᾱ x_0 + √(1−ᾱ) ε."""
    return DATA_STD ** 2 * (1 - a_bar) / (a_bar * DATA_STD ** 2 + 1 - a_bar)


@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_bound_of_exact_model_on_gaussian_data(parameterization):
    schedule = gaussian_schedule()
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(1)  # the bound draws a fresh ε per timestep (a seed unlike x0's)
    x0 = DATA_STD * torch.randn(512, 8, generator=g, dtype=torch.float64)
    out = variational_bound(exact_model(schedule, parameterization), schedule, x0, parameterization,
                            discretized=False)
    assert out["terms_bpd"].shape == (512, T - 1)
    for key in ("total_bpd", "prior_bpd", "vb_bpd", "decoder_bpd"):
        assert out[key].shape == (512,)
    # KL terms are non-negative sample by sample (the continuous decoder is a density and may be < 0).
    assert bool((out["terms_bpd"] >= 0).all()) and bool((out["prior_bpd"] >= 0).all())
    torch.testing.assert_close(out["vb_bpd"], out["terms_bpd"].sum(1))
    torch.testing.assert_close(out["total_bpd"], out["prior_bpd"] + out["vb_bpd"] + out["decoder_bpd"])

    # Closed-form expectations: model and posterior means differ by coef1·(x_0 − E[x_0|x_t]), equal variances.
    a_bar = schedule.alphas_cumprod
    var = schedule.posterior_variance
    expected_terms = (schedule.posterior_mean_coef1 ** 2 * posterior_variance_of_x0(a_bar) / (2 * var))[1:] / LN2
    torch.testing.assert_close(out["terms_bpd"].mean(0), expected_terms, rtol=0.12, atol=1e-12)
    torch.testing.assert_close(out["vb_bpd"].mean(), expected_terms.sum(), rtol=0.02, atol=0)
    expected_decoder = (0.5 * torch.log(2 * math.pi * var[1]) + posterior_variance_of_x0(a_bar[0]) / (2 * var[1])) / LN2
    torch.testing.assert_close(out["decoder_bpd"].mean(), expected_decoder, rtol=0.002, atol=0)

    # A valid bound: E[total] ≥ the true NLL of N(0, s² I), ½ log(2πe s²) per dim, by many standard errors.
    true_nll_bpd = 0.5 * math.log(2 * math.pi * math.e * DATA_STD ** 2) / LN2
    total = out["total_bpd"]
    standard_error = total.std() / math.sqrt(total.numel())
    assert total.mean() - true_nll_bpd > 5 * standard_error
    assert (expected_terms.sum() + expected_decoder + out["prior_bpd"].mean()) > true_nll_bpd


def test_prior_matches_closed_form_kl():
    schedule = gaussian_schedule()
    x0 = torch.randn(5, 3, 4, dtype=torch.float64)
    a_bar = schedule.alphas_cumprod[-1]
    kl = 0.5 * (-torch.log(1 - a_bar) + (1 - a_bar) + a_bar * x0 ** 2 - 1)
    torch.testing.assert_close(prior_bpd(schedule, x0), kl.flatten(1).mean(1) / LN2, rtol=1e-12, atol=1e-15)


def test_discretized_likelihood_is_a_distribution_over_256_bins():
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    means = torch.tensor([-1.2, -0.99, -0.3, 0.0, 0.5, 1.0], dtype=torch.float64)
    log_scales = torch.log(torch.tensor([1e-3, 5e-3, 0.05, 0.3, 1.0, 2.0], dtype=torch.float64))
    x, mu, ls = torch.broadcast_tensors(bins[:, None], means[None], log_scales[None])
    probs = discretized_gaussian_log_likelihood(x, mu, ls).exp()
    torch.testing.assert_close(probs.sum(0), torch.ones(6, dtype=torch.float64), rtol=0, atol=1e-9)
    # Each bin holds the Gaussian mass between its edges (up to the tanh approximation of Φ).
    std = ls.exp()
    upper = torch.where(x > 1 - 1e-6, torch.ones_like(x), torch.special.ndtr((x + 1 / 255 - mu) / std))
    lower = torch.where(x < -1 + 1e-6, torch.zeros_like(x), torch.special.ndtr((x - 1 / 255 - mu) / std))
    torch.testing.assert_close(probs, upper - lower, rtol=0, atol=5e-4)


def test_approx_cdf_is_close_to_exact():
    z = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    assert (approx_standard_normal_cdf(z) - torch.special.ndtr(z)).abs().max() < 3e-4


def test_discretized_bound_terms_are_non_negative_and_decoder_is_the_bin_nll():
    schedule = gaussian_schedule(torch.float32)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, 256, (4, 3, 4, 4), generator=g).float() / 127.5 - 1
    noise = torch.randn(x0.shape, generator=g)
    model_fn = exact_model(schedule, "eps")
    out = variational_bound(model_fn, schedule, x0, "eps", discretized=True, noise=noise)
    for key in ("prior_bpd", "terms_bpd", "decoder_bpd"):
        assert bool((out[key] >= 0).all()), key
    t0 = torch.zeros(4, dtype=torch.long)
    x_1 = schedule.q_sample(x0, t0, noise)
    x0_hat = make_prediction("eps").x0(model_fn(x_1, t0), x_1, *schedule.coefficients(t0))
    log_scales = torch.full_like(x0, 0.5 * schedule.posterior_log_variance_clipped[1].item())
    nll = -discretized_gaussian_log_likelihood(x0, x0_hat, log_scales).flatten(1).mean(1) / LN2
    torch.testing.assert_close(out["decoder_bpd"], nll)
    # float32 and float64 agree (dtype agnostic).
    out64 = variational_bound(exact_model(gaussian_schedule(), "eps"), gaussian_schedule(), x0.double(), "eps",
                              discretized=True, noise=noise.double())
    torch.testing.assert_close(out["total_bpd"].double(), out64["total_bpd"], rtol=1e-4, atol=1e-4)


def test_timestep_subsets_estimate_the_full_sum_unbiasedly():
    schedule = gaussian_schedule()
    g = torch.Generator().manual_seed(2)
    x0 = DATA_STD * torch.randn(3, 6, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    model_fn = exact_model(schedule, "x0")

    def bound(timesteps):
        return variational_bound(model_fn, schedule, x0, "x0", discretized=False, timesteps=timesteps, noise=noise)

    full = bound(None)
    every = bound(list(range(1, T)))
    for key in full:
        torch.testing.assert_close(every[key], full[key], rtol=0, atol=0)

    subset = [3, 50, 97]
    part = bound(subset)
    torch.testing.assert_close(part["terms_bpd"], full["terms_bpd"][:, [t - 1 for t in subset]])
    torch.testing.assert_close(part["vb_bpd"], part["terms_bpd"].sum(1) * (T - 1) / 3)
    for key in ("prior_bpd", "decoder_bpd"):  # always exact, never subsampled
        torch.testing.assert_close(part[key], full[key])

    # Exact unbiasedness: the 9 blocks of a random partition of 1..99 cover every t once, so the
    # mean of their scaled estimates is the full sum.
    order = (torch.randperm(T - 1, generator=g) + 1).view(9, 11)
    block_estimates = torch.stack([bound(block.tolist())["vb_bpd"] for block in order])
    torch.testing.assert_close(block_estimates.mean(0), full["vb_bpd"], rtol=1e-12, atol=0)
    # And over independent random subsets, the mean converges to the full sum.
    draws = torch.stack([bound((torch.randperm(T - 1, generator=g)[:8] + 1).tolist())["vb_bpd"]
                         for _ in range(150)])
    standard_error = draws.std(0) / math.sqrt(150)
    assert bool(((draws.mean(0) - full["vb_bpd"]).abs() < 4 * standard_error).all())


def test_bad_arguments():
    schedule = gaussian_schedule()
    x0 = torch.zeros(2, 4, dtype=torch.float64)
    model_fn = exact_model(schedule, "eps")
    for timesteps in ([0, 5], [T], []):
        with pytest.raises(ValueError, match="timesteps"):
            variational_bound(model_fn, schedule, x0, "eps", discretized=False, timesteps=timesteps)
    with pytest.raises(ValueError, match="noise must have x0's shape"):
        variational_bound(model_fn, schedule, x0, "eps", discretized=False, noise=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="unknown parameterization"):
        variational_bound(model_fn, schedule, x0, "mu", discretized=False)
    with pytest.raises(ValueError, match=r"8-bit data scaled to \[-1, 1\]"):
        variational_bound(model_fn, schedule, x0 + 2, "eps", discretized=True)
    with pytest.raises(ValueError, match="one shape"):
        discretized_gaussian_log_likelihood(x0, x0[:, :2], x0)
