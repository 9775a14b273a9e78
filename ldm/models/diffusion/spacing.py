"""Which noise levels a sampling run visits: σ spacings for the σ-space samplers (`SIGMA_SPACINGS`), the trained
timesteps the reference's samplers visit (`ddim_levels`, `ddpm_levels`), and DDIM's coefficients at them.

DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", sec. 4.2) samples along a subsequence
τ_1 < ... < τ_S of the T training timesteps. The numbers here are the CompVis reference's exactly.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch

from ldm.modules.diffusionmodules.noise_process import DiscreteVP, NoiseProcess

DISCRETIZATIONS = ("uniform", "quad", "trailing")


def make_ddim_timesteps(discr_method: str, num_ddim_timesteps: int, num_ddpm_timesteps: int) -> np.ndarray:
    """The ascending timesteps of a sampling run, as the reference picks them.

    - ``uniform``: every c = T // S steps from 0. There are len(range(0, T, c)) of them, which can be
      **more than S**: S=7 of T=1000 gives c=142 and 8 steps, S=3 gives 4.
    - ``quad``: floor(linspace(0, √(0.8 T), S)²), denser near t=0 (DDIM appendix D.2's quadratic
      subsequence). For large S the first entries repeat; such a step leaves x unchanged.

    Both are shifted by +1, the reference's choice: a run of T=1000 at S=10 visits 901, 801, ..., 1, and
    its last update goes to ᾱ_0 (see `ddim_alphas`). An S whose shifted steps would reach t=T is refused.

    - ``trailing``: round(T − k·T/S) − 1 for k = S−1, …, 0, always ending on the last timestep T − 1
      (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", sec. 3.3 and
      Table 2): T=1000, S=10 visits 999, 899, ..., 99. Sampling must start there, where the model was
      trained on pure noise; a zero-terminal-SNR model is never evaluated at its ᾱ_T = 0 otherwise.
    """
    if isinstance(num_ddim_timesteps, bool) or not isinstance(num_ddim_timesteps, (int, np.integer)):
        raise TypeError(f"the number of sampling steps must be an int, got {num_ddim_timesteps!r}")
    if not 1 <= num_ddim_timesteps <= num_ddpm_timesteps:
        raise ValueError(f"the number of sampling steps must lie in 1..{num_ddpm_timesteps} (the model's "
                         f"timesteps), got {num_ddim_timesteps}")
    if discr_method == "trailing":
        return np.round(num_ddpm_timesteps - np.arange(num_ddim_timesteps) * num_ddpm_timesteps / num_ddim_timesteps
                        ).astype(int)[::-1] - 1
    if discr_method == "uniform":
        steps = np.arange(0, num_ddpm_timesteps, num_ddpm_timesteps // num_ddim_timesteps)
    elif discr_method == "quad":
        steps = (np.linspace(0, np.sqrt(num_ddpm_timesteps * 0.8), num_ddim_timesteps) ** 2).astype(int)
    else:
        raise ValueError(f"unknown ddim_discretize {discr_method!r}; choose one of {', '.join(DISCRETIZATIONS)}")
    steps = steps + 1
    if steps[-1] >= num_ddpm_timesteps:
        # Uniform spacing whose c divides T − 1 (of T=1000: S=3, 9, 27, 36, 37, ..., and every S > 500)
        # reaches t=T after the shift, past the schedule; the reference fails there with an IndexError.
        fits = [n for n in range(num_ddim_timesteps, 0, -1) if (num_ddpm_timesteps - 1) % (num_ddpm_timesteps // n)]
        raise ValueError(f"{discr_method} spacing with {num_ddim_timesteps} steps of {num_ddpm_timesteps} would "
                         f"visit t={steps[-1]}, past the last timestep {num_ddpm_timesteps - 1}; choose another "
                         "number of steps" + (f", e.g. {fits[0]}" if fits else ""))
    return steps


def ddim_sigmas(alphas: torch.Tensor, alphas_prev: torch.Tensor, eta: float) -> torch.Tensor:
    """The std of DDIM's η-noise, η · √((1 − ᾱ_prev)/(1 − ᾱ) · (1 − ᾱ/ᾱ_prev)) (DDIM eq. 16; the reference calls
    it sigma, though it is not a noise level σ).

    η = 0 is the deterministic DDIM sampler; η = 1 is DDPM's ancestral noise, σ² = β̃ between consecutive
    steps. Above 1, 1 − ᾱ_prev − σ² in the update (eq. 12) can turn negative, so η is limited to [0, 1].
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1] (0: deterministic DDIM, 1: DDPM-like noise), got {eta}")
    return eta * ((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev)).sqrt()


def ddim_alphas(alphas_cumprod: torch.Tensor, timesteps: np.ndarray,
                eta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(η-noise std, ᾱ, ᾱ_prev) at each of the ascending `timesteps`, indexed by step position.

    ᾱ_prev is the ᾱ of the next smaller step; at the first position (the last update of a run) it is
    ``alphas_cumprod[0]``, not 1, as in the reference: the run ends on x_0 of the training chain's first
    noise level rather than on clean data.
    """
    index = torch.as_tensor(np.asarray(timesteps), dtype=torch.long, device=alphas_cumprod.device)
    if index.dim() != 1 or index.numel() == 0 or index.min() < 0 or index.max() >= alphas_cumprod.shape[0]:
        raise ValueError(f"timesteps must be a non-empty 1-D array within 0..{alphas_cumprod.shape[0] - 1}, "
                         f"got {np.asarray(timesteps).tolist()}")
    alphas = alphas_cumprod[index]
    alphas_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[index[:-1]]])
    return ddim_sigmas(alphas, alphas_prev, eta), alphas, alphas_prev


def timestep_sigmas(process: DiscreteVP, timesteps: Sequence[int], end: float) -> torch.Tensor:
    """σ of the trained `timesteps` (in the order given, descending), then `end`: the levels of a run over them."""
    levels = torch.as_tensor(np.asarray(timesteps, dtype=np.int64).copy())
    return torch.cat([process.sigmas[levels], torch.tensor([float(end)], dtype=torch.float64)]).float()


def ddim_levels(process: DiscreteVP, steps: int, discretize: Optional[str] = None) -> torch.Tensor:
    """σ at the reference's DDIM timesteps from the highest (`make_ddim_timesteps`; ``trailing`` by default for a
    zero-terminal-SNR table, Lin et al. 2024 sec. 3.3: start at its pure noise, else ``uniform``), then σ of ᾱ_0:
    the reference's last step goes to ᾱ_prev = ᾱ_0, not to clean data."""
    discretize = discretize or ("trailing" if process.schedule.zero_terminal_snr else "uniform")
    timesteps = make_ddim_timesteps(discretize, steps, process.num_timesteps)[::-1]
    return timestep_sigmas(process, timesteps, float(process.sigmas[0]))


def ddpm_levels(process: DiscreteVP, steps: int) -> torch.Tensor:
    """σ at every trained timestep from T − 1 down to 0, then 0 (DDPM's ancestral sampler; `steps` is ignored)."""
    return timestep_sigmas(process, range(process.num_timesteps - 1, -1, -1), 0.0)


# ---------------------------------------------------------------------------------------------- σ spacings

SIGMA_SPACINGS = ("karras", "exponential", "uniform")


def _check_steps(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of sampling steps must be a positive int, got {n!r}")


def _check_range(sigma_min: float, sigma_max: float) -> tuple[float, float]:
    sigma_min, sigma_max = float(sigma_min), float(sigma_max)
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    return sigma_min, sigma_max


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
                  device: Optional[torch.device] = None) -> torch.Tensor:
    """EDM eq. 5: σ_i = (σ_max^(1/ρ) + i/(n−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ for i < n, then σ_n = 0.

    ρ = 7 spends more steps at low noise, where EDM found the truncation error largest. Shape (n + 1,).
    """
    _check_steps(n)
    sigma_min, sigma_max = _check_range(sigma_min, sigma_max)
    if rho <= 0:
        raise ValueError(f"rho must be positive, got {rho}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(device=device, dtype=torch.float32)


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float,
                       device: Optional[torch.device] = None) -> torch.Tensor:
    """σ evenly spaced in log σ from σ_max to σ_min (equal steps in λ = −log σ, as DPM-Solver's "logSNR"
    spacing), then 0. Shape (n + 1,)."""
    _check_steps(n)
    sigma_min, sigma_max = _check_range(sigma_min, sigma_max)
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(device=device, dtype=torch.float32)


def make_sigmas(spacing: Optional[str], n: int, process: NoiseProcess,
                device: Optional[torch.device] = None) -> torch.Tensor:
    """The n + 1 noise levels (ending at 0) of a σ-space run over `process`: ``karras``, ``exponential``, or
    ``uniform`` (evenly spaced along the process's own time: its trained timesteps, or t for continuous
    time); None is the process's default (Karras for VP and EDM, uniform t for rectified flow)."""
    spacing = spacing or process.default_spacing
    if spacing == "karras":
        return karras_sigmas(n, process.sigma_min, process.sigma_max, device=device)
    if spacing == "exponential":
        return exponential_sigmas(n, process.sigma_min, process.sigma_max, device=device)
    if spacing == "uniform":
        _check_steps(n)
        return process.spaced_sigmas(n).to(device)
    raise ValueError(f"unknown sigma spacing {spacing!r}; choose one of {', '.join(SIGMA_SPACINGS)}")
