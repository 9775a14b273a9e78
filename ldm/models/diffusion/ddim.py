"""DDIM sampling (Song et al. 2021, "Denoising Diffusion Implicit Models") with the CompVis reference's API.

`DDIMSampler(model).sample(S, batch_size, shape, conditioning, ...)` reproduces the reference's
trajectories. `ddim_update` is the one update step, shared with PLMS (`plms.py`). Beyond the reference:
any prediction (ε, x_0, v, flow, EDM: `ldm.modules.diffusionmodules.denoiser`), x̂_0 clipping, Imagen's dynamic
thresholding, and pasting the known region back exactly at the end of inpainting (`keep_known_exact`).
The sampler's tensors live on the model's schedule device; nothing is moved to CUDA.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from tqdm import tqdm

from ldm.models.diffusion.guidance import Condition, guided_model
from ldm.models.diffusion.noise import Generators, randn
from ldm.models.diffusion.spacing import ddim_alphas, ddim_sigmas, make_ddim_timesteps
from ldm.modules.diffusionmodules.denoiser import Prediction, X0Prediction, as_prediction
from ldm.modules.diffusionmodules.schedule import NoiseSchedule, extract

log = logging.getLogger(__name__)

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
X0Fn = Callable[[torch.Tensor], torch.Tensor]
# step(x, t, t_next, ᾱ_prev, σ, noise) -> (x_prev, x̂_0)
StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]],
                  tuple[torch.Tensor, torch.Tensor]]


def dynamic_threshold_x0(x0: torch.Tensor, percentile: float) -> torch.Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3) of an x_0 prediction.

    s is the `percentile` quantile (e.g. 0.995) of |x̂_0| per sample, at least 1; x̂_0 is clipped to
    [−s, s] and divided by s, which pushes saturated values inwards instead of flattening them at ±1.
    """
    if not 0.0 < percentile <= 1.0:
        raise ValueError(f"dynamic_threshold is a quantile in (0, 1], e.g. 0.995, got {percentile}")
    s = x0.detach().abs().flatten(1).float().quantile(percentile, dim=1).clamp(min=1.0).to(x0.dtype)
    s = s.reshape(-1, *([1] * (x0.dim() - 1)))
    return x0.clamp(-s, s) / s


def ddim_update(schedule: NoiseSchedule, prediction: Union[str, Prediction], model_output: torch.Tensor, x: torch.Tensor,
                t: torch.Tensor, alpha_prev: torch.Tensor, sigma: torch.Tensor, noise: Optional[torch.Tensor] = None,
                x0_fn: Optional[X0Fn] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step from x_t (DDIM eq. 12); returns (x_prev, x̂_0).

    x_prev = √ᾱ_prev · x̂_0 + √(1 − ᾱ_prev − σ²) · ε̂ + σ · noise, with x̂_0 and ε̂ read from the model
    output at (x, t). `noise` (None for none) is the already scaled standard normal draw. `x0_fn` edits x̂_0
    (clipping, thresholding); ε̂ is then re-derived from the edited x̂_0 so the pair still reconstructs x_t.
    """
    prediction = as_prediction(prediction)
    alpha, sigma_t = schedule.coefficients(t)
    pred_x0 = prediction.x0(model_output, x, alpha, sigma_t)
    eps = prediction.eps(model_output, x, alpha, sigma_t)
    if x0_fn is not None:
        pred_x0 = x0_fn(pred_x0)
        eps = X0Prediction().eps(pred_x0, x, alpha, sigma_t)
    x_prev = alpha_prev.sqrt() * pred_x0 + (1.0 - alpha_prev - sigma ** 2).sqrt() * eps
    if noise is not None:
        x_prev = x_prev + sigma * noise
    return x_prev, pred_x0


def _batch_size_of(cond: Condition) -> Optional[int]:
    """The batch size of a condition (a tensor, or the first tensor in a list/dict), None if it has none."""
    if isinstance(cond, torch.Tensor):
        return cond.shape[0]
    items = cond.values() if isinstance(cond, dict) else cond if isinstance(cond, (list, tuple)) else ()
    for item in items:
        size = _batch_size_of(item)
        if size is not None:
            return size
    return None


class DDIMSampler:
    """The reference's DDIM sampler for a diffusion model.

    The model needs `apply_model(x, t, cond)`, `schedule` (a `NoiseSchedule`), `prediction` and
    `num_timesteps`, as `LatentDiffusion` has, and the discrete VP noise process (DDIM steps over its table). `schedule` is the reference's argument, unused there as
    here (the noise schedule is the model's); it is kept so the reference's calls work.
    """

    name = "DDIM"

    def __init__(self, model: Any, schedule: str = "linear") -> None:
        process = getattr(model, "process", None)
        if process is not None and not process.discrete:
            raise ValueError(f"{self.name} steps over the discrete DDPM table; this model's noise process is "
                             f"{process.name}: use a σ-space sampler (euler, heun, dpmpp_2m, ...)")
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps
        self.schedule = schedule
        self.ddim_timesteps: Optional[np.ndarray] = None

    # ------------------------------------------------------------------------------------ schedule

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        """Pick the timesteps and their coefficients: `ddim_timesteps` (ascending), and `ddim_alphas`,
        `ddim_alphas_prev`, `ddim_sigmas`, `ddim_sqrt_one_minus_alphas` indexed by step position."""
        alphas_cumprod = self.model.schedule.alphas_cumprod
        if alphas_cumprod.shape[0] != self.ddpm_num_timesteps:
            raise ValueError(f"the model's schedule has {alphas_cumprod.shape[0]} alphas but num_timesteps is "
                             f"{self.ddpm_num_timesteps}; they must agree")
        self.ddim_timesteps = make_ddim_timesteps(ddim_discretize, ddim_num_steps, self.ddpm_num_timesteps)
        self.ddim_sigmas, self.ddim_alphas, self.ddim_alphas_prev = ddim_alphas(alphas_cumprod, self.ddim_timesteps,
                                                                                ddim_eta)
        self.ddim_sqrt_one_minus_alphas = (1.0 - self.ddim_alphas).sqrt()
        # With use_original_steps (all T steps), the last update goes to ᾱ = 1, as in the reference.
        self.ddim_sigmas_for_original_num_steps = ddim_sigmas(alphas_cumprod, self.model.schedule.alphas_cumprod_prev,
                                                              ddim_eta)
        if verbose:
            log.info(f"Selected timesteps for {self.name.lower()} sampler: {self.ddim_timesteps}")

    # ------------------------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape: Sequence[int], conditioning: Condition = None,
               callback: Optional[Callable[[int], None]] = None, normals_sequence: Any = None,
               img_callback: Optional[Callable[[torch.Tensor, int], None]] = None, quantize_x0: bool = False,
               eta: float = 0.0, mask: Optional[torch.Tensor] = None, x0: Optional[torch.Tensor] = None,
               temperature: float = 1.0, noise_dropout: float = 0.0, score_corrector: Any = None,
               corrector_kwargs: Optional[dict] = None, verbose: bool = True, x_T: Optional[torch.Tensor] = None,
               log_every_t: int = 100, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Condition = None, ddim_discretize: str = "uniform", *,
               clip_denoised: bool = False, dynamic_threshold: Optional[float] = None,
               keep_known_exact: bool = True, generator: Generators = None,
               ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Samples of shape (batch_size, *shape) and ``{'x_inter': [...], 'pred_x0': [...]}``, as the reference.

        The intermediates start with x_T and hold x and x̂_0 after every `log_every_t`-th step (counted
        down to the end) and after the first. `callback(i)` and `img_callback(x̂_0, i)` run after step i.

        Inpainting: with `mask` and `x0`, **mask == 1 marks the known region**: before each step at t the
        known region of x is replaced by q_sample(x0, t) (the reference). `keep_known_exact` (not in the
        reference) then sets the final sample's known region to x0 exactly.

        Beyond the reference: `clip_denoised` clips x̂_0 to [−1, 1] and `dynamic_threshold` (a quantile,
        e.g. 0.995) applies Imagen's dynamic thresholding, both before the update (see `ddim_update`).
        The reference's `quantize_x0`, `score_corrector`/`corrector_kwargs` and `normals_sequence` are not
        supported and raise.
        """
        for option, value, default in (("quantize_x0", quantize_x0, False), ("score_corrector", score_corrector, None),
                                       ("corrector_kwargs", corrector_kwargs, None),
                                       ("normals_sequence", normals_sequence, None)):
            if value is not None and value is not False:
                raise ValueError(f"{option} is not supported by this {self.name} sampler; leave it at {default}")
        if (mask is None) != (x0 is None):
            raise ValueError("inpainting needs both mask (1 = known) and x0 (the known latents); got only "
                             f"{'mask' if x0 is None else 'x0'}")
        if log_every_t < 1:
            raise ValueError(f"log_every_t must be a positive number of steps, got {log_every_t}")
        size = (batch_size, *shape)
        cond_batch = _batch_size_of(conditioning)
        if cond_batch is not None and cond_batch != batch_size:
            raise ValueError(f"got {cond_batch} conditionings for batch_size {batch_size}; they must agree")
        if x_T is not None and tuple(x_T.shape) != size:
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected (batch_size, *shape) = {size}")
        self.make_schedule(ddim_num_steps=S, ddim_discretize=ddim_discretize, ddim_eta=eta, verbose=verbose)
        if verbose:
            log.info(f"Data shape for {self.name} sampling is {size}, eta {eta}")
        x = randn(size, generator, device=self.ddim_alphas.device) if x_T is None else x_T
        samples, intermediates = self._denoise(
            x, conditioning, self.ddim_timesteps, self.ddim_alphas_prev, self.ddim_sigmas,
            unconditional_conditioning, unconditional_guidance_scale, mask=mask, x0=x0, callback=callback,
            img_callback=img_callback, log_every_t=log_every_t, temperature=temperature, noise_dropout=noise_dropout,
            x0_fn=self._x0_fn(clip_denoised, dynamic_threshold), progress=verbose, desc=f"{self.name} Sampler",
            generator=generator)
        if mask is not None and keep_known_exact:
            samples = x0 * mask + (1.0 - mask) * samples
        return samples, intermediates

    @torch.no_grad()
    def stochastic_encode(self, x0: torch.Tensor, t: torch.Tensor, use_original_steps: bool = False,
                          noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x0 noised to step position `t` of this schedule (a DDPM timestep with `use_original_steps`):
        a draw from q(x_t | x_0) (DDPM eq. 4), for img2img. Call `make_schedule` first."""
        if use_original_steps:
            sqrt_alphas = self.model.schedule.sqrt_alphas_cumprod
            sqrt_one_minus_alphas = self.model.schedule.sqrt_one_minus_alphas_cumprod
        else:
            self._require_schedule("stochastic_encode")
            sqrt_alphas, sqrt_one_minus_alphas = self.ddim_alphas.sqrt(), self.ddim_sqrt_one_minus_alphas
        t = torch.as_tensor(t, device=x0.device).long().expand(x0.shape[0])
        if t.min() < 0 or t.max() >= sqrt_alphas.shape[0]:
            raise ValueError(f"t must index the {sqrt_alphas.shape[0]} steps (0..{sqrt_alphas.shape[0] - 1}), "
                             f"got {t.tolist()}")
        noise = torch.randn_like(x0) if noise is None else noise
        return extract(sqrt_alphas, t, x0.shape) * x0 + extract(sqrt_one_minus_alphas, t, x0.shape) * noise

    @torch.no_grad()
    def decode(self, x_latent: torch.Tensor, cond: Condition, t_start: int, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Condition = None, use_original_steps: bool = False,
               progress: bool = True) -> torch.Tensor:
        """Denoise `x_latent` through the first `t_start` steps of the schedule, from the highest down (img2img).

        As the reference's img2img script, pair it with ``stochastic_encode(x0, t_enc)`` and
        ``t_start=t_enc``; note that the encoding is then one step noisier than where decoding starts
        (the reference's convention, kept for identical results).
        """
        if use_original_steps:
            timesteps = np.arange(self.ddpm_num_timesteps)
            alphas_prev, sigmas = self.model.schedule.alphas_cumprod_prev, self.ddim_sigmas_for_original_num_steps
        else:
            self._require_schedule("decode")
            timesteps, alphas_prev, sigmas = self.ddim_timesteps, self.ddim_alphas_prev, self.ddim_sigmas
        if not 0 <= t_start <= len(timesteps):
            raise ValueError(f"t_start must lie in 0..{len(timesteps)} (the number of steps), got {t_start}")
        samples, _ = self._denoise(x_latent, cond, timesteps[:t_start], alphas_prev, sigmas, unconditional_conditioning,
                                   unconditional_guidance_scale, progress=progress, desc="Decoding image")
        return samples

    # ------------------------------------------------------------------------------------ internals

    def _require_schedule(self, caller: str) -> None:
        if self.ddim_timesteps is None:
            raise RuntimeError(f"{caller} needs the sampling schedule: call make_schedule(ddim_num_steps, ...) first")

    @staticmethod
    def _x0_fn(clip_denoised: bool, dynamic_threshold: Optional[float]) -> Optional[X0Fn]:
        """The edit applied to every x̂_0: dynamic thresholding and/or clipping to [−1, 1], or None."""
        if dynamic_threshold is None and not clip_denoised:
            return None

        def edit(x0: torch.Tensor) -> torch.Tensor:
            if dynamic_threshold is not None:
                x0 = dynamic_threshold_x0(x0, dynamic_threshold)
            return x0.clamp(-1.0, 1.0) if clip_denoised else x0
        return edit

    def _make_step(self, model_output: ModelFn, x0_fn: Optional[X0Fn]) -> StepFn:
        """A fresh step function for one run (PLMS overrides this; its steps keep state)."""
        def step(x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, alpha_prev: torch.Tensor,
                 sigma: torch.Tensor, noise: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            return ddim_update(self.model.schedule, self.model.prediction, model_output(x, t), x, t,
                               alpha_prev, sigma, noise, x0_fn)
        return step

    def _denoise(self, x: torch.Tensor, cond: Condition, timesteps: np.ndarray, alphas_prev: torch.Tensor,
                 sigmas: torch.Tensor, uncond: Condition, scale: float, *, mask: Optional[torch.Tensor] = None,
                 x0: Optional[torch.Tensor] = None, callback: Optional[Callable[[int], None]] = None,
                 img_callback: Optional[Callable[[torch.Tensor, int], None]] = None, log_every_t: int = 100,
                 temperature: float = 1.0, noise_dropout: float = 0.0, x0_fn: Optional[X0Fn] = None,
                 progress: bool = True, desc: str = "", generator: Generators = None,
                 ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """The sampling loop over the ascending `timesteps`, run from the highest; coefficients by position."""
        model_output = guided_model(self.model.apply_model, cond, uncond, scale)
        step = self._make_step(model_output, x0_fn)
        schedule = self.model.schedule
        time_range = np.flip(timesteps)
        total = len(time_range)
        intermediates = {"x_inter": [x], "pred_x0": [x]}
        for i, timestep in enumerate(tqdm(time_range, desc=desc, total=total, disable=not progress)):
            index = total - i - 1
            t = torch.full((x.shape[0],), int(timestep), device=x.device, dtype=torch.long)
            t_next = torch.full_like(t, int(time_range[min(i + 1, total - 1)]))
            if mask is not None:
                x = schedule.q_sample(x0, t, randn(x0.shape, generator, x0.device, x0.dtype)) * mask + (1.0 - mask) * x
            noise = None
            if sigmas[index] > 0:
                noise = randn(x.shape, generator, x.device, x.dtype) * temperature
                if noise_dropout > 0:
                    noise = torch.nn.functional.dropout(noise, p=noise_dropout)
            x, pred_x0 = step(x, t, t_next, alphas_prev[index], sigmas[index], noise)
            if callback is not None:
                callback(i)
            if img_callback is not None:
                img_callback(pred_x0, i)
            if index % log_every_t == 0 or index == total - 1:
                intermediates["x_inter"].append(x)
                intermediates["pred_x0"].append(pred_x0)
        return x, intermediates
