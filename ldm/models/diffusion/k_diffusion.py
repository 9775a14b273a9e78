"""Continuous-σ samplers in the style of k-diffusion (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", EDM), for models trained on the discrete DDPM schedule.

The σ view: with σ_t = √((1 − ᾱ_t)/ᾱ_t), the variable x_σ = x_t/√ᾱ_t = x_0 + σ·ε is the data plus noise of
standard deviation σ (the "variance exploding" form of the same process, EDM eq. 1 with s(t) = 1). Every
sampler here works in x_σ and needs only a denoiser D(x_σ, σ) ≈ E[x_0 | x_σ]; `DiscreteDenoiser` builds one
from a model function `model_fn(x_t, t) -> ε | x_0 | v` trained on integer timesteps.

Samplers take x_σ at sigmas[0], i.e. the caller starts from ``x = noise * sigmas[0]`` (k-diffusion's
convention; it neglects the data's own variance next to σ_max²), and return x_σ at sigmas[-1]. With the
usual final σ = 0 that is x_0; at any other σ, x_t = x_σ / √(1 + σ²).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from tqdm import tqdm

from ldm.modules.diffusionmodules.parameterization import check_parameterization
from ldm.modules.diffusionmodules.schedule import NoiseSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# callback(i, x, sigma_i, denoised): the state x_σ before step i, its σ and the denoiser's x̂_0 there.
Callback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


def _per_example(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (B,) tensor reshaped to (B, 1, ..., 1) to broadcast against x."""
    return value.reshape(x.shape[0], *((1,) * (x.dim() - 1)))


def finite_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """A copy of the ascending table σ_t with an infinite last entry (ᾱ_{T−1} = 0, zero terminal SNR) replaced
    by its log-linear extrapolation from the two before, σ_{T−2}²/σ_{T−3} (about 2σ_{T−2}, thousands for
    1000-step schedules rescaled by Lin et al. 2024's Algorithm 1).

    Why a stand-in rather than σ = ∞ handled in each sampler: the samplers start from x = noise·σ_max and
    step along (x − D)/σ, both undefined at ∞, and a special first step would be needed in each of them and
    in every caller. At the stand-in the data is negligible next to the noise, so the model input
    x·c_in = x/√(1 + σ²) is the pure noise it saw at t = T − 1, and (quantized) the first call is made at
    t = T − 1 itself: Lin et al. sec. 3.3's "sample from the last timestep", where a v-model gives E[x_0].
    """
    sigmas = sigmas.clone()
    if torch.isinf(sigmas[-1]):
        if sigmas.shape[0] < 3:
            raise ValueError("a zero-terminal-SNR schedule needs at least 3 timesteps for the σ-space samplers")
        sigmas[-1] = sigmas[-2] ** 2 / sigmas[-3]
    return sigmas


class DiscreteDenoiser:
    """D(x_σ, σ) = x̂_0 from a model trained on the discrete timesteps of `schedule`.

    σ is mapped to a timestep by interpolating log σ linearly over the table σ_t = √((1 − ᾱ_t)/ᾱ_t)
    (k-diffusion's ``DiscreteSchedule.sigma_to_t``). With `quantize` (the default) that timestep is rounded
    to the nearest integer, because the U-Net was trained on integer t only and ``model_fn`` takes int64 t;
    the model then denoises at noise level σ_t, the table entry nearest σ in log space. With
    ``quantize=False`` the fractional t goes to ``model_fn`` as a float tensor (a sinusoidal timestep
    embedding accepts it) and σ itself is the noise level.

    The model's input and output are converted with the preconditioning of EDM Table 1 for a VP model at
    noise level σ (ᾱ = 1/(1 + σ²)): c_in = 1/√(1 + σ²), so x_t = x_σ·√ᾱ, and
      eps: x̂_0 = x_σ − σ·ε̂                  (DDPM eq. 15 divided by √ᾱ)
      x0:  x̂_0 = model output
      v:   x̂_0 = x_σ/(1 + σ²) − σ/√(1 + σ²)·v̂  (Salimans & Ho 2022, appendix D: x_0 = √ᾱ x_t − √(1−ᾱ) v)
    These are `parameterization.to_x0` written with σ instead of a table row, which a fractional t lacks;
    at integer t they coincide with it (checked in tests/test_closed_form_sampling.py).

    Zero terminal SNR (Lin et al. 2024: ᾱ_{T−1} = 0) makes the last σ infinite; the table holds a finite
    stand-in there instead (`finite_sigmas`), so σ_max and every sampler step stay finite.
    """

    def __init__(self, model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], schedule: NoiseSchedule,
                 parameterization: str, quantize: bool = True) -> None:
        self.model_fn = model_fn
        self.parameterization = check_parameterization(parameterization)
        self.quantize = quantize
        # √(1/ᾱ − 1) = √((1 − ᾱ)/ᾱ): the schedule already holds it, computed in float64 before its cast.
        self.sigmas = finite_sigmas(schedule.sqrt_recipm1_alphas_cumprod.detach())
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The fractional timestep whose log σ, interpolated linearly over the table, equals log σ.

        σ outside [σ_min, σ_max] is clamped to the nearest end (t = 0 or T − 1).
        """
        log_sigma = sigma.to(self.log_sigmas).log()
        last = self.log_sigmas.shape[0] - 1
        low = (torch.searchsorted(self.log_sigmas, log_sigma, right=True) - 1).clamp(0, max(last - 1, 0))
        high = (low + 1).clamp(max=last)
        span = self.log_sigmas[high] - self.log_sigmas[low]
        weight = ((log_sigma - self.log_sigmas[low]) / span.where(span > 0, torch.ones_like(span))).clamp(0, 1)
        return (low + weight).to(sigma.device)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """σ at a fractional timestep: log σ interpolated linearly between the neighbouring table entries."""
        t = t.to(self.log_sigmas).clamp(0, self.log_sigmas.shape[0] - 1)
        low = t.floor().long()
        high = t.ceil().long()
        weight = t - low
        return ((1 - weight) * self.log_sigmas[low] + weight * self.log_sigmas[high]).exp()

    def get_sigmas(self, n: int) -> torch.Tensor:
        """n noise levels at timesteps evenly spaced from T − 1 down to 0, then a final 0 (k-diffusion's
        ``DiscreteSchedule.get_sigmas``): the model's own discretisation. Shape (n + 1,)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"the number of sampling steps must be a positive int, got {n!r}")
        t = torch.linspace(self.log_sigmas.shape[0] - 1, 0, n, dtype=self.log_sigmas.dtype,
                           device=self.log_sigmas.device)
        return torch.cat([self.t_to_sigma(t), t.new_zeros(1)])

    def __call__(self, x_sigma: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if sigma.dim() != 1 or sigma.shape[0] != x_sigma.shape[0]:
            raise ValueError(f"sigma must have shape (batch,) = ({x_sigma.shape[0]},), got {tuple(sigma.shape)}; "
                             "pass sigma * x.new_ones(x.shape[0]) for one noise level")
        t = self.sigma_to_t(sigma)
        if self.quantize:
            t = t.round().long()
            sigma = self.sigmas[t.to(self.sigmas.device)].to(sigma.device)
        sigma = _per_example(sigma.to(x_sigma.dtype), x_sigma)
        c_in = (1 + sigma ** 2).rsqrt()  # = √ᾱ at this noise level
        output = self.model_fn(x_sigma * c_in, t)
        if self.parameterization == "eps":
            return x_sigma - sigma * output
        if self.parameterization == "x0":
            return output
        return x_sigma * c_in ** 2 - sigma * c_in * output


def keep_known(denoiser: Denoiser, x0: torch.Tensor, mask: torch.Tensor) -> Denoiser:
    """Inpainting for any sampler here: the denoiser's x̂_0 is x0 wherever **mask == 1 (known)**.

    In x_σ space the samplers step along d = (x − D)/σ; with D = x0 on the known region, x − x0 there
    shrinks in proportion to σ (it stays the known latents plus noise of the current level, as the
    reference's re-noising of the known region does for DDIM), and equals x0 exactly when σ reaches 0.
    """
    if x0.shape[1:] != mask.shape[1:] and mask.shape[1] != 1:
        raise ValueError(f"mask {tuple(mask.shape)} does not fit the known latents {tuple(x0.shape)}")
    return lambda x, sigma: mask * x0 + (1.0 - mask) * denoiser(x, sigma)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
                  device: Optional[torch.device] = None) -> torch.Tensor:
    """EDM eq. 5: σ_i = (σ_max^(1/ρ) + i/(n−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ for i < n, then σ_n = 0.

    ρ = 7 spends more steps at low noise, where EDM found the truncation error largest. Shape (n + 1,).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of sampling steps must be a positive int, got {n!r}")
    sigma_min, sigma_max = float(sigma_min), float(sigma_max)
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if rho <= 0:
        raise ValueError(f"rho must be positive, got {rho}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(device=device, dtype=torch.float32)


def _check_sigmas(sigmas: torch.Tensor) -> None:
    if sigmas.dim() != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"sigmas must be a 1-D tensor of at least 2 noise levels, got shape {tuple(sigmas.shape)}")
    if bool((sigmas[1:] >= sigmas[:-1]).any()) or bool((sigmas < 0).any()):
        raise ValueError("sigmas must be non-negative and strictly decreasing (e.g. karras_sigmas or "
                         "DiscreteDenoiser.get_sigmas)")


def _to_derivative(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """dx/dσ of the probability-flow ODE, (x − D(x, σ))/σ (EDM eq. 3 with σ(t) = t, s(t) = 1)."""
    return (x - denoised) / sigma


def _ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor,
                   eta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ_down, σ_up) for an ancestral step from σ_from to σ_to: a deterministic move to σ_down, then fresh
    noise of std σ_up, with σ_down² + σ_up² = σ_to². σ_up² = η²·σ_to²(σ_from² − σ_to²)/σ_from² is the DDPM
    posterior's variance in σ units (DDIM eq. 16 at η = 1); η = 0 is the deterministic ODE step."""
    if not eta:
        return sigma_to, torch.zeros_like(sigma_to)
    posterior_variance = sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2
    sigma_up = torch.minimum(sigma_to, eta * posterior_variance ** 0.5)
    return (sigma_to ** 2 - sigma_up ** 2) ** 0.5, sigma_up


@torch.no_grad()
def sample_euler_ancestral(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
                           generator: Optional[torch.Generator] = None, eta: float = 1.0,
                           callback: Optional[Callback] = None, disable: bool = False) -> torch.Tensor:
    """Euler steps of the probability-flow ODE to σ_down, then noise of std σ_up (k-diffusion's Euler ancestral):
    an Euler–Maruyama discretisation of the reverse SDE. No noise is added on the step to σ = 0."""
    _check_sigmas(sigmas)
    ones = x.new_ones(x.shape[0])
    for i in tqdm(range(len(sigmas) - 1), desc="Euler ancestral", disable=disable, leave=False):
        denoised = denoiser(x, sigmas[i] * ones)
        if callback is not None:
            callback(i, x, sigmas[i], denoised)
        sigma_down, sigma_up = _ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + _to_derivative(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0 and eta > 0:
            x = x + torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) * sigma_up
    return x


@torch.no_grad()
def sample_heun(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
                callback: Optional[Callback] = None, disable: bool = False) -> torch.Tensor:
    """Heun's 2nd-order method on the probability-flow ODE (EDM Algorithm 1, S_churn = 0): an Euler
    predictor, then the trapezoid of the two slopes; the step to σ = 0 is plain Euler (the slope there
    would divide by 0). 2 denoiser calls per step, 1 on the last."""
    _check_sigmas(sigmas)
    ones = x.new_ones(x.shape[0])
    for i in tqdm(range(len(sigmas) - 1), desc="Heun", disable=disable, leave=False):
        denoised = denoiser(x, sigmas[i] * ones)
        if callback is not None:
            callback(i, x, sigmas[i], denoised)
        d = _to_derivative(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        x_euler = x + d * dt
        if sigmas[i + 1] == 0:
            x = x_euler
        else:
            d_next = _to_derivative(x_euler, sigmas[i + 1], denoiser(x_euler, sigmas[i + 1] * ones))
            x = x + (d + d_next) / 2 * dt
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
                    callback: Optional[Callback] = None, disable: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2), as k-diffusion writes it.

    In λ = −log σ, with h = λ_{i+1} − λ_i, the data-prediction ODE's exact solution step is
    x_{i+1} = (σ_{i+1}/σ_i)·x_i − (e^{−h} − 1)·x̂_0 (DPM-Solver++ eq. 9 with α = 1); the multistep variant
    replaces x̂_0 by a linear extrapolation from the previous step's x̂_0, D = (1 + 1/(2r))·x̂_0^i − 1/(2r)·x̂_0^{i−1}
    with r = h_{i−1}/h_i. The first step and the step to σ = 0 are first order (DDIM).
    """
    _check_sigmas(sigmas)
    ones = x.new_ones(x.shape[0])
    old_denoised: Optional[torch.Tensor] = None
    for i in tqdm(range(len(sigmas) - 1), desc="DPM-Solver++(2M)", disable=disable, leave=False):
        denoised = denoiser(x, sigmas[i] * ones)
        if callback is not None:
            callback(i, x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised  # the limit of the update as σ_{i+1} → 0: ratio 0, −(e^{−∞} − 1) = 1
        else:
            h = math.log(sigmas[i] / sigmas[i + 1])
            if old_denoised is None:
                estimate = denoised
            else:
                r = math.log(sigmas[i - 1] / sigmas[i]) / h
                estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigmas[i + 1] / sigmas[i]) * x - math.expm1(-h) * estimate
        old_denoised = denoised
    return x
