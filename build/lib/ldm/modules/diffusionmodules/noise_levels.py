"""Training noise-level densities: how the noise level of each training example is drawn.

A density draws levels of a noise process (`noise_process.py`): integer timesteps for the discrete VP
table, times or σ for the continuous processes. Configured as ``noise_level_density: uniform`` (a name,
default parameters) or as a mapping with its parameters, e.g. ``{type: logit_normal, mean: 0.0, std: 1.0}``:

- ``uniform``: uniform over the process's own time axis; for the discrete table t ~ U{0, …, T−1}, DDPM's
  (Ho et al. 2020, Algorithm 1) and the reference's draw.
- ``lognormal``: EDM's (Karras et al. 2022, sec. 5, "Loss weighting and sampling"): ln s ~ N(mean, std²),
  defaults −1.2 and 1.2, s = σ/α the process's noise level in σ space (for the discrete table, the
  timestep whose σ_t is nearest in log space).
- ``logit_normal``: Stable Diffusion 3's (Esser et al. 2024, sec. 3.1): u = sigmoid(n), n ~ N(mean, std²),
  defaults 0 and 1, taken as the fraction u of the process's time axis (t = u for rectified flow,
  t = round(u·(T − 1)) for the discrete table).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Optional, Union

import torch

from ldm.config import named_option
from ldm.modules.diffusionmodules.noise_process import NoiseProcess

# Each density's name and the parameters it takes.
DENSITY_PARAMETERS = {"uniform": (), "lognormal": ("mean", "std"), "logit_normal": ("mean", "std")}
NOISE_LEVEL_DENSITIES = tuple(DENSITY_PARAMETERS)


class NoiseLevelDensity:
    """``density(n, device, generator) -> levels``: n noise levels of `process`."""

    def __init__(self, process: NoiseProcess) -> None:
        self.process = process

    def __call__(self, n: int, device: Optional[torch.device] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        raise NotImplementedError


class UniformLevels(NoiseLevelDensity):
    """Uniform over the process's time axis (DDPM Algorithm 1, line 3, for the discrete table)."""

    def __call__(self, n, device=None, generator=None):
        return self.process.uniform_levels(n, device=device, generator=generator)


class LogNormalSigma(NoiseLevelDensity):
    """ln s ~ N(mean, std²) (EDM sec. 5 and Table 1: P_mean = −1.2, P_std = 1.2).

    EDM chose its defaults for data of standard deviation σ_data = 0.5; for unit-variance data (scaled
    latents) the same relative noise levels are ln 2 higher (mean ≈ −0.5). s beyond the process's sampling
    range is clamped to it.
    """

    def __init__(self, process: NoiseProcess, mean: float = -1.2, std: float = 1.2) -> None:
        super().__init__(process)
        _check_normal("lognormal", mean, std)
        self.mean, self.std = float(mean), float(std)

    def __call__(self, n, device=None, generator=None):
        log_sigma = self.mean + self.std * torch.randn(n, device=device, generator=generator, dtype=torch.float64)
        sigma = log_sigma.exp().clamp(self.process.sigma_min, self.process.sigma_max)
        return self.process.level_of_sigma(sigma)[0]


class LogitNormalLevels(NoiseLevelDensity):
    """u = sigmoid(n), n ~ N(mean, std²), as the fraction of the time axis (SD3 sec. 3.1, "Logit-Normal Sampling").

    SD3 draws the time of a rectified flow; on the discrete VP table it favours that table's middle timesteps.
    """

    def __init__(self, process: NoiseProcess, mean: float = 0.0, std: float = 1.0) -> None:
        super().__init__(process)
        _check_normal("logit_normal", mean, std)
        self.mean, self.std = float(mean), float(std)

    def __call__(self, n, device=None, generator=None):
        u = torch.sigmoid(self.mean + self.std * torch.randn(n, device=device, generator=generator,
                                                             dtype=torch.float64))
        return self.process.level_at_fraction(u)


def _check_normal(name: str, mean: float, std: float) -> None:
    if not (isinstance(std, (int, float)) and std > 0) or not isinstance(mean, (int, float)):
        raise ValueError(f"noise_level_density {name} needs a number mean and a positive std, got mean={mean!r}, "
                         f"std={std!r}")


def make_noise_level_density(spec: Union[str, Mapping], process: NoiseProcess) -> NoiseLevelDensity:
    """The density named by `spec` over `process`: a name, or a mapping with `type` and its parameters."""
    name, params = named_option(spec, "noise_level_density")
    if name not in DENSITY_PARAMETERS:
        raise ValueError(f"unknown noise_level_density type {name!r}; choose one of {', '.join(NOISE_LEVEL_DENSITIES)}")
    unknown = sorted(set(params) - set(DENSITY_PARAMETERS[name]))
    if unknown:
        raise ValueError(f"noise_level_density {name} takes {', '.join(DENSITY_PARAMETERS[name]) or 'no parameters'}; "
                         f"got {', '.join(unknown)}")
    if name == "uniform":
        return UniformLevels(process)
    if name == "lognormal":
        return LogNormalSigma(process, **params)
    return LogitNormalLevels(process, **params)
