"""The variational bound on −log p(x_0) of a diffusion model, in bits per dimension (DDPM eq. 5).

In the paper's notation (data x_0, latents x_1..x_T): −log p(x_0) ≤ L_T + Σ_{t=2}^{T} L_{t−1} + L_0 with
  L_T     = KL(q(x_T | x_0) || N(0, I))                         (the prior term, no parameters)
  L_{t−1} = KL(q(x_{t−1} | x_t, x_0) || p_θ(x_{t−1} | x_t))     (Gaussian KLs)
  L_0     = −log p_θ(x_0 | x_1)                                 (the decoder)
p_θ(x_{t−1} | x_t) = N(μ̃_t(x̂_0, x_t), σ_t² I): the posterior mean (eq. 7) at the model's x_0 prediction
x̂_0, with σ_t² the fixed posterior variance (DDPM's σ_t² = β̃_t, sec. 3.2; the NLL of Table 1).
Schedule index i is paper step i+1, so the KL term computed at index i ∈ 1..T−1 is L_i, the decoder uses
index 0 and the prior index T−1. The discretized decoder is improved DDPM's (Nichol & Dhariwal 2021;
DDPM eq. 13): 256 bins on [−1, 1] for 8-bit data.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Optional, Union

import torch

from ldm.modules.diffusionmodules.denoiser import Prediction, as_prediction
from ldm.modules.diffusionmodules.schedule import NoiseSchedule
# The Gaussian KL is shared with the autoencoder's posterior; re-exported here as part of this API.
from ldm.modules.distributions.distributions import normal_kl

__all__ = ["normal_kl", "approx_standard_normal_cdf", "discretized_gaussian_log_likelihood", "prior_bpd",
           "variational_bound"]

# Half the width of one of the 256 bins that 8-bit data occupies on [-1, 1].
HALF_BIN = 1.0 / 255.0
# Floor under bin probabilities before the log, so an off-bin mean gives a large but finite NLL.
MIN_PROB = 1e-12


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Φ(x) ≈ ½(1 + tanh(√(2/π)(x + 0.044715 x³))) (Page 1977), accurate to about 2e-4.

    Used (instead of the exact erf) because published diffusion bits/dim (improved DDPM and followers)
    were computed with it, so numbers stay comparable.
    """
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor,
                                        log_scales: torch.Tensor) -> torch.Tensor:
    """Elementwise log P(x) where P is N(means, exp(log_scales)²) integrated over x's 8-bit bin.

    `x` holds 8-bit values scaled to [−1, 1]; bin k spans x_k ± 1/255, and the two edge bins extend to
    ∓∞ so the 256 probabilities sum to 1 (Nichol & Dhariwal 2021; DDPM sec. 3.3 eq. 13).
    """
    if not x.shape == means.shape == log_scales.shape:
        raise ValueError(f"x, means and log_scales must have one shape, got {tuple(x.shape)}, "
                         f"{tuple(means.shape)}, {tuple(log_scales.shape)}")
    if x.min() < -1.0 or x.max() > 1.0:
        raise ValueError("the discretized decoder expects 8-bit data scaled to [-1, 1]; "
                         f"got values in [{x.min().item():.4g}, {x.max().item():.4g}]")
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + HALF_BIN))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - HALF_BIN))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=MIN_PROB))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=MIN_PROB))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=MIN_PROB))
    # The lowest and highest bins (centres ∓1, inner edges ∓1 ± 1/255) take all the mass beyond them.
    return torch.where(x < -1.0 + HALF_BIN, log_cdf_plus,
                       torch.where(x > 1.0 - HALF_BIN, log_one_minus_cdf_min, log_cdf_delta))


def _mean_bits_per_dim(nats: torch.Tensor) -> torch.Tensor:
    """(B, ...) elementwise nats -> (B,) bits per dimension."""
    return nats.flatten(1).mean(dim=1) / math.log(2.0)


def _full_t(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)


def prior_bpd(schedule: NoiseSchedule, x0: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim, shape (B,) (DDPM eq. 5). No parameters: a constant."""
    mean, _, log_variance = schedule.q_mean_variance(x0, _full_t(schedule.num_timesteps - 1, x0))
    return _mean_bits_per_dim(normal_kl(mean, log_variance, 0.0, 0.0))


def _check_timesteps(timesteps: Optional[Sequence[int]], num_timesteps: int) -> list[int]:
    if timesteps is None:
        return list(range(1, num_timesteps))
    steps = [int(t) for t in timesteps]
    if not steps:
        raise ValueError("timesteps is empty; pass None for all of 1..T-1, or a non-empty subset")
    bad = [t for t in steps if not 1 <= t <= num_timesteps - 1]
    if bad:
        raise ValueError(f"timesteps must lie in 1..{num_timesteps - 1} (index 0 is the decoder term L_0 and "
                         f"the prior L_T is exact; both are always included); got {bad[:5]}")
    return steps


def variational_bound(model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], schedule: NoiseSchedule,
                      x0: torch.Tensor, prediction: Union[str, Prediction], *, discretized: bool,
                      timesteps: Optional[Sequence[int]] = None,
                      noise: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """Per-sample variational bound on −log p(x0) in bits/dim (DDPM eq. 5; Table 1's NLL).

    Args:
        model_fn: `model_fn(x_t, t) -> output` in `prediction` (a `Prediction` or its name: "eps", "x0", "v", ...); t is int64 (B,).
            Call this under `torch.no_grad()` unless gradients are wanted.
        x0: data (B, ...). With `discretized`, 8-bit values scaled to [−1, 1].
        discretized: L_0 is the discretized Gaussian NLL of the 256 bins (a bound on the NLL of the 8-bit
            data), else the continuous Gaussian NLL of x0 (a bound on the differential NLL, for latents).
        timesteps: indices in 1..T−1 whose KL terms are computed; default all. For a subset of k indices
            drawn uniformly (with or without replacement), vb_bpd = (T−1)/k · Σ_{t∈subset} L_t is an unbiased
            estimate of Σ_{t=1}^{T−1} L_t, so a few timesteps give a cheap noisy bound.
        noise: ε used to draw every x_t (and x_1 for the decoder), shape of x0; default a fresh draw per t.

    Returns (B,) tensors `total_bpd`, `prior_bpd`, `vb_bpd` (Σ of the KL terms, scaled if a subset),
    `decoder_bpd` and `terms_bpd` (B, len(timesteps)), the KL term of each requested timestep.

    σ_0² = 0 (the posterior at index 0 is a point mass), so the decoder uses σ_1², as improved DDPM's
    clipped log-variance does; every other term uses posterior_log_variance_clipped[t].
    """
    prediction = as_prediction(prediction)
    if schedule.num_timesteps < 2:
        raise ValueError("variational_bound needs a schedule with at least 2 timesteps")
    steps = _check_timesteps(timesteps, schedule.num_timesteps)
    if noise is not None and noise.shape != x0.shape:
        raise ValueError(f"noise must have x0's shape {tuple(x0.shape)}, got {tuple(noise.shape)}")

    def draw(t: int) -> tuple[torch.Tensor, torch.Tensor]:
        t_batch = _full_t(t, x0)
        x_t = schedule.q_sample(x0, t_batch, torch.randn_like(x0) if noise is None else noise)
        return t_batch, x_t

    terms = []
    for t in steps:
        t_batch, x_t = draw(t)
        true_mean, _, true_log_variance = schedule.q_posterior(x0, x_t, t_batch)
        x0_pred = prediction.x0(model_fn(x_t, t_batch), x_t, *schedule.coefficients(t_batch))
        model_mean, _, model_log_variance = schedule.q_posterior(x0_pred, x_t, t_batch)
        terms.append(_mean_bits_per_dim(normal_kl(true_mean, true_log_variance, model_mean, model_log_variance)))
    terms_bpd = torch.stack(terms, dim=1)
    vb_bpd = terms_bpd.sum(dim=1) * ((schedule.num_timesteps - 1) / len(steps))

    t_batch, x_1 = draw(0)
    x0_pred = prediction.x0(model_fn(x_1, t_batch), x_1, *schedule.coefficients(t_batch))
    decoder_mean, _, _ = schedule.q_posterior(x0_pred, x_1, t_batch)
    log_variance = schedule.posterior_log_variance_clipped[1]
    log_scales = (0.5 * log_variance).to(decoder_mean).expand_as(decoder_mean)
    if discretized:
        log_likelihood = discretized_gaussian_log_likelihood(x0, decoder_mean, log_scales)
    else:
        log_likelihood = torch.distributions.Normal(decoder_mean, torch.exp(log_scales)).log_prob(x0)
    decoder_bpd = -_mean_bits_per_dim(log_likelihood)

    prior = prior_bpd(schedule, x0)
    return {"total_bpd": prior + vb_bpd + decoder_bpd, "prior_bpd": prior, "vb_bpd": vb_bpd,
            "decoder_bpd": decoder_bpd, "terms_bpd": terms_bpd}
