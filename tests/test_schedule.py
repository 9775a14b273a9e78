"""NoiseSchedule and make_beta_schedule: reference buffers, formulas, validation and exact conversions."""
import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open

from ldm.modules.diffusionmodules.denoiser import make_prediction
from ldm.modules.diffusionmodules.schedule import NoiseSchedule, extract, make_beta_schedule


def load_fixture(reference_dir, name):
    with safe_open(str(reference_dir / f"schedule_{name}.safetensors"), "pt") as f:
        return json.loads(f.metadata()["config"]), {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_buffers_match_reference(reference_dir, name):
    config, fixture = load_fixture(reference_dir, name)
    schedule = NoiseSchedule.from_config(**config)
    assert schedule.num_timesteps == 1000
    assert list(schedule.state_dict()) == list(NoiseSchedule.BUFFER_NAMES)
    for key in NoiseSchedule.BUFFER_NAMES:
        ours = schedule.state_dict()[key]
        assert ours.dtype == torch.float32
        # float64 math cast once to float32 reproduces the reference bit for bit (README section 4).
        torch.testing.assert_close(ours, fixture[key], rtol=1e-6, atol=0, msg=key)
        assert torch.equal(ours, fixture[key]), key
    assert schedule.posterior_log_variance_clipped[0] == torch.tensor(math.log(1e-20), dtype=torch.float32)
    betas = make_beta_schedule(config["beta_schedule"], 1000, config["linear_start"], config["linear_end"],
                               config["cosine_s"])
    assert betas.dtype == np.float64
    # Up to 1 ulp of 1.0 in β = 1 − ᾱ_t/ᾱ_{t−1}: the reference ran float64 cos on another CPU, and
    # vectorised libm implementations differ in the last bit.
    np.testing.assert_allclose(betas, fixture["betas_float64"].numpy(), rtol=0, atol=4e-16)
    np.testing.assert_allclose(np.cumprod(1 - betas), fixture["alphas_cumprod_float64"].numpy(), rtol=1e-14)


def test_linear_is_linear_in_sqrt_beta_and_other_schedules_match_their_formulas():
    start, end, n = 1e-4, 2e-2, 200
    linear = make_beta_schedule("linear", n, start, end)
    np.testing.assert_allclose(np.diff(np.sqrt(linear)), (end ** 0.5 - start ** 0.5) / (n - 1), rtol=1e-9)
    np.testing.assert_allclose(linear[[0, -1]], [start, end], rtol=1e-12)
    np.testing.assert_allclose(make_beta_schedule("sqrt_linear", n, start, end), np.linspace(start, end, n),
                               rtol=1e-12)
    np.testing.assert_allclose(make_beta_schedule("sqrt", n, start, end), np.sqrt(np.linspace(start, end, n)),
                               rtol=1e-12)
    s = 8e-3
    cosine = make_beta_schedule("cosine", n, cosine_s=s)
    f = np.cos((np.arange(n + 1) / n + s) / (1 + s) * np.pi / 2) ** 2
    np.testing.assert_allclose(np.cumprod(1 - cosine)[:-1], (f / f[0])[1:n], rtol=1e-10)
    assert cosine.max() == pytest.approx(0.999)  # the last step is clipped


def test_derived_buffers_follow_ddpm_formulas():
    betas = make_beta_schedule("cosine", 100)
    schedule = NoiseSchedule(betas, dtype=torch.float64)
    ac = np.cumprod(1 - betas)
    ac_prev = np.append(1.0, ac[:-1])
    buffers = {k: v.numpy() for k, v in schedule.state_dict().items()}
    np.testing.assert_allclose(buffers["alphas_cumprod_prev"], ac_prev)
    np.testing.assert_allclose(buffers["sqrt_recipm1_alphas_cumprod"], np.sqrt((1 - ac) / ac), rtol=1e-12)
    # Eq. 7's β̃ is the precision-weighted combination of prior q(x_{t-1}|x_0) and likelihood q(x_t|x_{t-1}).
    posterior_precision = 1 / (1 - ac_prev[1:]) + (1 - betas[1:]) / betas[1:]
    np.testing.assert_allclose(buffers["posterior_variance"][1:], 1 / posterior_precision, rtol=1e-10)
    assert buffers["posterior_variance"][0] == 0
    np.testing.assert_allclose(buffers["posterior_mean_coef1"], betas * np.sqrt(ac_prev) / (1 - ac), rtol=1e-12)
    np.testing.assert_allclose(buffers["posterior_mean_coef2"], (1 - ac_prev) * np.sqrt(1 - betas) / (1 - ac),
                               rtol=1e-12)


def test_posterior_is_bayes_rule_of_forward_process():
    """q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0): check mean and variance by completing the square."""
    schedule = NoiseSchedule(make_beta_schedule("linear", 100, 1e-3, 5e-2), dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x0, x_t = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 10, 50, 99])
    mean, var, log_var = schedule.q_posterior(x0, x_t, t)
    beta, ac_prev = schedule.betas[t, None], schedule.alphas_cumprod_prev[t, None]
    # Prior N(√ᾱ_{t-1} x0, 1-ᾱ_{t-1}); likelihood x_t ~ N(√α_t x_{t-1}, β_t).
    precision = 1 / (1 - ac_prev) + (1 - beta) / beta
    expected_mean = (ac_prev.sqrt() * x0 / (1 - ac_prev) + (1 - beta).sqrt() * x_t / beta) / precision
    torch.testing.assert_close(mean, expected_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(var.expand_as(mean), (1 / precision).expand_as(mean), rtol=1e-10, atol=0)
    torch.testing.assert_close(log_var, var.log(), rtol=1e-12, atol=0)


def test_q_sample_and_q_mean_variance_agree():
    schedule = NoiseSchedule(make_beta_schedule("linear", 200))
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0, 57, 199])
    mean, var, log_var = schedule.q_mean_variance(x0, t)
    assert mean.shape == x0.shape and var.shape == log_var.shape == (3, 1, 1, 1)
    torch.testing.assert_close(schedule.q_sample(x0, t, noise), mean + var.sqrt() * noise)
    torch.testing.assert_close(log_var.exp(), var, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.flatten(), 1 - schedule.alphas_cumprod[t], rtol=2e-4, atol=0)


def test_v_posterior_mixes_posterior_variance_with_beta():
    betas = make_beta_schedule("linear", 50, 1e-3, 2e-2)
    tilde = NoiseSchedule(betas, dtype=torch.float64).posterior_variance
    mixed = NoiseSchedule(betas, v_posterior=0.3, dtype=torch.float64)
    assert mixed.v_posterior == 0.3
    torch.testing.assert_close(mixed.posterior_variance, 0.7 * tilde + 0.3 * torch.from_numpy(betas))
    assert mixed.posterior_log_variance_clipped[0] == pytest.approx(math.log(0.3 * betas[0]))


def test_given_betas_take_precedence():
    given = [0.01, 0.02, 0.05]
    schedule = NoiseSchedule.from_config(given_betas=given, beta_schedule="cosine", timesteps=1000)
    assert schedule.num_timesteps == 3
    torch.testing.assert_close(schedule.betas, torch.tensor(given))
    torch.testing.assert_close(NoiseSchedule(torch.tensor(given, dtype=torch.float64)).betas, schedule.betas)


def test_extract_broadcasts_and_moves_with_module():
    schedule = NoiseSchedule(make_beta_schedule("linear", 10)).to(torch.float64)
    assert schedule.betas.dtype == torch.float64
    coef = extract(schedule.betas, torch.tensor([2, 7]), (2, 3, 5, 5))
    assert coef.shape == (2, 1, 1, 1)
    torch.testing.assert_close(coef.flatten(), schedule.betas[[2, 7]])
    with pytest.raises(ValueError, match="1-D tensor of length batch=2"):
        extract(schedule.betas, torch.tensor([1, 2, 3]), (2, 4))


@pytest.mark.parametrize("betas, message", [
    (np.zeros((2, 3)) + 0.1, "1-D"),
    (np.array([]), "1-D"),
    (np.array([1.0, 0.1]), r"open interval \(0, 1\)"),  # 1 is allowed last only (zero terminal SNR)
    (np.array([0.0, 0.1]), r"open interval \(0, 1\)"),
    (np.array([0.1, np.nan]), r"open interval \(0, 1\)"),
])
def test_bad_betas_are_rejected(betas, message):
    with pytest.raises(ValueError, match=message):
        NoiseSchedule(betas)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="unknown beta schedule 'quadratic'.*linear, cosine, sqrt_linear, sqrt"):
        make_beta_schedule("quadratic", 10)
    with pytest.raises(ValueError, match="positive int"):
        make_beta_schedule("linear", 0)
    with pytest.raises(ValueError, match="v_posterior"):
        NoiseSchedule(make_beta_schedule("linear", 10), v_posterior=1.5)


def conversion_setup(dtype):
    schedule = NoiseSchedule(make_beta_schedule("cosine", 100), dtype=dtype)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(4, 3, 8, generator=g, dtype=dtype)
    eps = torch.randn(4, 3, 8, generator=g, dtype=dtype)
    t = torch.tensor([5, 30, 70, 95])
    return schedule, x0, eps, t, schedule.q_sample(x0, t, eps)


def check_conversions(schedule, x0, eps, t, x_t, tol):
    """The predictions read x_0 and ε from each other's outputs on the schedule's x_t (DDPM eq. 15; Salimans & Ho
    2022, appendix D for v)."""
    alpha, sigma = schedule.coefficients(t)
    eps_model, x0_model, v_model = (make_prediction(name) for name in ("eps", "x0", "v"))
    v = v_model.target(x0, eps, alpha, sigma)
    torch.testing.assert_close(eps_model.x0(eps, x_t, alpha, sigma), x0, **tol)
    torch.testing.assert_close(x0_model.eps(x0, x_t, alpha, sigma), eps, **tol)
    torch.testing.assert_close(v_model.x0(v, x_t, alpha, sigma), x0, **tol)
    torch.testing.assert_close(v_model.eps(v, x_t, alpha, sigma), eps, **tol)
    return alpha, sigma, eps_model, x0_model, v_model


def test_conversions_are_exact_inverses_in_float64():
    schedule, x0, eps, t, x_t = conversion_setup(torch.float64)
    tol = dict(rtol=1e-10, atol=1e-10)
    alpha, sigma, eps_model, x0_model, v_model = check_conversions(schedule, x0, eps, t, x_t, tol)
    # Round trips through the other representation, for arbitrary (not only consistent) inputs.
    other = torch.randn_like(x0)
    x0_back = eps_model.x0(x0_model.eps(other, x_t, alpha, sigma), x_t, alpha, sigma)
    torch.testing.assert_close(x0_back, other, **tol)
    v_back = v_model.target(v_model.x0(other, x_t, alpha, sigma), v_model.eps(other, x_t, alpha, sigma), alpha, sigma)
    torch.testing.assert_close(v_back, other, **tol)


def test_conversions_in_float32():
    # Well conditioned at these t: the condition numbers stay below ~10 (√(1/ᾱ−1) ≥ 0.1 at t=5).
    check_conversions(*conversion_setup(torch.float32), tol=dict(rtol=1e-5, atol=1e-5))
