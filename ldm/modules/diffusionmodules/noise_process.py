"""Noise processes: how the network's input is made from x_0 and noise, which noise levels exist, and what the
network is told about the level.

Every process gives the network x = α·x_0 + σ·ε at a noise level (its own "level": an integer timestep, a
time in [0, 1], or EDM's σ). Samplers work in the shared variance-exploding view x_s = x/α = x_0 + s·ε with
s = σ/α (EDM eq. 1), so one sampler serves every process; a process maps s back to its level
(`level_of_sigma`), its input scale c_in(s) = α and its time input (`model_time`).

- ``discrete_vp``: the reference's DDPM table (Ho et al. 2020), α = √ᾱ_t, σ = √(1 − ᾱ_t), integer t, the
  network told t. Bit-compatible with the reference's training; samplers snap s to the nearest trained t.
- ``continuous_vp``: the cosine schedule in continuous time (Nichol & Dhariwal 2021, eq. 17 with s = 0),
  α = cos(πt/2), σ = sin(πt/2), t ∈ [0, 1], the network told 1000·t.
- ``edm``: EDM's process (Karras et al. 2022, Table 1): x_0 + s·ε, the network's input normalised by
  c_in = 1/√(s² + σ_d²) (so α = c_in, σ = s·c_in), told c_noise = ¼·ln s.
- ``rectified_flow``: x_t = (1 − t)·x_0 + t·ε (Liu et al. 2023; Esser et al. 2024, SD3 eq. 3), t ∈ [0, 1],
  the network told 1000·t. Sampling starts just short of t = 1 (`SAMPLING_T_MAX`), where s = t/(1 − t) is finite.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple, Optional, Union

import torch

from ldm.config import named_option
from ldm.modules.diffusionmodules.schedule import NoiseSchedule

# Continuous-time processes reach pure noise at t = 1 (s = ∞); σ-space sampling starts at this t instead,
# where the input is ε up to 0.1 % of x_0.
SAMPLING_T_MIN, SAMPLING_T_MAX = 1e-3, 1.0 - 1e-3


class ODEClock(NamedTuple):
    """The variable a second-order ODE step is taken along, at one noise level (EDM eq. 4 with its general s(t),
    σ(t)): the time τ, the state's scale s (the sampler's x_σ is carried as y = s·x_σ) and the log-derivatives
    d ln s/dτ and d ln σ/dτ. In these the probability-flow ODE reads dy/dτ = (d ln s/dτ)·y + (d ln σ/dτ)·(y − s·D).

    Why it matters: Heun's trapezoid gives the slope at the step's end as much weight as at its start, so an
    error in D there is multiplied by the step's length in τ. Along σ with s = 1 (k-diffusion's choice, and
    EDM's for its own process) that is fine for σ_max of 15–80; a flow starting at t = 0.999 (σ = 999) would
    have its first step multiply D's error by about 55 where the process's own t and scale give 0.06.
    """

    time: torch.Tensor
    scale: torch.Tensor
    dlog_scale: torch.Tensor
    dlog_sigma: torch.Tensor

    def slope(self, y: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        """dy/dτ at the scaled state y, given the denoiser's x̂_0 there."""
        return self.dlog_scale * y + self.dlog_sigma * (y - self.scale * denoised)


def sigma_clock(sigma: torch.Tensor) -> ODEClock:
    """Second-order steps along σ itself on x_σ (τ = σ, s = 1): k-diffusion's Heun, EDM Table 1's choice for its
    own process, and what a plain denoiser function D(x, σ) gets."""
    return ODEClock(sigma, torch.ones_like(sigma), torch.zeros_like(sigma), 1 / sigma)


class NoiseProcess:
    """The interface every process implements; levels are 1-D tensors, one per example."""

    name = ""
    discrete = False  # integer levels (timesteps) that index tables: the VLB and a learned log-variance need it
    default_spacing = "karras"  # the σ spacing a sampler uses unless told otherwise (`spacing.py`)
    sigma_min: float
    sigma_max: float  # finite: where σ-space sampling starts
    alpha_min: float  # the smallest α of the input over the levels training draws (0: pure noise is reached)

    def coefficients(self, level: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α, σ) of the network's input at `level`, each (B,)."""
        raise NotImplementedError

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """The network's input α·x_0 + σ·noise."""
        alpha, sigma = self.coefficients(level)
        shape = (x0.shape[0], *((1,) * (x0.dim() - 1)))
        return alpha.reshape(shape).to(x0.dtype) * x0 + sigma.reshape(shape).to(x0.dtype) * noise

    def model_time(self, level: torch.Tensor) -> torch.Tensor:
        """What the network's timestep embedding is given at `level`."""
        raise NotImplementedError

    def sigma(self, level: torch.Tensor) -> torch.Tensor:
        """s = σ/α at `level` (finite stand-in at pure noise)."""
        raise NotImplementedError

    def level_of_sigma(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(level, s at that level) for the σ-space noise levels `sigma`; a discrete process snaps to its table."""
        raise NotImplementedError

    def c_in(self, sigma: torch.Tensor) -> torch.Tensor:
        """α as a function of s: the input is c_in(s)·x_s."""
        raise NotImplementedError

    def ode_clock(self, sigma: torch.Tensor) -> ODEClock:
        """`sigma_clock` by default; processes whose σ reaches the hundreds take their own time instead."""
        return sigma_clock(sigma)

    def level_at_fraction(self, u: torch.Tensor) -> torch.Tensor:
        """The level a fraction u ∈ [0, 1] along the process's own time axis (0 clean, 1 noisiest)."""
        raise NotImplementedError

    def uniform_levels(self, n: int, device: Optional[torch.device] = None,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """n levels uniform over the process's own time axis."""
        u = torch.rand(n, device=device, generator=generator, dtype=torch.float64)
        return self.level_at_fraction(u)

    def spaced_sigmas(self, n: int) -> torch.Tensor:
        """n noise levels s evenly spaced along the process's own time axis from its noisiest, then 0: (n + 1,)."""
        u = torch.linspace(1.0, 0.0, n, dtype=torch.float64)
        return torch.cat([self.sigma(self.level_at_fraction(u)).double(), u.new_zeros(1)]).float()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def finite_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """A copy of the ascending table σ_t with an infinite last entry (ᾱ_{T−1} = 0, zero terminal SNR) replaced
    by its log-linear extrapolation from the two before, σ_{T−2}²/σ_{T−3} (about 2σ_{T−2}).

    Why a stand-in rather than σ = ∞ handled in each sampler: the samplers start from x = noise·σ_max and step
    along (x − D)/σ, both undefined at ∞. At the stand-in the data is negligible next to the noise, so the
    input x·c_in is the pure noise seen at t = T − 1, and the first call is made at t = T − 1 itself (Lin et
    al. 2024, sec. 3.3: "sample from the last timestep").
    """
    sigmas = sigmas.clone()
    if torch.isinf(sigmas[-1]):
        if sigmas.shape[0] < 3:
            raise ValueError("a zero-terminal-SNR schedule needs at least 3 timesteps for the σ-space samplers")
        sigmas[-1] = sigmas[-2] ** 2 / sigmas[-3]
    return sigmas


class DiscreteVP(NoiseProcess):
    """The reference's discrete DDPM process over the T timesteps of `schedule`."""

    name = "discrete_vp"
    discrete = True

    def __init__(self, schedule: NoiseSchedule) -> None:
        self.schedule = schedule
        # √(1/ᾱ − 1) = √((1 − ᾱ)/ᾱ): the schedule already holds it, computed in float64 before its cast.
        # In float64: the nearest timestep in log σ is then decided exactly.
        self.sigmas = finite_sigmas(schedule.sigma_table)
        self.log_sigmas = self.sigmas.log()
        self.sigma_min, self.sigma_max = float(self.sigmas[0]), float(self.sigmas[-1])
        self.alpha_min = schedule.final_sqrt_alpha

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    def coefficients(self, level):
        return self.schedule.coefficients(level)

    def add_noise(self, x0, noise, level):
        return self.schedule.q_sample(x0, level, noise)

    def model_time(self, level):
        return level

    def sigma(self, level):
        return self.sigmas.to(level.device)[level].float()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The fractional timestep whose log σ, interpolated linearly over the table, equals log σ
        (k-diffusion's ``DiscreteSchedule.sigma_to_t``); σ outside the table is clamped to its ends."""
        log_sigma = sigma.detach().cpu().double().log()
        last = self.log_sigmas.shape[0] - 1
        low = (torch.searchsorted(self.log_sigmas, log_sigma, right=True) - 1).clamp(0, max(last - 1, 0))
        high = (low + 1).clamp(max=last)
        span = self.log_sigmas[high] - self.log_sigmas[low]
        weight = ((log_sigma - self.log_sigmas[low]) / span.where(span > 0, torch.ones_like(span))).clamp(0, 1)
        return (low + weight).to(sigma.device)

    def level_of_sigma(self, sigma):
        # The U-Net was trained on integer t only: the nearest t in log σ, and that t's own σ.
        t = self.sigma_to_t(sigma).round().long()
        return t, self.sigmas[t.cpu()].to(sigma.device, sigma.dtype)

    def c_in(self, sigma):
        # In float64, rounded once: the input scale then agrees with the schedule's √ᾱ_t buffer to float32's last bits.
        return (1 + sigma.double() ** 2).rsqrt().to(sigma.dtype)

    def level_at_fraction(self, u):
        return (u * (self.num_timesteps - 1)).round().long()

    def uniform_levels(self, n, device=None, generator=None):
        # DDPM Algorithm 1, line 3; with the global generator, the reference's draw bit for bit.
        return torch.randint(0, self.num_timesteps, (n,), device=device, generator=generator).long()

    def __repr__(self) -> str:
        return f"DiscreteVP(num_timesteps={self.num_timesteps}, zero_terminal_snr={self.schedule.zero_terminal_snr})"


class ContinuousTime(NoiseProcess):
    """A process over t ∈ [0, 1] whose network is told `time_scale`·t (1000: the range the discrete
    models' sinusoidal timestep embedding was made for)."""

    alpha_min = 0.0  # t = 1 is pure noise

    def __init__(self, time_scale: float = 1000.0) -> None:
        if not time_scale > 0:
            raise ValueError(f"time_scale must be positive, got {time_scale}")
        self.time_scale = float(time_scale)
        self.sigma_min = float(self.sigma(torch.tensor([SAMPLING_T_MIN], dtype=torch.float64)))
        self.sigma_max = float(self.sigma(torch.tensor([SAMPLING_T_MAX], dtype=torch.float64)))

    def model_time(self, level):
        return level * self.time_scale

    def level_at_fraction(self, u):
        return u

    def spaced_sigmas(self, n):
        # n equal steps in t from SAMPLING_T_MAX to t = 0 itself (s = 0), the last one included.
        return self.sigma(torch.linspace(SAMPLING_T_MAX, 0.0, n + 1, dtype=torch.float64)).float()


class ContinuousVP(ContinuousTime):
    name = "continuous_vp"

    def coefficients(self, level):
        angle = level * (math.pi / 2)
        return torch.cos(angle), torch.sin(angle)

    def sigma(self, level):
        return torch.tan(level.clamp(max=SAMPLING_T_MAX) * (math.pi / 2))

    def level_of_sigma(self, sigma):
        return torch.atan(sigma) * (2 / math.pi), sigma

    def c_in(self, sigma):
        return (1 + sigma ** 2).rsqrt()

    def ode_clock(self, sigma):
        # τ = t, y = α·x_σ (the process's own input): d ln α/dt = −(π/2)·tan(πt/2), d ln σ/dt = (π/2)(1 + s²)/s.
        half_pi = math.pi / 2
        return ODEClock(torch.atan(sigma) / half_pi, (1 + sigma ** 2).rsqrt(), -half_pi * sigma,
                        half_pi * (1 + sigma ** 2) / sigma)


class RectifiedFlow(ContinuousTime):
    name = "rectified_flow"
    default_spacing = "uniform"  # straight paths: evenly spaced t, as SD3 samples

    def coefficients(self, level):
        return 1 - level, level

    def sigma(self, level):
        level = level.clamp(max=SAMPLING_T_MAX)
        return level / (1 - level)

    def level_of_sigma(self, sigma):
        return sigma / (1 + sigma), sigma

    def c_in(self, sigma):
        return 1 / (1 + sigma)

    def ode_clock(self, sigma):
        # τ = t, y = (1 − t)·x_σ = x_t: the ODE is dx_t/dt = (x_t − D)/t, straight for a single data point.
        return ODEClock(sigma / (1 + sigma), 1 / (1 + sigma), -(1 + sigma), (1 + sigma) ** 2 / sigma)


class EDM(NoiseProcess):
    """EDM's process; levels are σ itself, in [sigma_min, sigma_max] (EDM's 0.002 and 80 by default)."""

    name = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 1.0,
                 rho: float = 7.0) -> None:
        if not 0 < sigma_min < sigma_max or not sigma_data > 0:
            raise ValueError(f"edm needs 0 < sigma_min < sigma_max and sigma_data > 0, got {sigma_min}, {sigma_max}, "
                             f"{sigma_data}")
        self.sigma_min, self.sigma_max, self.sigma_data, self.rho = (float(sigma_min), float(sigma_max),
                                                                      float(sigma_data), float(rho))
        self.alpha_min = 1 / math.sqrt(sigma_max ** 2 + sigma_data ** 2)

    def coefficients(self, level):
        c_in = self.c_in(level)
        return c_in, level * c_in

    def model_time(self, level):
        return 0.25 * level.log()

    def sigma(self, level):
        return level

    def level_of_sigma(self, sigma):
        return sigma, sigma

    def c_in(self, sigma):
        return (sigma ** 2 + self.sigma_data ** 2).rsqrt()

    def level_at_fraction(self, u):
        # EDM eq. 5's ρ-spacing, u = 1 at σ_max.
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return (lo + u * (hi - lo)) ** self.rho

    def __repr__(self) -> str:
        return f"EDM(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, sigma_data={self.sigma_data})"


NOISE_PROCESSES = {cls.name: cls for cls in (DiscreteVP, ContinuousVP, EDM, RectifiedFlow)}


def make_noise_process(spec: Union[str, Mapping, None], schedule: NoiseSchedule) -> NoiseProcess:
    """The process named by `spec` (a name or ``{type: name, ...params}``); `discrete_vp` uses `schedule`."""
    name, params = named_option(spec or "discrete_vp", "noise_process")
    if name not in NOISE_PROCESSES:
        raise ValueError(f"unknown noise_process {name!r}; choose one of {', '.join(NOISE_PROCESSES)}")
    if name == "discrete_vp":
        if params:
            raise ValueError(f"noise_process discrete_vp takes its table from the model's schedule options "
                             f"(timesteps, beta_schedule, ...), not {', '.join(sorted(params))}")
        return DiscreteVP(schedule)
    try:
        return NOISE_PROCESSES[name](**params)
    except TypeError as e:
        raise ValueError(f"noise_process {name}: {e}") from None
