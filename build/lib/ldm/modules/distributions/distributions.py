"""Diagonal Gaussian posterior of the KL autoencoder, and the Gaussian KL divergence used by DDPM."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Union

import torch

LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


def normal_kl(mean1: Union[torch.Tensor, float], logvar1: Union[torch.Tensor, float],
              mean2: Union[torch.Tensor, float], logvar2: Union[torch.Tensor, float]) -> torch.Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), broadcasting scalars.

    KL = ½ (log σ2² − log σ1² + (σ1² + (μ1 − μ2)²) / σ2² − 1) (Kingma & Welling 2014, appendix B).
    """
    tensor = next((x for x in (mean1, logvar1, mean2, logvar2) if isinstance(x, torch.Tensor)), None)
    if tensor is None:
        raise TypeError("normal_kl needs at least one tensor argument")
    logvar1, logvar2 = (x if isinstance(x, torch.Tensor) else torch.tensor(x).to(tensor) for x in (logvar1, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


class DiagonalGaussianDistribution:
    """N(mean, diag(exp(logvar))) from `parameters` = cat([mean, logvar], dim=1), as the encoder emits.

    logvar is clamped to [-30, 20] so exp() can neither underflow to a zero std nor overflow.
    With `deterministic`, the std is zero: `sample()` returns the mean and the KL/NLL are zero.
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False) -> None:
        if parameters.dim() < 2 or parameters.shape[1] % 2:
            raise ValueError(
                f"DiagonalGaussianDistribution expects (batch, 2*C, ...) with mean and logvar stacked on dim 1, "
                f"got shape {tuple(parameters.shape)}; the encoder needs double_z=True"
            )
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)
        self.deterministic = deterministic
        if deterministic:
            self.std = torch.zeros_like(self.mean)
            self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """A reparameterised draw mean + std·ε, ε ~ N(0, I) (Kingma & Welling 2014, eq. 10)."""
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def kl(self, other: Optional["DiagonalGaussianDistribution"] = None) -> torch.Tensor:
        """KL(self || other) summed over all non-batch dims, shape (batch,); `other` defaults to N(0, I)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        if other is None:
            kl = normal_kl(self.mean, self.logvar, 0.0, 0.0)
        else:
            kl = normal_kl(self.mean, self.logvar, other.mean, other.logvar)
        return kl.sum(dim=list(range(1, kl.dim())))

    def nll(self, sample: torch.Tensor, dims: Sequence[int] = (1, 2, 3)) -> torch.Tensor:
        """−log N(sample; mean, var) summed over `dims`: ½ Σ (log 2π + logvar + (x − μ)² / var)."""
        if self.deterministic:
            return torch.zeros_like(sample).sum(dim=list(dims))
        log_two_pi = math.log(2.0 * math.pi)
        return 0.5 * torch.sum(log_two_pi + self.logvar + (sample - self.mean) ** 2 / self.var, dim=list(dims))

    def mode(self) -> torch.Tensor:
        return self.mean
