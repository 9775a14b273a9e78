"""Every sampler, run with the exact denoiser of known 2-D data, must reproduce that data's distribution.

With a Bayes-optimal model (tests/exact_models.py) the only error left is the sampler's: its
discretisation, and any mistake in its coefficients. Samples are compared with the truth by the
mean, the covariance (as z-scores: error / standard error at this sample size), the mixture weights
(binomial z-scores) and the energy distance (against its noise floor). A correct sampler gives z ≈ N(0, 1),
so |z| ≤ Z_LIMIT is a tight bound; step counts are chosen so each sampler's own discretisation bias is
≤ ~1 standard error (first-order samplers need more steps, see STEPS). A negative control shows a 5-10 %
error in one coefficient fails the same bounds.

Samplers start from the exact marginal q(x_T) (a draw of x_0 noised to the first timestep) rather than
N(0, I): the schedules here stop at ᾱ_T ≈ 0.005 > 0, and a deterministic sampler maps the prior mismatch to a
bias of ≈ √ᾱ_T·(mean/sd) ≈ 7 % of the data mean (Lin et al. 2023, "Common Diffusion Noise Schedules and
Sample Steps are Flawed"); that is a property of the schedule, not of a sampler.
"""
from __future__ import annotations

import math
from typing import Callable

import pytest
import torch

from ldm.models.diffusion.samplers import (SAMPLERS, sample_ddpm, sample_dpm2, sample_dpmpp_2m, sample_dpmpp_2m_sde,
                                           sample_dpmpp_3m_sde, sample_euler, sample_euler_ancestral, sample_heun,
                                           sample_lms, sample_unipc)
from ldm.models.diffusion.spacing import ddpm_levels, exponential_sigmas, karras_sigmas, make_sigmas
from ldm.modules.diffusionmodules.denoiser import PREDICTIONS, Denoiser, make_prediction
from ldm.modules.diffusionmodules.noise_process import EDM, ContinuousVP, DiscreteVP, RectifiedFlow
from ldm.modules.diffusionmodules.schedule import NoiseSchedule
from tests.exact_models import (ExactDiffusionModel, ExactModel, GaussianMixture, component_fraction_z_scores,
                                energy_distance, energy_distance_noise_floor, moment_z_scores)

# The txt2img (Stable Diffusion / LDM) schedule, and DDPM's own (Ho et al. 2020: β linear 1e-4..0.02).
SCHEDULES = {
    "ldm_linear": NoiseSchedule.from_config(beta_schedule="linear", linear_start=0.00085, linear_end=0.012),
    "ddpm_sqrt_linear": NoiseSchedule.from_config(beta_schedule="sqrt_linear", linear_start=1e-4, linear_end=2e-2),
}
DATA = {
    "gaussian": GaussianMixture.gaussian([0.5, -0.3], [[1.0, 0.6], [0.6, 0.8]]),
    # Components ≥ 6 standard deviations apart, so assigning a sample to its mode is exact in practice.
    "mixture": GaussianMixture([0.5, 0.3, 0.2], [[-1.5, 0.0], [1.5, 0.5], [0.0, 2.0]],
                               [[[0.09, 0.0], [0.0, 0.09]], [[0.16, 0.05], [0.05, 0.09]], [[0.04, 0.0], [0.0, 0.16]]]),
}
NUM_SAMPLES = 8000
# Each z is ≈ N(0, 1) for a correct sampler; |z| > 4 has probability 6e-5 (≈ 1e-3 over all checks here).
Z_LIMIT = 4.0
# The energy distance of two independent true sets is 1 noise floor on average (n·distance has a fixed law
# under the null); for 400 pairs of mixture sets its 99 % quantile was 3.8 floors and its largest 5.8 (the
# V-statistic has a long right tail).
ENERGY_SAMPLES = 4000
ENERGY_LIMIT = 6.0
# Steps per sampler. Measured covariance bias with 50k-100k samples on the Gaussian: DDPM (1000) < 0.3 %,
# Heun (25, Karras σ) ~1 %, DPM-Solver++(2M) (Karras σ) 10 % at 10 steps, 2 % at 20, 0.7 % at 30, PLMS (50)
# 0.9 %. First-order samplers converge far slower: DDIM η=0 loses 6 % of the variance at 50 steps (3.4 % at
# 100); DDIM η=1 and Euler ancestral (the same update in σ, see test_ddim_is_euler_in_sigma) 10 % at 50 and
# 6.5 % at 100, as each step uses E[x_0|x_t] but drops Var[x_0|x_t]. So they run longer here, and
# test_ddim_is_euler_in_sigma checks DDIM at its usual 50 steps exactly instead.
STEPS = {"ddpm": 1000, "euler_ancestral": 500, "heun": 25, "dpmpp_2m": 30, "ddim_eta0": 250, "ddim_eta1": 500,
         "plms": 50}
# The σ-space samplers added with the registry, on the same bounds: Euler is DDIM η = 0 (first order);
# DPM2, UniPC, LMS and the multistep SDE solvers are 2nd order or more (the SDE ones lose variance to
# their noise steps like Euler ancestral unless run longer).
SIGMA_STEPS = {"euler": 250, "euler_a": 500, "heun": 25, "dpm2": 25, "lms": 30, "dpmpp_2m": 30,
               "dpmpp_2m_sde": 200, "dpmpp_3m_sde": 200, "unipc": 30}
PARAMETERIZATIONS = tuple(PREDICTIONS)


def vp_denoiser(model_fn: Callable, schedule: NoiseSchedule, parameterization: str) -> Denoiser:
    """D(x_σ, σ) of a network trained on the discrete table of `schedule`."""
    return Denoiser(model_fn, DiscreteVP(schedule), make_prediction(parameterization))


def noised_start(data: GaussianMixture, alpha_cumprod: float, n: int, generator: torch.Generator) -> torch.Tensor:
    """n draws of x_t from q(x_t) at ᾱ: the exact state a sampler should start from."""
    return data.noised(alpha_cumprod).sample(n, generator).float()


def run_ddpm(model_fn: Callable, schedule: NoiseSchedule, parameterization: str, data: GaussianMixture, n: int,
             seed: int) -> tuple[torch.Tensor, GaussianMixture]:
    generator = torch.Generator().manual_seed(seed)
    x_T = noised_start(data, float(schedule.alphas_cumprod[-1]), n, generator)
    denoiser = vp_denoiser(model_fn, schedule, parameterization)
    sigmas = ddpm_levels(denoiser.process, 1)
    return sample_ddpm(denoiser, x_T / denoiser.input_scale(sigmas[0]), sigmas, generator=generator, disable=True), data


def k_diffusion_runner(sampler: Callable, sigmas_of: Callable, steps: int, stochastic: bool = False) -> Callable:
    def run(model_fn: Callable, schedule: NoiseSchedule, parameterization: str, data: GaussianMixture, n: int,
            seed: int) -> tuple[torch.Tensor, GaussianMixture]:
        generator = torch.Generator().manual_seed(seed)
        denoiser = vp_denoiser(model_fn, schedule, parameterization)
        sigmas = sigmas_of(denoiser, steps)
        sigma_max = float(sigmas[0])
        # x_σ = x_t / √ᾱ with ᾱ = 1/(1 + σ²).
        x = noised_start(data, 1 / (1 + sigma_max ** 2), n, generator) * math.sqrt(1 + sigma_max ** 2)
        extra = {"generator": generator} if stochastic else {}
        return sampler(denoiser, x, sigmas, disable=True, **extra), data
    return run


def karras(denoiser: Denoiser, steps: int) -> torch.Tensor:
    return karras_sigmas(steps, denoiser.sigma_min, denoiser.sigma_max)


def model_timesteps(denoiser: Denoiser, steps: int) -> torch.Tensor:
    return denoiser.process.spaced_sigmas(steps)


def ddim_runner(sampler_name: str, steps: int, eta: float) -> Callable:
    def run(model_fn: Callable, schedule: NoiseSchedule, parameterization: str, data: GaussianMixture, n: int,
            seed: int) -> tuple[torch.Tensor, GaussianMixture]:
        module = pytest.importorskip(f"ldm.models.diffusion.{sampler_name.lower()}")
        sampler = getattr(module, f"{sampler_name}Sampler")(ExactDiffusionModel(model_fn))
        sampler.make_schedule(steps, verbose=False)
        first = int(sampler.ddim_timesteps[-1])
        x_T = noised_start(data, float(schedule.alphas_cumprod[first]), n, torch.Generator().manual_seed(seed))
        with torch.random.fork_rng():  # the reference's samplers draw their noise from the global generator
            torch.manual_seed(seed)
            samples, _ = sampler.sample(steps, n, (data.dim,), eta=eta, x_T=x_T, verbose=False)
        # The last DDIM step lands on ᾱ_prev = ᾱ_0 (the reference), i.e. on x at t = 0, not on x_0.
        return samples, data.noised(float(schedule.alphas_cumprod[0]))
    return run


RUNNERS = {
    "ddpm": run_ddpm,
    "euler_ancestral": k_diffusion_runner(sample_euler_ancestral, model_timesteps, STEPS["euler_ancestral"],
                                          stochastic=True),
    "heun": k_diffusion_runner(sample_heun, karras, STEPS["heun"]),
    "dpmpp_2m": k_diffusion_runner(sample_dpmpp_2m, karras, STEPS["dpmpp_2m"]),
    "ddim_eta0": ddim_runner("DDIM", STEPS["ddim_eta0"], eta=0.0),
    "ddim_eta1": ddim_runner("DDIM", STEPS["ddim_eta1"], eta=1.0),
    "plms": ddim_runner("PLMS", STEPS["plms"], eta=0.0),
}
# DDPM's schedule only for ancestral sampling, the sampler it was made for.
CASES = [(name, "ldm_linear") for name in RUNNERS] + [("ddpm", "ddpm_sqrt_linear")]


def distribution_failures(samples: torch.Tensor, data: GaussianMixture) -> list[str]:
    """Which of the statistics of `samples` are outside their bounds (empty for a pass)."""
    failures = []
    for name, z in moment_z_scores(samples, data).items():
        if z.abs().max() > Z_LIMIT:
            failures.append(f"{name} z-scores {z.tolist()}")
    if len(data.weights) > 1:
        z = component_fraction_z_scores(samples, data)
        if z.abs().max() > Z_LIMIT:
            failures.append(f"mixture weight z-scores {z.tolist()}")
        truth = data.sample(ENERGY_SAMPLES, torch.Generator().manual_seed(777))
        ratio = (energy_distance(samples.reshape(samples.shape[0], -1)[:ENERGY_SAMPLES], truth)
                 / energy_distance_noise_floor(data, ENERGY_SAMPLES, ENERGY_SAMPLES))
        if ratio > ENERGY_LIMIT:
            failures.append(f"energy distance {ratio:.1f} noise floors")
    return failures


@pytest.mark.parametrize("data_name", list(DATA))
@pytest.mark.parametrize("sampler_name, schedule_name", CASES)
def test_sampler_reproduces_data(sampler_name, schedule_name, data_name):
    schedule, data = SCHEDULES[schedule_name], DATA[data_name]
    samples, target = RUNNERS[sampler_name](ExactModel(data, schedule, "eps"), schedule, "eps", data,
                                            NUM_SAMPLES, seed=0)
    assert torch.isfinite(samples).all()
    assert not distribution_failures(samples, target), distribution_failures(samples, target)


# DDPM ancestral once, on DDPM's schedule: its ᾱ_T ≈ 4e-5 makes ε → x_0 the most ill-conditioned conversion.
@pytest.mark.parametrize("sampler_name, schedule_name", [case for case in CASES if case != ("ddpm", "ldm_linear")])
def test_parameterizations_give_the_same_samples(sampler_name, schedule_name):
    """x0 and v models make the same trajectory as the eps model that passed the distribution test: the
    exact model's three outputs describe one denoiser, so any difference is a conversion error."""
    schedule, data = SCHEDULES[schedule_name], DATA["mixture"]
    runs = {p: RUNNERS[sampler_name](ExactModel(data, schedule, p), schedule, p, data, 256, seed=1)[0]
            for p in PARAMETERIZATIONS}
    for parameterization in ("x0", "v"):
        torch.testing.assert_close(runs[parameterization], runs["eps"], rtol=0, atol=2e-4,
                                   msg=f"{sampler_name}: {parameterization} vs eps")


class ScaledEps:
    """A model whose ε is off by a constant factor: a plausible coefficient bug (e.g. a wrong √(1 − ᾱ))."""

    def __init__(self, model_fn: ExactModel, factor: float) -> None:
        self.model_fn, self.factor = model_fn, factor

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.factor * self.model_fn(x_t, t)


# Ancestral samplers re-inject noise every step, which partly corrects a wrong ε: measured on the mixture,
# ε × 1.03 moves Euler ancestral's worst covariance z only to −3.3 and × 1.1 to −5.5, while the ODE
# samplers reach −8.6 at × 1.05.
@pytest.mark.parametrize("sampler_name, data_name, factor", [("dpmpp_2m", "gaussian", 1.05),
                                                             ("dpmpp_2m", "mixture", 1.05),
                                                             ("euler_ancestral", "mixture", 1.1)])
def test_wrong_coefficient_fails_the_bounds(sampler_name, data_name, factor):
    """Negative control: a few per cent error in ε must be caught by the bounds the samplers pass."""
    schedule, data = SCHEDULES["ldm_linear"], DATA[data_name]
    wrong = ScaledEps(ExactModel(data, schedule, "eps"), factor)
    samples, target = RUNNERS[sampler_name](wrong, schedule, "eps", data, NUM_SAMPLES, seed=0)
    assert distribution_failures(samples, target)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_is_euler_in_sigma(eta):
    """DDIM(η) on timesteps t_i is Euler ancestral(η) on σ_{t_i} (Karras et al. 2022, sec. 4: DDIM is Euler on
    the ODE in σ; the η-noise is the DDPM posterior's): the same noise gives the same samples, at 50 steps."""
    ddim = pytest.importorskip("ldm.models.diffusion.ddim")
    schedule, data = SCHEDULES["ldm_linear"], DATA["mixture"]
    model_fn = ExactModel(data, schedule, "v")
    sampler = ddim.DDIMSampler(ExactDiffusionModel(model_fn))
    sampler.make_schedule(50, verbose=False)
    timesteps = torch.as_tensor(sampler.ddim_timesteps.copy()).flip(0)
    x_T = noised_start(data, float(schedule.alphas_cumprod[timesteps[0]]), 512, torch.Generator().manual_seed(2))
    with torch.random.fork_rng():
        torch.manual_seed(3)
        expected, _ = sampler.sample(50, 512, (data.dim,), eta=eta, x_T=x_T, verbose=False)
    denoiser = vp_denoiser(model_fn, schedule, "v")
    # DDIM ends on ᾱ_0, i.e. σ_0, not on σ = 0.
    sigmas = denoiser.process.sigmas[torch.cat([timesteps, timesteps.new_zeros(1)])]
    x_sigma = x_T * (1 + sigmas[0] ** 2).sqrt()
    with torch.random.fork_rng():
        torch.manual_seed(3)
        x_sigma = sample_euler_ancestral(denoiser, x_sigma, sigmas, eta=eta, disable=True)
    torch.testing.assert_close(x_sigma / (1 + sigmas[-1] ** 2).sqrt(), expected, rtol=0, atol=1e-4)


def exact_output_law(sampler: Callable, data: GaussianMixture, sigmas: torch.Tensor,
                     **options) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of a deterministic sampler's output for Gaussian `data`, with no sampling error.

    The exact denoiser of Gaussian data is affine in x, so the whole sampler is an affine map x ↦ A x + b:
    running it on 0 and the unit vectors gives b and A, and the start law N(μ, Σ + σ_0² I) maps to
    N(A μ + b, A (Σ + σ_0² I) Aᵀ).
    """
    basis = torch.cat([torch.zeros(1, data.dim), torch.eye(data.dim)]).double()
    out = sampler(data.denoise, basis, sigmas.double(), disable=True, **options)
    offset, matrix = out[0], (out[1:] - out[0]).T
    start_cov = data.covariance + float(sigmas[0]) ** 2 * torch.eye(data.dim, dtype=torch.float64)
    return matrix @ data.mean + offset, matrix @ start_cov @ matrix.T


# (sampler, options, order, steps, largest error at the last step count). Errors measured at 20/40/80 steps:
# Heun 3.5e-2/8.0e-3/1.9e-3, DPM-Solver++(2M) (and 2M SDE at η = 0, the same update) 3.7e-2/8.2e-3/1.9e-3,
# DPM2 2.0e-2/4.7e-3/1.1e-3, Euler 0.22/0.11/5.7e-2, UniPC 1.5e-2/1.7e-3/2.0e-4 (3rd order: a 2nd-order
# predictor with its corrector), LMS 1.6e-2/1.4e-3/1.2e-4 (3rd order or more); DPM-Solver++(3M) SDE at η = 0
# 1.5e-3/4.4e-4/1.2e-4 at 40/80/160 (2nd order on this grid: ratios 3.5, 3.8, as k-diffusion's).
ORDER_CASES = [(sample_heun, {}, 2, (20, 40, 80), 3e-3), (sample_dpmpp_2m, {}, 2, (20, 40, 80), 3e-3),
               (sample_euler_ancestral, {"eta": 0.0}, 1, (20, 40, 80), 7e-2), (sample_euler, {}, 1, (20, 40, 80), 7e-2),
               (sample_dpm2, {}, 2, (20, 40, 80), 2e-3), (sample_lms, {}, 3, (20, 40, 80), 3e-4),
               (sample_unipc, {}, 3, (20, 40, 80), 4e-4), (sample_dpmpp_2m_sde, {"eta": 0.0}, 2, (20, 40, 80), 3e-3),
               (sample_dpmpp_3m_sde, {"eta": 0.0}, 2, (40, 80, 160), 3e-4)]


@pytest.mark.parametrize("sampler, options, order, step_counts, largest_error", ORDER_CASES,
                         ids=[case[0].__name__ for case in ORDER_CASES])
def test_ode_samplers_converge_at_their_order(sampler, options, order, step_counts, largest_error):
    """On Gaussian data the exact law of the output is computable, so the error can be followed to 1e-3 and
    below: doubling the steps divides it by at least 0.8·2^order (exactly 2 for the first-order Euler)."""
    data = DATA["gaussian"]
    sigma_min, sigma_max = 0.03, 15.0
    cov = data.covariance
    if sampler is sample_lms:
        # Its last step integrates the ODE on to σ = 0, whose exact end is the data law itself.
        target_cov = cov
    else:
        # The others output D(x, σ_min) on their last step: the exact covariance is Σ (Σ + σ_min² I)⁻¹ Σ.
        target_cov = cov @ torch.linalg.solve(cov + sigma_min ** 2 * torch.eye(data.dim, dtype=torch.float64), cov)
    errors = []
    for steps in step_counts:
        mean, out_cov = exact_output_law(sampler, data, karras_sigmas(steps, sigma_min, sigma_max), **options)
        errors.append(float((mean - data.mean).norm() + (out_cov - target_cov).norm()))
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert all(0.8 * 2 ** order < r for r in ratios), (errors, ratios)
    if order == 1:
        assert all(r < 1.3 * 2 ** order for r in ratios), (errors, ratios)
    assert errors[-1] < largest_error, errors


# ------------------------------------------------------------------------------------ every process

PROCESSES = {"discrete_vp": lambda: DiscreteVP(SCHEDULES["ldm_linear"]), "continuous_vp": ContinuousVP,
             "edm": EDM, "rectified_flow": RectifiedFlow}
# The prediction each continuous process is trained with here (ε cannot be read at their α = 0).
PROCESS_PREDICTION = {"discrete_vp": "eps", "continuous_vp": "v", "edm": "edm", "rectified_flow": "flow"}


@pytest.mark.parametrize("process_name", list(PROCESSES)[1:])
@pytest.mark.parametrize("parameterization", ["x0", "v", "flow", "edm"])
def test_denoiser_of_the_exact_network_is_the_exact_denoiser(process_name, parameterization):
    """Through any continuous process and prediction, the Bayes-optimal network's D(x_σ, σ) is E[x_0 | x_σ]:
    the process's input scaling, time input and the prediction's c_skip/c_out undo each other exactly."""
    process, data = PROCESSES[process_name](), DATA["mixture"]
    model_fn = ExactModel(data, process, parameterization)
    denoiser = Denoiser(model_fn, process, make_prediction(parameterization))
    sigma = torch.tensor([0.01, 0.3, 1.0, 5.0, 60.0], dtype=torch.float64)
    x_sigma = data.sample(5, torch.Generator().manual_seed(0)) + sigma[:, None] * torch.randn(5, 2, dtype=torch.float64)
    torch.testing.assert_close(denoiser(x_sigma, sigma), data.denoise(x_sigma, sigma), rtol=1e-7, atol=1e-9)


SIGMA_SAMPLER_NAMES = [name for name, info in SAMPLERS.items() if not info.needs_discrete_levels]


@pytest.mark.parametrize("process_name", list(PROCESSES))
@pytest.mark.parametrize("sampler_name", SIGMA_SAMPLER_NAMES)
def test_every_sampler_on_every_process(sampler_name, process_name):
    """Each registered σ-space sampler, on each noise process with its own default σ spacing and the exact
    network of that process, reproduces the mixture (the discrete table snaps σ to its timesteps).

    The continuous processes span σ from 0.001-0.002 to 80-1000 where the table spans 0.03 to 15: over that
    range Heun and DPM-Solver++(2M) at their table step counts leave a covariance bias of 4-5 standard
    errors, so every sampler gets twice the steps there."""
    process, data = PROCESSES[process_name](), DATA["mixture"]
    prediction = PROCESS_PREDICTION[process_name]
    denoiser = Denoiser(ExactModel(data, process, prediction), process, make_prediction(prediction))
    steps = SIGMA_STEPS[sampler_name] * (1 if process.discrete else 2)
    sigmas = make_sigmas(None, steps, process).double()
    generator = torch.Generator().manual_seed(0)
    # The exact start: x_0 + σ_max·ε (the processes' σ_max leave ≤ 0.1 % of x_0 in the input).
    x = data.sample(NUM_SAMPLES, generator) + float(sigmas[0]) * torch.randn(NUM_SAMPLES, 2, generator=generator,
                                                                              dtype=torch.float64)
    samples = SAMPLERS[sampler_name].fn(denoiser, x, sigmas, generator=generator, disable=True)
    assert torch.isfinite(samples).all()
    assert not distribution_failures(samples, data), distribution_failures(samples, data)


@pytest.mark.parametrize("process_name", ["continuous_vp", "rectified_flow"])
def test_heun_steps_along_the_process_time(process_name):
    """On the continuous processes (σ_max 637 and 999, uniform t) Heun steps along t on the process's own
    input (`ODEClock`): 2nd order from 10 steps on, and ahead of Euler at 10. Taken along σ on x_σ instead,
    its first step multiplies the end-point denoiser's error by Δσ/σ_next·α (about 55 on flow) and 10 steps
    miss the law entirely. Errors measured at 10 / 20 / 40 steps: flow 4.8e-3 / 1.1e-3 / 2.6e-4 (along σ: 5.0 / 0.39 /
    0.049), continuous VP 8.0e-3 / 2.1e-3 / 5.4e-4 (along σ: 11 / 0.82 / 0.10); Euler at 10: 0.34 and 0.32."""
    process, data = PROCESSES[process_name](), DATA["gaussian"]
    prediction = PROCESS_PREDICTION[process_name]
    exact = Denoiser(ExactModel(data, process, prediction), process, make_prediction(prediction))

    def error(sampler: Callable, steps: int, denoiser: Callable) -> float:
        sigmas = process.spaced_sigmas(steps).double()
        last = float(sigmas[-2])  # the step to 0 outputs D(x, σ_last): its exact law is Σ (Σ + σ_last² I)⁻¹ Σ
        cov = data.covariance
        target_cov = cov @ torch.linalg.solve(cov + last ** 2 * torch.eye(data.dim, dtype=torch.float64), cov)
        law = GaussianLaw(denoiser, data.mean, cov, data.dim)
        mean, out_cov = exact_output_law(sampler, law, sigmas)
        return float((mean - data.mean).norm() + (out_cov - target_cov).norm())

    errors = [error(sample_heun, steps, exact) for steps in (10, 20, 40)]
    assert errors[0] / errors[1] > 3.2 and errors[1] / errors[2] > 3.2, errors
    assert errors[0] < 0.1 * error(sample_euler, 10, exact), errors
    along_sigma = error(sample_heun, 10, lambda x, sigma: exact(x, sigma))  # a plain function: steps along σ
    assert along_sigma > 100 * errors[0], (along_sigma, errors)


class GaussianLaw:
    """What `exact_output_law` reads of the data, with the denoiser to run."""

    def __init__(self, denoise: Callable, mean: torch.Tensor, covariance: torch.Tensor, dim: int) -> None:
        self.denoise, self.mean, self.covariance, self.dim = denoise, mean, covariance, dim


def test_flow_target_and_velocity_closed_form():
    """Rectified flow on Gaussian data N(μ, s²): the target is ε − x_0, and the Bayes-optimal velocity
    E[ε − x_0 | x_t] of x_t = (1 − t)x_0 + tε is (t·(x_t − (1 − t)μ) − (1 − t)s²·(x_t − (1 − t)μ))/v − μ with
    v = (1 − t)²s² + t² (Gaussian conditioning), which the exact flow network must give."""
    mu, s2 = 0.5, 0.64
    data = GaussianMixture.gaussian([mu], [[s2]])
    process, prediction = RectifiedFlow(), make_prediction("flow")
    x0, noise = torch.tensor([[0.3], [1.2]]), torch.tensor([[-0.7], [0.4]])
    t = torch.tensor([0.25, 0.9])
    torch.testing.assert_close(prediction.target(x0, noise, *process.coefficients(t)), noise - x0)
    torch.testing.assert_close(process.add_noise(x0, noise, t), (1 - t[:, None]) * x0 + t[:, None] * noise)
    t = torch.tensor([0.05, 0.3, 0.6, 0.95], dtype=torch.float64)
    x_t = torch.tensor([[0.1], [-1.0], [0.8], [2.0]], dtype=torch.float64)
    v = (1 - t) ** 2 * s2 + t ** 2
    residual = x_t[:, 0] - (1 - t) * mu
    expected = (t * residual - (1 - t) * s2 * residual) / v - mu
    out = ExactModel(data, process, "flow")(x_t, process.model_time(t))
    torch.testing.assert_close(out[:, 0], expected, rtol=1e-10, atol=1e-10)


def test_continuous_processes_map_levels_and_sigmas_both_ways():
    for process in (ContinuousVP(), RectifiedFlow(), EDM()):
        level = process.level_at_fraction(torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
        sigma = process.sigma(level)
        back, _ = process.level_of_sigma(sigma)
        torch.testing.assert_close(back.double(), level.double(), rtol=1e-5, atol=1e-6)
        alpha, noise_std = process.coefficients(level)
        torch.testing.assert_close((noise_std / alpha).double(), sigma.double(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(process.c_in(sigma).double(), alpha.double(), rtol=1e-5, atol=1e-6)
    # Rectified flow's σ spacing is uniform in t, ending at t = 0.
    sigmas = RectifiedFlow().spaced_sigmas(4)
    t = sigmas / (1 + sigmas)
    torch.testing.assert_close(t.double(), torch.linspace(0.999, 0.0, 5, dtype=torch.float64), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------ denoiser and σ grids

@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_denoiser_matches_the_table_at_table_sigmas(parameterization):
    """At σ = σ_t the σ-space denoiser equals the prediction's x̂_0 at (x_t = x_σ·√ᾱ_t, t) on the table."""
    schedule = SCHEDULES["ldm_linear"]
    t = torch.tensor([0, 1, 17, 500, 998, 999])
    x_t = torch.randn(6, 3, 2, 2, generator=torch.Generator().manual_seed(0))

    def model_fn(x, t):  # an arbitrary, non-linear output: the conversion must not depend on what it is
        return torch.sin(3 * x) + t.reshape(-1, 1, 1, 1) / 1000

    denoiser = vp_denoiser(model_fn, schedule, parameterization)
    sigma = denoiser.process.sigmas[t]
    x_sigma = x_t / schedule.sqrt_alphas_cumprod[t].reshape(-1, 1, 1, 1)
    expected = make_prediction(parameterization).x0(model_fn(x_t, t), x_t, *schedule.coefficients(t))
    torch.testing.assert_close(denoiser(x_sigma, sigma), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_prediction_target_inverts_x0_and_eps(parameterization):
    """For x = αx_0 + σε: x̂_0(target) = x_0, ε̂(target) = ε and output_from_x0(x_0) = target, for any α, σ."""
    prediction = make_prediction(parameterization)
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, dtype=torch.float64, generator=generator), torch.randn(4, 3, dtype=torch.float64,
                                                                                       generator=generator)
    alpha = torch.tensor([0.99, 0.7, 0.3, 0.05], dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.5, 1.2, 0.9], dtype=torch.float64)
    x = alpha[:, None] * x0 + sigma[:, None] * eps
    target = prediction.target(x0, eps, alpha, sigma)
    torch.testing.assert_close(prediction.x0(target, x, alpha, sigma), x0)
    torch.testing.assert_close(prediction.eps(target, x, alpha, sigma), eps)
    torch.testing.assert_close(prediction.output_from_x0(x0, x, alpha, sigma), target)


def test_exact_model_is_the_posterior_mean():
    """E[x_0 | x_t] of the mixture against brute-force Bayes on a fine grid of x_0."""
    data, schedule = DATA["mixture"], SCHEDULES["ldm_linear"]
    grid = torch.linspace(-4, 4, 401, dtype=torch.float64)
    x0 = torch.cartesian_prod(grid, grid)
    log_prior = data.posterior_component_log_probs(x0).logsumexp(dim=1)
    alpha = schedule.alphas_cumprod[300].double()
    x_t = torch.tensor([[0.3, -0.2], [1.0, 0.5], [-0.8, 1.2]], dtype=torch.float64)
    log_joint = log_prior - ((x_t[:, None, :] - alpha.sqrt() * x0) ** 2).sum(-1) / (2 * (1 - alpha))
    expected = torch.softmax(log_joint, dim=1) @ x0
    model_fn = ExactModel(data, schedule, "x0")
    torch.testing.assert_close(model_fn(x_t, torch.full((3,), 300)), expected, rtol=0, atol=1e-6)
    # A batch mixing timesteps gives each row what it gets alone.
    t = torch.tensor([300, 5, 900])
    alone = torch.cat([model_fn(x_t[i:i + 1], t[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(model_fn(x_t, t), alone, rtol=0, atol=1e-12)


def test_sigma_to_t_inverts_the_table():
    process = DiscreteVP(SCHEDULES["ldm_linear"])
    t = torch.arange(1000, dtype=torch.float32)
    torch.testing.assert_close(process.sigma_to_t(process.sigmas).float(), t, rtol=0, atol=1e-3)
    # Outside the table, σ is clamped to its ends; in between, snapped to the nearest timestep in log σ.
    assert process.sigma_to_t(torch.tensor([1e-4, 1e3])).tolist() == [0.0, 999.0]
    geometric_mid = (process.sigmas[10] * process.sigmas[11]).sqrt() * 1.001
    level, sigma = process.level_of_sigma(geometric_mid.reshape(1))
    assert level.tolist() == [11] and sigma.tolist() == [process.sigmas[11].item()]


def test_sigma_grids():
    process = DiscreteVP(SCHEDULES["ldm_linear"])
    sigmas = make_sigmas("uniform", 10, process)
    assert sigmas.shape == (11,) and sigmas[-1] == 0 and (sigmas[1:] < sigmas[:-1]).all()
    torch.testing.assert_close(sigmas[[0, -2]], process.sigmas[[-1, 0]].float())
    rho = 7.0
    k = karras_sigmas(10, 0.03, 14.6, rho=rho)
    assert k.shape == (11,) and k[-1] == 0
    torch.testing.assert_close(k[[0, -2]], torch.tensor([14.6, 0.03]))
    # EDM eq. 5: σ^(1/ρ) is evenly spaced.
    steps = k[:-1].double() ** (1 / rho)
    torch.testing.assert_close(steps.diff(), steps.diff()[:1].expand(9), rtol=1e-5, atol=0)
    e = exponential_sigmas(10, 0.03, 14.6)
    torch.testing.assert_close(e[:-1].double().log().diff(), e[:-1].double().log().diff()[:1].expand(9),
                               rtol=1e-5, atol=0)
    assert make_sigmas(None, 10, process).equal(karras_sigmas(10, process.sigma_min, process.sigma_max))


def test_bad_inputs_are_named():
    denoiser = vp_denoiser(lambda x, t: x, SCHEDULES["ldm_linear"], "eps")
    with pytest.raises(ValueError, match="sigma must have shape"):
        denoiser(torch.zeros(3, 2), torch.ones(()))
    with pytest.raises(ValueError, match="unknown parameterization"):
        make_prediction("score")
    with pytest.raises(ValueError, match="positive int"):
        karras_sigmas(0, 0.1, 10.0)
    with pytest.raises(ValueError, match="sigma_min <= sigma_max"):
        karras_sigmas(5, 10.0, 0.1)
    with pytest.raises(ValueError, match="unknown sigma spacing"):
        make_sigmas("cosine", 5, DiscreteVP(SCHEDULES["ldm_linear"]))
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample_heun(denoiser, torch.zeros(2, 2), torch.tensor([1.0, 2.0, 0.0]), disable=True)
    with pytest.raises(ValueError, match="ε-prediction cannot recover"):
        make_prediction("eps").check_alpha(RectifiedFlow().alpha_min)
