"""Per-example weights on the training loss of the network's output, by noise level.

The squared error of any prediction F is the x_0 error divided by c_out² (`denoiser.py`: x̂_0 = c_skip·x +
c_out·F), so a rule stated as a weight w on the x_0 error is the weight w·c_out² on F's own loss:

- ``simple``: 1 on F's loss (L_simple, DDPM eq. 14, in whatever F predicts);
- ``min_snr``: w = min(SNR, γ) with SNR = α²/σ² (Hang et al. 2023, "Efficient Diffusion Training via
  Min-SNR Weighting Strategy"); on ε's loss min(SNR, γ)/SNR, on v's min(SNR, γ)/(SNR + 1). The high-SNR
  (low-noise) levels, easy and in conflict with the others, no longer dominate. γ = 5 is the paper's default;
- ``edm``: w = λ(s) = (s² + σ_d²)/(s·σ_d)² with s = σ/α (EDM, Karras et al. 2022, sec. 5 and Table 1),
  which makes the loss of EDM's own F unweighted. σ_d is the EDM prediction's, else 1 (unit-variance latents).
"""
from __future__ import annotations

import torch

from ldm.modules.diffusionmodules.denoiser import Prediction

LOSS_WEIGHTINGS = ("simple", "min_snr", "edm")


def check_loss_weighting(weighting: str, min_snr_gamma: float = 5.0) -> str:
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"unknown loss_weighting {weighting!r}; choose one of {', '.join(LOSS_WEIGHTINGS)}")
    if not min_snr_gamma > 0:
        raise ValueError(f"min_snr_gamma must be positive, got {min_snr_gamma!r}")
    return weighting


def loss_weights(weighting: str, prediction: Prediction, alpha: torch.Tensor, sigma: torch.Tensor,
                 min_snr_gamma: float = 5.0) -> torch.Tensor:
    """The weight of each example's loss of F, shape (B,), for inputs x = α·x_0 + σ·ε (α, σ of shape (B,)).

    Computed in float64: c_out² and the SNR span many orders of magnitude over a schedule.
    """
    check_loss_weighting(weighting, min_snr_gamma)
    if weighting == "simple":
        return torch.ones_like(alpha, dtype=torch.float32)
    alpha, sigma = alpha.double(), sigma.double()
    c_out = prediction.scalings(alpha, sigma)[1]
    if weighting == "min_snr":
        return ((alpha ** 2 / sigma ** 2).clamp(max=float(min_snr_gamma)) * c_out ** 2).float()
    sigma_data = getattr(prediction, "sigma_data", 1.0)
    s = sigma / alpha
    return ((s ** 2 + sigma_data ** 2) / (s * sigma_data) ** 2 * c_out ** 2).float()
