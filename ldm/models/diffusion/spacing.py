"""Which DDPM timesteps a DDIM or PLMS run visits, and the DDIM coefficients at them.

DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", sec. 4.2) samples along a subsequence
τ_1 < ... < τ_S of the T training timesteps. The numbers here are the CompVis reference's exactly.
"""
from __future__ import annotations

import numpy as np
import torch

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
    """σ = η · √((1 − ᾱ_prev)/(1 − ᾱ) · (1 − ᾱ/ᾱ_prev)) (DDIM eq. 16).

    η = 0 is the deterministic DDIM sampler; η = 1 is DDPM's ancestral noise, σ² = β̃ between consecutive
    steps. Above 1, 1 − ᾱ_prev − σ² in the update (eq. 12) can turn negative, so η is limited to [0, 1].
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1] (0: deterministic DDIM, 1: DDPM-like noise), got {eta}")
    return eta * ((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev)).sqrt()


def ddim_alphas(alphas_cumprod: torch.Tensor, timesteps: np.ndarray,
                eta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(σ, ᾱ, ᾱ_prev) at each of the ascending `timesteps`, indexed by step position.

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
