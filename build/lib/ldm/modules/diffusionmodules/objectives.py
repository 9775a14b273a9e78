"""Training losses of the diffusion model: the simple loss, the VLB weights and the learned log-variance."""
from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F

from ldm.modules.diffusionmodules.denoiser import Prediction, as_prediction
from ldm.modules.diffusionmodules.schedule import NoiseSchedule

LOSS_TYPES = ("l1", "l2")


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str) -> torch.Tensor:
    """|target − pred| (``l1``) or (target − pred)² (``l2``) per element, no reduction."""
    if pred.shape != target.shape:
        # Broadcasting here would silently average a wrong loss (e.g. (B,C,H,W) against (B,1,H,W)).
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if loss_type == "l1":
        return (target - pred).abs()
    if loss_type == "l2":
        return F.mse_loss(target, pred, reduction="none")
    raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")


def vlb_weights(schedule: NoiseSchedule, prediction: Union[str, Prediction]) -> torch.Tensor:
    """λ_t such that the VLB term L_{t−1} = λ_t · ||output − target||² (summed over elements), shape (T,).

    With σ_t² = posterior_variance fixed, L_{t−1} = ||μ̃_t − μ_θ||² / (2σ_t²) (DDPM eq. 8), and
    μ = coef1 · x_0 + coef2 · x_t (eq. 7) is linear in the x_0 prediction, which is linear in the model
    output with slope c_out (`denoiser.py`): −√(1/ᾱ_t − 1) for ε (eq. 15), 1 for x_0 and −√(1 − ᾱ_t) for v.
    So λ_t = (coef1 · c_out)² / (2σ_t²), i.e. β_t² / (2σ_t² α_t (1 − ᾱ_t)) for ε (DDPM eq. 12). (The
    reference's x_0 weight, 0.5·√ᾱ_t / (2·1 − ᾱ_t), has an operator-precedence bug and is not this.)

    Computed in float64 from buffers that were themselves computed in float64: writing ε's weight with
    1 − ᾱ_t would cancel catastrophically in float32 for small t. σ_0² = 0 makes λ_0 infinite; as the
    reference, entry 0 is set to entry 1.
    """
    if schedule.num_timesteps < 2:
        raise ValueError("vlb_weights needs at least 2 timesteps (entry 0 is copied from entry 1)")
    coef1 = schedule.posterior_mean_coef1.double()
    c_out = as_prediction(prediction).scalings(schedule.sqrt_alphas_cumprod.double(),
                                schedule.sqrt_one_minus_alphas_cumprod.double())[1]
    weights = (coef1 * c_out) ** 2 / (2 * schedule.posterior_variance.double())
    weights[0] = weights[1]
    return weights.to(schedule.betas.dtype)


def reweight_by_logvar(loss_simple_per_sample: torch.Tensor, logvar_t: torch.Tensor) -> torch.Tensor:
    """loss / exp(logvar_t) + logvar_t: the reference's learned per-timestep log-variance weighting.

    This is (twice) the negative log-likelihood of the loss under a learned scale exp(logvar_t), as in
    Kendall & Gal 2018; for a fixed loss L it is minimised at logvar_t = log L, so learning logvar_t
    equalises the loss scale across timesteps. With logvar_t = 0 (the reference default) it is the loss.
    """
    return loss_simple_per_sample / torch.exp(logvar_t) + logvar_t
