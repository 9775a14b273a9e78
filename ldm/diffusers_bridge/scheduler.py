"""A latent diffusion model's noise schedule and prediction target as diffusers' `DDIMScheduler` config, and back.

Our DDIM sampler (`ldm.models.diffusion.ddim`, Song et al. 2021 eq. 12) and diffusers' DDIMScheduler take
the same steps when the scheduler is configured as Stable Diffusion's: timesteps T//S apart from 0 shifted
by one (``timestep_spacing="leading"``, ``steps_offset=1``; the reference's "uniform" discretisation),
and the last step going to ᾱ_0 rather than 1 (``set_alpha_to_one=False``). A zero-terminal-SNR model
(Lin et al. 2024) samples from t = T-1 with trailing spacing (`ddim_discretize="trailing"` here).

The β schedules are named differently: the reference's "linear" (linear in √β) is diffusers'
"scaled_linear", and its "sqrt_linear" (linear in β) is diffusers' "linear". A schedule with no diffusers
name is written as `trained_betas`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from ldm.diffusers_bridge.common import import_diffusers
from ldm.modules.diffusionmodules.schedule import make_beta_schedule, rescale_zero_terminal_snr

# Our beta_schedule -> diffusers' beta_schedule (the same β_t).
BETA_SCHEDULES = {"linear": "scaled_linear", "sqrt_linear": "linear", "cosine": "squaredcos_cap_v2"}
# Our parameterization -> diffusers' prediction_type.
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def _named_schedule(betas: np.ndarray, linear_start: float, linear_end: float, zero_terminal_snr: bool) -> str | None:
    """Which of our named schedules `betas` is (with these start/end), or None."""
    for name in BETA_SCHEDULES:
        candidate = make_beta_schedule(name, len(betas), linear_start, linear_end)
        if zero_terminal_snr:
            candidate = rescale_zero_terminal_snr(candidate)
        if np.allclose(candidate, betas, rtol=1e-6, atol=1e-9):
            return name
    return None


def ddim_scheduler_config(model: Any) -> dict[str, Any]:
    """The DDIMScheduler config that samples `model` (a LatentDiffusion) as our DDIMSampler does."""
    if not model.process.discrete:
        raise ValueError(f"diffusers' DDIMScheduler steps over the discrete DDPM table; this model's noise process "
                         f"is {model.process.name}")
    if model.parameterization not in PREDICTION_TYPES:
        raise ValueError(f"diffusers' schedulers predict {sorted(PREDICTION_TYPES)}; this model predicts "
                         f"{model.parameterization!r}")
    betas = model.schedule.betas.double().cpu().numpy()
    zero_terminal_snr = bool(model.schedule.alphas_cumprod[-1] == 0)
    config: dict[str, Any] = {
        "num_train_timesteps": len(betas),
        "prediction_type": PREDICTION_TYPES[model.parameterization],
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 0 if zero_terminal_snr else 1,
        "timestep_spacing": "trailing" if zero_terminal_snr else "leading",
        "rescale_betas_zero_snr": zero_terminal_snr,
    }
    name = _named_schedule(betas, model.linear_start, model.linear_end, zero_terminal_snr)
    if name is None:
        config["trained_betas"] = betas.tolist()
        config["rescale_betas_zero_snr"] = False  # the table already is the rescaled one
    else:
        config.update(beta_schedule=BETA_SCHEDULES[name], beta_start=model.linear_start, beta_end=model.linear_end)
    return config


def schedule_params_from_scheduler(config: Mapping[str, Any]) -> dict[str, Any]:
    """The LatentDiffusion params (schedule and parameterization) of a diffusers scheduler config."""
    prediction = {v: k for k, v in PREDICTION_TYPES.items()}.get(config.get("prediction_type", "epsilon"))
    if prediction is None:
        raise ValueError(f"prediction_type {config['prediction_type']!r} has no equivalent here "
                         f"(known: {sorted(PREDICTION_TYPES.values())})")
    params: dict[str, Any] = {"timesteps": config["num_train_timesteps"], "parameterization": prediction}
    if config.get("trained_betas") is not None:
        params["given_betas"] = [float(b) for b in config["trained_betas"]]
        return params
    names = {v: k for k, v in BETA_SCHEDULES.items()}
    if config.get("beta_schedule") not in names:
        raise ValueError(f"beta_schedule {config.get('beta_schedule')!r} has no equivalent here "
                         f"(known: {sorted(names)})")
    params.update(beta_schedule=names[config["beta_schedule"]], linear_start=config["beta_start"],
                  linear_end=config["beta_end"], zero_terminal_snr=bool(config.get("rescale_betas_zero_snr", False)))
    return params


def ddim_scheduler(model: Any) -> Any:
    """diffusers' DDIMScheduler for `model` (see `ddim_scheduler_config`)."""
    return import_diffusers().DDIMScheduler.from_config(ddim_scheduler_config(model))

