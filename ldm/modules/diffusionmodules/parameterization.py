"""What the denoising network predicts, and conversions between its output, x_0 and ε.

- ``eps``: the noise ε that produced x_t (DDPM, Ho et al. 2020, eq. 12/14).
- ``x0``: the clean sample x_0 itself.
- ``v``: v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 (Salimans & Ho 2022, sec. 4), the velocity of the rotation
  x_t = cos φ x_0 + sin φ ε; well scaled at both ends of the chain.

All functions take the parameterization name first and a `NoiseSchedule`, so training losses and every
sampler share one definition of each conversion.
"""
from __future__ import annotations

import torch

from ldm.modules.diffusionmodules.schedule import NoiseSchedule

PARAMETERIZATIONS = ("eps", "x0", "v")


def check_parameterization(parameterization: str) -> str:
    """`parameterization` unchanged if it is one of PARAMETERIZATIONS, else a ValueError naming them."""
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {parameterization!r}; "
                         f"choose one of {', '.join(repr(p) for p in PARAMETERIZATIONS)}")
    return parameterization


def check_terminal_snr(parameterization: str, schedule: NoiseSchedule) -> None:
    """Refuse ε-prediction on a schedule that ends at ᾱ_T = 0 (zero terminal SNR, Lin et al. 2024, sec. 3.2).

    There x_T = ε exactly: an ε-model's output holds no information about x_0, and x_0 = (x_T − ε)/√ᾱ_T
    (DDPM eq. 15) divides by 0; v and x_0 still determine x_0 there (x_0 = −v at ᾱ = 0).
    """
    if check_parameterization(parameterization) == "eps" and schedule.zero_terminal_snr:
        raise ValueError("zero_terminal_snr (ᾱ_T = 0) needs parameterization 'v' or 'x0', got 'eps': "
                         "ε-prediction cannot recover x_0 from pure noise")


def training_target(parameterization: str, schedule: NoiseSchedule, x0: torch.Tensor, noise: torch.Tensor,
                    t: torch.Tensor) -> torch.Tensor:
    """What the model should output for x_t = q_sample(x0, t, noise): ε, x_0 or v."""
    if check_parameterization(parameterization) == "eps":
        return noise
    if parameterization == "x0":
        return x0
    return schedule.get_v(x0, noise, t)


def to_x0(parameterization: str, schedule: NoiseSchedule, model_output: torch.Tensor, x_t: torch.Tensor,
          t: torch.Tensor) -> torch.Tensor:
    """The x_0 prediction implied by `model_output` at (x_t, t)."""
    if check_parameterization(parameterization) == "eps":
        return schedule.predict_start_from_noise(x_t, t, model_output)
    if parameterization == "x0":
        return model_output
    return schedule.predict_start_from_v(x_t, t, model_output)


def to_eps(parameterization: str, schedule: NoiseSchedule, model_output: torch.Tensor, x_t: torch.Tensor,
           t: torch.Tensor) -> torch.Tensor:
    """The ε prediction implied by `model_output` at (x_t, t)."""
    if check_parameterization(parameterization) == "eps":
        return model_output
    if parameterization == "x0":
        return schedule.predict_noise_from_start(x_t, t, model_output)
    return schedule.predict_noise_from_v(x_t, t, model_output)


def from_x0_eps(parameterization: str, schedule: NoiseSchedule, x0: torch.Tensor, eps: torch.Tensor,
                x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The model output that corresponds to the pair (x0, eps) at (x_t, t), e.g. after a sampler edits x_0.

    The inverse of (`to_x0`, `to_eps`). None of the three outputs needs x_t given both x_0 and ε; it is
    part of the signature so all conversions share one call shape, and is checked to match x0's shape.
    """
    check_parameterization(parameterization)
    if not x0.shape == eps.shape == x_t.shape:
        raise ValueError(f"x0, eps and x_t must have one shape, got {tuple(x0.shape)}, {tuple(eps.shape)}, "
                         f"{tuple(x_t.shape)}")
    if parameterization == "eps":
        return eps
    if parameterization == "x0":
        return x0
    return schedule.get_v(x0, eps, t)
