"""Per-timestep weights on L_simple: ``simple`` (1, DDPM eq. 14) or ``min_snr`` (Hang et al. 2023,
"Efficient Diffusion Training via Min-SNR Weighting Strategy").

Each target's squared error is a multiple of the x_0 error: ||ε − ε̂||² = SNR_t·||x_0 − x̂_0||² and
||v − v̂||² = (SNR_t + 1)·||x_0 − x̂_0||², with SNR_t = ᾱ_t/(1 − ᾱ_t) (Kingma et al. 2021). Min-SNR-γ weights
the x_0 error by min(SNR_t, γ) instead, which on each target's own loss is
  eps: min(SNR_t, γ)/SNR_t,   x0: min(SNR_t, γ),   v: min(SNR_t, γ)/(SNR_t + 1),
so the high-SNR (low-noise) steps, easy and in conflict with the others, no longer dominate the gradient.
γ = 5 is the paper's default.
"""
from __future__ import annotations

import torch

from ldm.modules.diffusionmodules.parameterization import check_parameterization
from ldm.modules.diffusionmodules.schedule import NoiseSchedule

LOSS_WEIGHTINGS = ("simple", "min_snr")


def snr(schedule: NoiseSchedule) -> torch.Tensor:
    """SNR_t = ᾱ_t/(1 − ᾱ_t) = 1/σ_t², float64, shape (T,); 0 where ᾱ_t = 0 (zero terminal SNR).

    From σ_t = √(1/ᾱ_t − 1), which the schedule computed in float64: 1 − ᾱ_t in float32 would cancel for small t.
    """
    return schedule.sqrt_recipm1_alphas_cumprod.double() ** -2


def min_snr_weight(snr_t: torch.Tensor, parameterization: str, gamma: float) -> torch.Tensor:
    """Min-SNR-γ weight on the loss of `parameterization` at signal-to-noise ratios `snr_t` (Hang et al. 2023)."""
    check_parameterization(parameterization)
    if parameterization == "eps":
        # min(SNR, γ)/SNR written as min(1, γ/SNR): the limit 1 at SNR = 0 instead of 0/0.
        return (gamma / snr_t).clamp(max=1.0)
    clamped = snr_t.clamp(max=gamma)
    return clamped if parameterization == "x0" else clamped / (snr_t + 1)


def loss_weights(weighting: str, schedule: NoiseSchedule, parameterization: str,
                 min_snr_gamma: float = 5.0) -> torch.Tensor:
    """The weight of each timestep's L_simple, shape (T,), in the schedule's dtype."""
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"unknown loss_weighting {weighting!r}; choose one of {', '.join(LOSS_WEIGHTINGS)}")
    if not min_snr_gamma > 0:
        raise ValueError(f"min_snr_gamma must be positive, got {min_snr_gamma!r}")
    if weighting == "simple":
        return torch.ones_like(schedule.betas)
    return min_snr_weight(snr(schedule), parameterization, float(min_snr_gamma)).to(schedule.betas.dtype)
