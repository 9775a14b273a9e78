"""The convergence levers of the training objective: noise-level densities (uniform, EDM lognormal, SD3
logit-normal), Min-SNR-γ loss weighting, offset noise and zero terminal SNR, with every sampler on a
zero-terminal-SNR schedule. Expected values are derived here from the papers' formulas, not from the code."""
import math
import re

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ldm.inference import sample_latents
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.models.diffusion.samplers import SAMPLERS, sample_ddpm, sample_heun
from ldm.models.diffusion.spacing import ddpm_levels, karras_sigmas, make_ddim_timesteps
from ldm.modules.diffusionmodules.denoiser import Denoiser, make_prediction
from ldm.modules.diffusionmodules.loss_weighting import loss_weights
from ldm.modules.diffusionmodules.noise_levels import make_noise_level_density
from ldm.modules.diffusionmodules.noise_process import DiscreteVP
from ldm.modules.diffusionmodules.objectives import reweight_by_logvar
from ldm.modules.diffusionmodules.offset_noise import OffsetNoise
from ldm.modules.diffusionmodules.schedule import NoiseSchedule, make_beta_schedule, rescale_zero_terminal_snr
from tests.exact_models import ExactDiffusionModel, ExactModel, GaussianMixture, moment_z_scores
from tests.test_ddpm import TIMESTEPS, load_tiny_txt2img, perturb_, pixel_batch, tiny_ddpm

# The Stable Diffusion / LDM txt2img schedule.
SD_BETAS = dict(linear_start=0.00085, linear_end=0.012)
DRAWS = 20_000
PARAMETERIZATIONS = ("eps", "x0", "v")
# Kolmogorov-Smirnov: P(sup |F_n − F| > 1.95/√n) ≈ 0.001 for a continuous F (less for a discrete one).
KS_LIMIT = 1.95 / math.sqrt(DRAWS)


def normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def ks_distance(t: torch.Tensor, cdf: torch.Tensor) -> float:
    """sup_k |#{t ≤ k}/n − cdf[k]| over the integer support."""
    empirical = torch.bincount(t, minlength=len(cdf)).cumsum(0).double() / t.numel()
    return float((empirical - cdf).abs().max())


def sd_schedule(timesteps: int = 1000, zero_terminal_snr: bool = False) -> NoiseSchedule:
    return NoiseSchedule.from_config(timesteps=timesteps, zero_terminal_snr=zero_terminal_snr, **SD_BETAS)


def sd_process(timesteps: int = 1000, zero_terminal_snr: bool = False) -> DiscreteVP:
    return DiscreteVP(sd_schedule(timesteps, zero_terminal_snr))


def table_weights(weighting: str, schedule: NoiseSchedule, parameterization: str, gamma: float = 5.0) -> torch.Tensor:
    """The loss weight of every timestep of `schedule`."""
    return loss_weights(weighting, make_prediction(parameterization),
                        *schedule.coefficients(torch.arange(schedule.num_timesteps)), gamma)


# ---------------------------------------------------------------------------------------------- densities

def test_uniform_is_the_reference_draw_bit_for_bit():
    density = make_noise_level_density("uniform", sd_process())
    torch.manual_seed(3)
    drawn = density(DRAWS)
    torch.manual_seed(3)
    assert torch.equal(drawn, torch.randint(0, 1000, (DRAWS,)).long())
    assert drawn.dtype == torch.long and 0 <= drawn.min() and drawn.max() < 1000
    assert ks_distance(drawn, torch.arange(1, 1001, dtype=torch.float64) / 1000) < KS_LIMIT


def test_forward_draws_t_from_the_density(monkeypatch):
    model = tiny_ddpm()
    seen = []
    monkeypatch.setattr(model, "p_losses", lambda x, c, t, **kwargs: seen.append(t))
    torch.manual_seed(5)
    model(pixel_batch(8))
    torch.manual_seed(5)
    assert torch.equal(seen[0], torch.randint(0, TIMESTEPS, (8,)).long())  # the default: the reference's draw

    model = tiny_ddpm(noise_level_density={"type": "logit_normal", "mean": math.log(2), "std": 0.01})
    monkeypatch.setattr(model, "p_losses", lambda x, c, t, **kwargs: seen.append(t))
    model(pixel_batch(8))
    assert seen[-1].tolist() == [10] * 8  # u ≈ sigmoid(ln 2) = 2/3 of the 15 steps


@pytest.mark.parametrize("mean, std", [(-1.2, 1.2), (0.5, 0.6)])
def test_lognormal_is_the_nearest_log_sigma_of_a_normal_draw(mean, std):
    process = sd_process()
    spec = "lognormal" if (mean, std) == (-1.2, 1.2) else OmegaConf.create({"type": "lognormal", "mean": mean,
                                                                             "std": std})
    density = make_noise_level_density(spec, process)
    drawn = density(DRAWS, generator=torch.Generator().manual_seed(0))
    assert drawn.dtype == torch.long and 0 <= drawn.min() and drawn.max() < 1000
    # The same normal draws, mapped by brute force: the table entry of least |ln σ_t − ln σ|.
    log_sigma = mean + std * torch.randn(DRAWS, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    alphas_cumprod = np.cumprod(1 - make_beta_schedule("linear", 1000, **SD_BETAS))
    table = torch.from_numpy(0.5 * np.log((1 - alphas_cumprod) / alphas_cumprod))
    assert torch.equal(drawn, (table[None, :] - log_sigma[:, None]).abs().argmin(dim=1))
    # Its law: t ≤ k iff ln σ lies below the log-midpoint of σ_k and σ_{k+1}.
    cdf = torch.cat([normal_cdf(((table[:-1] + table[1:]) / 2 - mean) / std), torch.ones(1, dtype=torch.float64)])
    assert ks_distance(drawn, cdf) < KS_LIMIT


@pytest.mark.parametrize("mean, std", [(0.0, 1.0), (0.5, 0.7)])
def test_logit_normal_has_the_sd3_law(mean, std):
    spec = "logit_normal" if (mean, std) == (0.0, 1.0) else {"type": "logit_normal", "mean": mean, "std": std}
    drawn = make_noise_level_density(spec, sd_process())(DRAWS, generator=torch.Generator().manual_seed(0))
    assert drawn.dtype == torch.long and 0 <= drawn.min() and drawn.max() < 1000
    # t = round(u·999) ≤ k iff u < (k + ½)/999 iff the normal draw < logit((k + ½)/999).
    u = (torch.arange(999, dtype=torch.float64) + 0.5) / 999
    cdf = torch.cat([normal_cdf((torch.log(u / (1 - u)) - mean) / std), torch.ones(1, dtype=torch.float64)])
    assert ks_distance(drawn, cdf) < KS_LIMIT


def test_lognormal_reaches_the_pure_noise_step_of_zero_terminal_snr():
    process = sd_process(zero_terminal_snr=True)
    drawn = make_noise_level_density({"type": "lognormal", "mean": 3.0, "std": 2.0}, process)(
        DRAWS, generator=torch.Generator().manual_seed(0))
    # ln σ far above the table is clamped to its stand-in for σ = ∞: the last timestep, pure noise.
    assert drawn.max() == 999 and 0 < (drawn == 999).float().mean() < 0.2


@pytest.mark.parametrize("spec, message", [
    ("beta", "unknown noise_level_density type 'beta'; choose one of uniform, lognormal, logit_normal"),
    ({"type": "normal"}, "unknown noise_level_density type 'normal'; choose one of uniform, lognormal, logit_normal"),
    ({"mean": 0.0}, "unknown noise_level_density type None; choose one of uniform, lognormal, logit_normal"),
    ({"type": "logit_normal", "loc": 1.0}, "noise_level_density logit_normal takes mean, std; got loc"),
    ({"type": "uniform", "std": 1.0}, "noise_level_density uniform takes no parameters; got std"),
    ({"type": "lognormal", "std": 0.0}, "noise_level_density lognormal needs a number mean and a positive std, "
                                        "got mean=-1.2, std=0.0"),
    (3, "noise_level_density must be a name or {type: name, ...}, got 3"),
])
def test_density_config_errors(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        tiny_ddpm(noise_level_density=spec)
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------- Min-SNR-γ

def paper_min_snr(parameterization: str, gamma: float, timesteps: int = TIMESTEPS) -> torch.Tensor:
    """Hang et al. 2023 from float64 β: SNR = ᾱ/(1 − ᾱ); eps min(SNR,γ)/SNR, x0 min(SNR,γ), v min(SNR,γ)/(SNR+1)."""
    alphas_cumprod = np.cumprod(1 - make_beta_schedule("linear", timesteps))
    snr = alphas_cumprod / (1 - alphas_cumprod)
    clamped = np.minimum(snr, gamma)
    return torch.from_numpy({"eps": clamped / snr, "x0": clamped, "v": clamped / (snr + 1)}[parameterization])


@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_min_snr_weights_are_the_papers(parameterization):
    schedule = NoiseSchedule(make_beta_schedule("linear", TIMESTEPS))
    weights = table_weights("min_snr", schedule, parameterization, 5.0)
    assert weights.dtype == torch.float32 and weights.shape == (TIMESTEPS,)
    torch.testing.assert_close(weights.double(), paper_min_snr(parameterization, 5.0), rtol=1e-5, atol=0)
    assert torch.equal(table_weights("simple", schedule, parameterization), torch.ones(TIMESTEPS))


def test_min_snr_weight_on_each_prediction():
    """min(SNR, γ) on the x_0 error is min(SNR, γ)/SNR on ε's loss, min(SNR, γ) on x_0's, min(SNR, γ)/(SNR + 1)
    on v's and min(SNR, γ)·σ²/(α + σ)² on the flow velocity's, for inputs x = αx_0 + σε."""
    snr = torch.tensor([0.5, 4.999, 5.0, 5.001, 20.0, 1e4], dtype=torch.float64)
    alpha, sigma = (snr / (1 + snr)).sqrt(), (1 / (1 + snr)).sqrt()
    weight = {p: loss_weights("min_snr", make_prediction(p), alpha, sigma, 5.0).double() for p in
              ("eps", "x0", "v", "flow")}
    clamped = snr.clamp(max=5.0)
    torch.testing.assert_close(weight["eps"], clamped / snr, rtol=1e-6, atol=0)
    torch.testing.assert_close(weight["x0"], clamped, rtol=1e-6, atol=0)
    torch.testing.assert_close(weight["v"], clamped / (snr + 1), rtol=1e-6, atol=0)
    torch.testing.assert_close(weight["flow"], clamped * sigma ** 2 / (alpha + sigma) ** 2, rtol=1e-6, atol=0)
    # Stable Diffusion's schedule has timesteps on both sides of γ.
    weights = table_weights("min_snr", sd_schedule(), "eps", 5.0)
    assert (weights > 0.999).any() and (weights < 0.99).any()


def test_edm_weighting_leaves_the_edm_loss_unweighted():
    """EDM's λ(σ) = (σ² + σ_d²)/(σ·σ_d)² is 1/c_out² of its own F: the weight on F's loss is 1."""
    alpha = torch.tensor([1.0, 0.5, 0.2], dtype=torch.float64)
    sigma = torch.tensor([0.01, 1.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(loss_weights("edm", make_prediction("edm", sigma_data=0.5), alpha, sigma).double(),
                               torch.ones(3, dtype=torch.float64), rtol=1e-6, atol=0)


def model_loss_parts(model, x, t, noise):
    """Per-sample squared error of the model against the target written from the formulas (float64 ᾱ)."""
    alphas_cumprod = torch.from_numpy(np.cumprod(1 - model.schedule.betas.double().numpy()))[t].float()
    a, s = alphas_cumprod.sqrt()[:, None, None, None], (1 - alphas_cumprod).sqrt()[:, None, None, None]
    target = {"eps": noise, "x0": x, "v": a * noise - s * x}[model.parameterization]
    output = model.apply_model(a * x + s * noise, t)
    return ((output - target) ** 2).flatten(1).mean(1)


@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_p_losses_weights_the_loss_and_logs_loss_simple_unweighted(parameterization):
    model = tiny_ddpm(parameterization=parameterization, loss_weighting="min_snr", min_snr_gamma=2.0,
                      beta_schedule="linear")
    perturb_(model.model)
    x, t = pixel_batch(4), torch.tensor([0, 3, 9, 15])
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    loss, log = model.p_losses(x, None, t, noise)
    per_sample = model_loss_parts(model, x, t, noise)
    weights = paper_min_snr(parameterization, 2.0).float()[t]
    torch.testing.assert_close(log["train/loss_simple"], per_sample.mean(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss, (weights * per_sample).mean(), rtol=1e-4, atol=1e-6)
    assert log["train/loss"] is loss


def test_min_snr_comes_before_the_logvar_and_leaves_the_vlb_alone():
    model = tiny_ddpm(parameterization="v", loss_weighting="min_snr", learn_logvar=True, logvar_init=0.3,
                      original_elbo_weight=0.5)
    perturb_(model.model)
    x, t = pixel_batch(4), torch.tensor([1, 5, 10, 15])
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    loss, log = model.p_losses(x, None, t, noise)
    per_sample = model_loss_parts(model, x, t, noise)
    weights = paper_min_snr("v", 5.0).float()[t]
    vlb = (model.lvlb_weights[t] * per_sample).mean()
    torch.testing.assert_close(log["train/loss_vlb"], vlb, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(log["train/loss_gamma"], (weights * per_sample / math.exp(0.3) + 0.3).mean(),
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss, log["train/loss_gamma"] + 0.5 * vlb, rtol=1e-5, atol=1e-7)


def test_simple_weighting_is_todays_loss_bit_for_bit():
    model = tiny_ddpm(learn_logvar=True, logvar_init=0.2)
    perturb_(model.model)
    x, t = pixel_batch(4), torch.tensor([0, 4, 8, 15])
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    loss, log = model.p_losses(x, None, t, noise)
    loss_simple = ((model.apply_model(model.q_sample(x, t, noise), t) - noise) ** 2).flatten(1).mean(1)
    assert torch.equal(log["train/loss_simple"], loss_simple.mean())
    assert torch.equal(loss, reweight_by_logvar(loss_simple, model.logvar[t]).mean())


@pytest.mark.parametrize("kwargs, message", [
    (dict(loss_weighting="snr"), "unknown loss_weighting 'snr'; choose one of simple, min_snr, edm"),
    (dict(loss_weighting="min_snr", min_snr_gamma=0.0), "min_snr_gamma must be positive, got 0.0"),
    (dict(offset_noise_strength=-0.1), "offset_noise_strength must be a number >= 0 (0 disables it; 0.1 is the "
                                       "paper's), got -0.1"),
    (dict(zero_terminal_snr=True), "this noise process reaches pure noise (α = 0, zero terminal SNR), where "
                                   "ε-prediction cannot recover x_0: use parameterization 'v', 'x0' or 'flow'"),
    (dict(noise_process="rectified_flow", parameterization="flow", learn_logvar=True), "learn_logvar and original_elbo_weight index tables "
                                                              "by timestep and need noise_process discrete_vp, not "
                                                              "rectified_flow"),
    (dict(noise_process="flow"), "unknown noise_process 'flow'; choose one of discrete_vp, continuous_vp, edm, "
                                 "rectified_flow"),
    (dict(noise_process={"type": "edm", "sigma": 1.0}), "noise_process edm: "),
])
def test_objective_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        tiny_ddpm(**kwargs)
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------- offset noise

def test_offset_noise_shape_and_variance():
    x = torch.zeros(2000, 3, 4, 4)
    torch.manual_seed(0)
    noise = OffsetNoise(0.5)(x)
    assert noise.shape == x.shape
    # Per element: 1 + s²; the channel means carry the offset: Var = 1/(h·w) + s².
    assert abs(noise.var().item() - 1.25) < 0.02
    assert abs(noise.mean(dim=(2, 3)).var().item() - (1 / 16 + 0.25)) < 0.02
    # And the offset is one number per example and channel: it is what the channel means share.
    torch.manual_seed(0)
    eps = torch.randn_like(x)
    offset = torch.randn(2000, 3, 1, 1)
    assert torch.equal(noise, eps + 0.5 * offset)


def test_zero_offset_noise_is_plain_randn_like():
    x = torch.zeros(4, 3, 8, 8)
    torch.manual_seed(0)
    noise = OffsetNoise(0.0)(x)
    torch.manual_seed(0)
    assert torch.equal(noise, torch.randn_like(x))
    # No second draw: the random stream after it is where it was without offset noise.
    torch.manual_seed(0)
    OffsetNoise(0.0)(x)
    after_offset_free = torch.randn(1)
    torch.manual_seed(0)
    torch.randn_like(x)
    assert torch.equal(after_offset_free, torch.randn(1))


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_p_losses_trains_on_the_offset_noise(parameterization):
    model = tiny_ddpm(parameterization=parameterization, offset_noise_strength=0.3)
    perturb_(model.model)
    x, t = pixel_batch(4), torch.tensor([0, 4, 8, 15])
    torch.manual_seed(7)
    _, log = model.p_losses(x, None, t)
    torch.manual_seed(7)
    noise = torch.randn_like(x) + 0.3 * torch.randn(4, 3, 1, 1)
    torch.testing.assert_close(log["train/loss_simple"], model_loss_parts(model, x, t, noise).mean(),
                               rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------- zero terminal SNR

def test_zero_terminal_snr_is_algorithm_1():
    betas = make_beta_schedule("linear", 1000, **SD_BETAS)
    rescaled = rescale_zero_terminal_snr(betas)
    old, new = np.sqrt(np.cumprod(1 - betas)), np.sqrt(np.cumprod(1 - rescaled))
    assert new[-1] == 0.0 and rescaled[-1] == 1.0
    np.testing.assert_allclose(new[0], old[0], rtol=1e-15)  # Algorithm 1 keeps the first √ᾱ
    # √ᾱ is shifted and scaled: an affine map of the old one, 0 at T and unchanged at 1.
    np.testing.assert_allclose(new, (old - old[-1]) * old[0] / (old[0] - old[-1]), rtol=1e-12, atol=1e-15)
    assert np.all((rescaled[:-1] > 0) & (rescaled[:-1] < 1))

    schedule = sd_schedule(zero_terminal_snr=True)
    assert schedule.alphas_cumprod[-1].item() == 0.0 and schedule.sqrt_alphas_cumprod[-1].item() == 0.0
    assert schedule.sqrt_alphas_cumprod[0].item() == sd_schedule().sqrt_alphas_cumprod[0].item()
    infinite = {name for name in NoiseSchedule.BUFFER_NAMES if not torch.isfinite(getattr(schedule, name)).all()}
    assert infinite == {"sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod"}  # 1/ᾱ at T only
    assert torch.isfinite(schedule.sqrt_recipm1_alphas_cumprod[:-1]).all()


def test_beta_one_is_only_allowed_last():
    betas = make_beta_schedule("linear", 8)
    NoiseSchedule(np.append(betas[:-1], 1.0))
    with pytest.raises(ValueError, match=re.escape("every beta must lie in the open interval (0, 1) (the last may "
                                                   "be 1: zero terminal SNR); got [1.0]")):
        NoiseSchedule(np.concatenate([betas[:3], [1.0], betas[4:]]))


def test_conversions_stay_finite_at_zero_snr():
    schedule = sd_schedule(16, zero_terminal_snr=True)
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = torch.tensor([15, 15])
    x_t = schedule.q_sample(x0, t, eps)
    assert torch.equal(x_t, eps)
    alpha, sigma = schedule.coefficients(t)
    assert torch.equal(make_prediction("x0").eps(x0, x_t, alpha, sigma), eps)
    v = make_prediction("v")
    torch.testing.assert_close(v.x0(v.target(x0, eps, alpha, sigma), x_t, alpha, sigma), x0)


@pytest.mark.parametrize("parameterization", ["x0", "v"])
def test_zero_terminal_snr_training_is_finite(parameterization):
    model = tiny_ddpm(parameterization=parameterization, zero_terminal_snr=True, loss_weighting="min_snr",
                      learn_logvar=True, original_elbo_weight=0.1, noise_level_density="logit_normal", **SD_BETAS)
    perturb_(model.model)
    weights = table_weights("min_snr", model.schedule, parameterization)
    assert torch.isfinite(model.lvlb_weights).all() and torch.isfinite(weights).all()
    assert weights[-1] == 0  # SNR_T = 0: min(0, γ) = 0 for x0 and v
    x = pixel_batch(4)
    loss, log = model.p_losses(x, None, torch.tensor([0, 7, 15, 15]))
    assert all(torch.isfinite(value).all() for value in log.values())
    loss.backward()
    bpd = model.bits_per_dim(x, timesteps=[1, 8, 15])
    assert all(torch.isfinite(value).all() for value in bpd.values())


def test_sigma_table_has_a_finite_stand_in_for_infinity():
    process = sd_process(16, zero_terminal_snr=True)
    calls = []
    denoiser = Denoiser(lambda x, t: calls.append(t) or torch.zeros_like(x), process, make_prediction("v"))
    sigmas = process.schedule.sigma_table
    assert process.sigma_max == sigmas[-2] ** 2 / sigmas[-3] and torch.isfinite(process.log_sigmas).all()
    assert torch.equal(process.sigmas[:-1], sigmas[:-1])
    for grid in (process.spaced_sigmas(5), karras_sigmas(5, process.sigma_min, process.sigma_max)):
        assert torch.isfinite(grid).all()
    x = torch.randn(2, 3) * process.sigma_max
    x0 = denoiser(x, process.sigma_max * torch.ones(2))
    assert calls[0].tolist() == [15, 15] and torch.isfinite(x0).all()  # the model is asked at t = T − 1


@pytest.mark.parametrize("parameterization", ["x0", "v"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_is_finite_and_starts_at_the_last_timestep(sampler, parameterization):
    model = tiny_ddpm(parameterization=parameterization, zero_terminal_snr=True, **SD_BETAS)
    perturb_(model.model)
    timesteps = []
    apply_model = model.apply_model
    model.apply_model = lambda x, t, cond=None: timesteps.append(int(t[0])) or apply_model(x, t, cond)
    with torch.no_grad():
        z = sample_latents(model, 2, sampler=sampler, steps=4, eta=1.0 if sampler == "ddim" else 0.0, seed=0,
                           progress=False)
    assert z.shape == (2, 3, 8, 8) and torch.isfinite(z).all()
    assert timesteps[0] == TIMESTEPS - 1


def test_trailing_timesteps_end_on_the_last_step():
    """Lin et al. 2024, Table 2: trailing = round(flip(arange(T, 0, −T/S))) − 1."""
    assert make_ddim_timesteps("trailing", 10, 1000).tolist() == list(range(99, 1000, 100))
    assert make_ddim_timesteps("trailing", 7, 1000).tolist() == [142, 285, 428, 570, 713, 856, 999]
    assert make_ddim_timesteps("trailing", 16, 16).tolist() == list(range(16))


def test_latent_diffusion_takes_the_levers_from_its_config():
    model = load_tiny_txt2img(["model.params.parameterization=v", "model.params.zero_terminal_snr=true",
                               "model.params.loss_weighting=min_snr", "model.params.min_snr_gamma=3.0",
                               "model.params.offset_noise_strength=0.1",
                               "model.params.noise_level_density={type: lognormal, mean: -0.5, std: 1.0}"])
    assert model.schedule.alphas_cumprod[-1] == 0 and model.training_noise.strength == 0.1
    assert model.noise_level_density.mean == -0.5 and model.min_snr_gamma == 3.0
    z = torch.randn(2, 4, 8, 8)
    loss, _ = model(z, ["a", "b"])  # captions: the tiny model trains its text encoder in forward
    assert torch.isfinite(loss)


@pytest.mark.parametrize("sampler_class", [DDIMSampler, PLMSSampler])
def test_ddim_and_plms_clip_and_threshold_at_zero_snr(sampler_class):
    model = tiny_ddpm(parameterization="v", zero_terminal_snr=True, **SD_BETAS)
    perturb_(model.model)
    torch.manual_seed(0)
    samples, intermediates = sampler_class(model).sample(4, 2, (3, 8, 8), ddim_discretize="trailing", verbose=False,
                                                         clip_denoised=True, dynamic_threshold=0.995)
    assert torch.isfinite(samples).all() and all(torch.isfinite(x).all() for x in intermediates["pred_x0"])


# With ᾱ_T = 0, x_T ~ N(0, I) is the exact marginal: samplers need no noised start (compare
# tests/test_closed_form_sampling.py) and, with the exact model, must reproduce the data from pure noise.
DATA = GaussianMixture.gaussian([0.5, -0.3], [[1.0, 0.6], [0.6, 0.8]])
Z_LIMIT = 4.0


def zero_snr_runs(schedule: NoiseSchedule, model_fn: ExactModel, x_T: torch.Tensor, generator: torch.Generator):
    denoiser = Denoiser(model_fn, DiscreteVP(schedule), make_prediction("v"))
    levels = ddpm_levels(denoiser.process, 1)
    yield "ddpm", sample_ddpm(denoiser, x_T / denoiser.input_scale(levels[0]), levels, generator=generator, disable=True)
    sampler = PLMSSampler(ExactDiffusionModel(model_fn))
    torch.manual_seed(0)
    yield "plms", sampler.sample(50, x_T.shape[0], (2,), x_T=x_T, ddim_discretize="trailing", verbose=False)[0]
    # From σ_max ≈ 4500 Karras' grid spends most steps at high σ: 80 keep the bias below 1 standard error.
    sigmas = karras_sigmas(80, float(denoiser.sigma_min), float(denoiser.sigma_max))
    yield "heun", sample_heun(denoiser, x_T * sigmas[0], sigmas, disable=True)


def test_samplers_reproduce_data_from_pure_noise_at_zero_snr():
    schedule = sd_schedule(zero_terminal_snr=True)
    model_fn = ExactModel(DATA, schedule, "v")
    generator = torch.Generator().manual_seed(0)
    x_T = torch.randn(8000, 2, generator=generator)
    for name, samples in zero_snr_runs(schedule, model_fn, x_T, generator):
        target = DATA.noised(float(schedule.alphas_cumprod[0])) if name == "plms" else DATA
        for statistic, z in moment_z_scores(samples, target).items():
            assert z.abs().max() < Z_LIMIT, (name, statistic, z.tolist())


# ---------------------------------------------------------------------------------------------- latent channel norm

def test_latent_channel_norm_standardises_each_channel_and_decodes_back():
    model = load_tiny_txt2img(["model.params.latent_channel_norm=true", "model.params.scale_by_std=true"])
    assert model.latent_shift.shape == model.latent_scale.shape == (4, 1, 1)
    # Measured on the first batch of a fresh run, after scale_by_std.
    images = torch.rand(16, 32, 32, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    model.on_train_batch_start({"image": images}, 0)
    z = model.get_first_stage_encoding(model.encode_first_stage(images.permute(0, 3, 1, 2)).mode())
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(4), rtol=0, atol=1e-5)
    torch.testing.assert_close(z.std(dim=(0, 2, 3)), torch.ones(4), rtol=0, atol=1e-5)
    assert model.latent_shift.abs().sum() > 0 and "latent_shift" in model.state_dict()
    # Decoding undoes both the channel norm and scale_factor.
    raw = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(model.decode_first_stage(model.get_first_stage_encoding(raw)),
                               model.first_stage_model.decode(raw), rtol=1e-4, atol=1e-5)
    # Off by default: the reference's state dict, z = scale_factor · E(x) exactly.
    plain = load_tiny_txt2img()
    assert "latent_shift" not in plain.state_dict() and torch.equal(plain.get_first_stage_encoding(raw),
                                                                    plain.scale_factor * raw)
