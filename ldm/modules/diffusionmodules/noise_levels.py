"""Training noise-level densities: how the timestep t of each training example is drawn.

Each density is a callable ``density(n, device) -> t``, t an int64 tensor of n timesteps in [0, T), so
everything indexed by t (the VLB weights, the learned log-variance, the loss weights) works unchanged.
Configured as ``noise_level_density: uniform`` (a name, default parameters) or as a mapping with its
parameters, e.g. ``{type: logit_normal, mean: 0.0, std: 1.0}``:

- ``uniform``: t ~ U{0, …, T−1}, DDPM's (Ho et al. 2020, Algorithm 1) and the reference's draw.
- ``lognormal``: EDM's (Karras et al. 2022, sec. 5, "Loss weighting and sampling"): ln σ ~ N(mean, std²),
  defaults −1.2 and 1.2, mapped to the timestep whose σ_t = √((1 − ᾱ_t)/ᾱ_t) is nearest in log space.
- ``logit_normal``: Stable Diffusion 3's (Esser et al. 2024, sec. 3.1): u = sigmoid(n), n ~ N(mean, std²),
  defaults 0 and 1, mapped to t = round(u·(T − 1)).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Optional, Protocol, Union

import torch

from ldm.modules.diffusionmodules.schedule import NoiseSchedule

# Each density's name and the parameters it takes.
DENSITY_PARAMETERS = {"uniform": (), "lognormal": ("mean", "std"), "logit_normal": ("mean", "std")}
NOISE_LEVEL_DENSITIES = tuple(DENSITY_PARAMETERS)


class NoiseLevelDensity(Protocol):
    """``density(n, device, generator) -> t``: n int64 timesteps in [0, T)."""

    def __call__(self, n: int, device: Optional[torch.device] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor: ...


class UniformTimesteps:
    """t ~ U{0, …, T−1} (DDPM Algorithm 1, line 3); with the global generator, the reference's draw bit for bit."""

    def __init__(self, num_timesteps: int) -> None:
        self.num_timesteps = num_timesteps

    def __call__(self, n: int, device: Optional[torch.device] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return torch.randint(0, self.num_timesteps, (n,), device=device, generator=generator).long()


class LogNormalSigma:
    """ln σ ~ N(mean, std²) (EDM sec. 5 and Table 1: P_mean = −1.2, P_std = 1.2), as the timestep of the
    nearest ln σ_t.

    EDM chose its defaults for data of standard deviation σ_data = 0.5; for unit-variance data (scaled
    latents) the same relative noise levels are ln 2 higher (mean ≈ −0.5). The density puts little mass on
    the highest noise levels: with zero terminal SNR (σ_{T−1} = ∞), t = T − 1 is never drawn.
    """

    def __init__(self, sigmas: torch.Tensor, mean: float = -1.2, std: float = 1.2) -> None:
        _check_normal("lognormal", mean, std)
        self.log_sigmas = sigmas.detach().double().cpu().log()  # ascending in t; +inf last under zero terminal SNR
        self.mean, self.std = float(mean), float(std)

    def __call__(self, n: int, device: Optional[torch.device] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        log_sigma = self.mean + self.std * torch.randn(n, device=device, generator=generator, dtype=torch.float64)
        log_sigmas = self.log_sigmas.to(log_sigma.device)
        above = torch.searchsorted(log_sigmas, log_sigma).clamp(1, len(log_sigmas) - 1)
        below = above - 1
        nearer_above = log_sigmas[above] - log_sigma < log_sigma - log_sigmas[below]
        return torch.where(nearer_above, above, below)


class LogitNormalTimesteps:
    """t = round(sigmoid(n)·(T − 1)), n ~ N(mean, std²) (SD3 sec. 3.1, "Logit-Normal Sampling").

    SD3 draws the time of a rectified flow; here the same density is laid over the discrete VP schedule's
    timestep axis, so the noise levels it favours are those of the middle timesteps of this schedule.
    """

    def __init__(self, num_timesteps: int, mean: float = 0.0, std: float = 1.0) -> None:
        _check_normal("logit_normal", mean, std)
        self.num_timesteps = num_timesteps
        self.mean, self.std = float(mean), float(std)

    def __call__(self, n: int, device: Optional[torch.device] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        u = torch.sigmoid(self.mean + self.std * torch.randn(n, device=device, generator=generator,
                                                             dtype=torch.float64))
        return (u * (self.num_timesteps - 1)).round().long()


def _check_normal(name: str, mean: float, std: float) -> None:
    if not (isinstance(std, (int, float)) and std > 0) or not isinstance(mean, (int, float)):
        raise ValueError(f"noise_level_density {name} needs a number mean and a positive std, got mean={mean!r}, "
                         f"std={std!r}")


def make_noise_level_density(spec: Union[str, Mapping], schedule: NoiseSchedule) -> NoiseLevelDensity:
    """The density named by `spec`: a name, or a mapping with `type` and that density's parameters."""
    if isinstance(spec, str):
        name, params = spec, {}
    elif isinstance(spec, Mapping):
        params = dict(spec)
        name = params.pop("type", None)
    else:
        raise ValueError(f"noise_level_density must be a name or {{type: name, ...}}, got {spec!r}")
    if name not in DENSITY_PARAMETERS:
        raise ValueError(f"unknown noise_level_density type {name!r}; choose one of {', '.join(NOISE_LEVEL_DENSITIES)}")
    unknown = sorted(set(params) - set(DENSITY_PARAMETERS[name]))
    if unknown:
        raise ValueError(f"noise_level_density {name} takes {', '.join(DENSITY_PARAMETERS[name]) or 'no parameters'}; "
                         f"got {', '.join(unknown)}")
    if name == "uniform":
        return UniformTimesteps(schedule.num_timesteps)
    if name == "lognormal":
        return LogNormalSigma(schedule.sqrt_recipm1_alphas_cumprod, **params)
    return LogitNormalTimesteps(schedule.num_timesteps, **params)
