"""Ancestral sampling of DDPM (Ho et al. 2020, Algorithm 2): x_{t−1} ~ p(x_{t−1} | x_t) from t = T−1 to 0."""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from tqdm import tqdm

from ldm.models.diffusion.noise import Generators, randn
from ldm.modules.diffusionmodules.denoiser import Prediction, as_prediction
from ldm.modules.diffusionmodules.schedule import NoiseSchedule, extract

VARIANCES = ("fixedsmall", "fixedlarge")


def p_mean_variance(schedule: NoiseSchedule, prediction: Union[str, Prediction], model_output: torch.Tensor, x_t: torch.Tensor,
                    t: torch.Tensor, clip_denoised: bool = False,
                    variance: str = "fixedsmall") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, log-variance and x_0 prediction of p(x_{t−1} | x_t).

    The mean is the posterior mean μ̃_t(x̂_0, x_t) (DDPM eq. 7) at the model's x̂_0, clipped to [−1, 1] when
    `clip_denoised` (pixel data). The variance is one of DDPM's two fixed choices (sec. 3.2): σ_t² = β̃_t
    (``fixedsmall``, optimal for deterministic x_0) or σ_t² = β_t (``fixedlarge``, optimal for x_0 ~ N(0, I));
    for ``fixedlarge`` the first entry is β̃_1 rather than β_0, as improved DDPM does, so the last step's
    noise is on the data's scale.
    """
    x0 = as_prediction(prediction).x0(model_output, x_t, *schedule.coefficients(t))
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
    mean, _, log_variance = schedule.q_posterior(x0, x_t, t)
    if variance == "fixedlarge":
        large = torch.cat([schedule.posterior_variance[1:2], schedule.betas[1:]])
        log_variance = extract(torch.log(large), t, x_t.shape)
    elif variance != "fixedsmall":
        raise ValueError(f"unknown variance {variance!r}; choose one of {', '.join(VARIANCES)}")
    return mean, log_variance, x0


@torch.no_grad()
def ancestral_sample(denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], schedule: NoiseSchedule,
                     prediction: Union[str, Prediction], x_T: torch.Tensor, *, clip_denoised: bool = False,
                     variance: str = "fixedsmall", generator: Generators = None,
                     log_every_t: Optional[int] = None, progress: bool = True,
                     callback: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None,
                     mask: Optional[torch.Tensor] = None, x0: Optional[torch.Tensor] = None,
                     ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
    """Run all T reverse steps from `x_T` with `denoiser(x_t, t) -> model output` (guidance included).

    Returns the sample and ``{"x_inter": [...], "pred_x0": [...]}``, the states and x_0 predictions every
    `log_every_t` steps (and at the last step). `callback(t, x_{t−1}, x̂_0)` runs after each step.
    No noise is added at the final step (t = 0), as in Algorithm 2.

    Inpainting (the reference's `p_sample_loop` with `mask`, `x0`): **mask == 1 marks the known region**;
    after each step to x_{t−1} that region is replaced by q(x_{t−1} | x0), and by x0 itself at the end.
    """
    if (mask is None) != (x0 is None):
        raise ValueError("inpainting needs both mask (1 = known) and x0 (the known values)")
    x = x_T
    intermediates: dict[str, list[torch.Tensor]] = {"x_inter": [x], "pred_x0": [x]}
    steps = range(schedule.num_timesteps - 1, -1, -1)
    for i in tqdm(steps, desc="DDPM sampling", total=schedule.num_timesteps, disable=not progress, leave=False):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        mean, log_variance, pred_x0 = p_mean_variance(schedule, prediction, denoiser(x, t), x, t,
                                                      clip_denoised=clip_denoised, variance=variance)
        noise = randn(x.shape, generator, device=x.device, dtype=x.dtype) if i > 0 else 0.0
        x = mean + (0.5 * log_variance).exp() * noise
        if mask is not None:
            known = x0 if i == 0 else schedule.q_sample(
                x0, t - 1, randn(x0.shape, generator, device=x0.device, dtype=x0.dtype))
            x = mask * known + (1.0 - mask) * x
        if callback is not None:
            callback(i, x, pred_x0)
        if log_every_t and (i % log_every_t == 0 or i == 0):
            intermediates["x_inter"].append(x)
            intermediates["pred_x0"].append(pred_x0)
    return x, intermediates
