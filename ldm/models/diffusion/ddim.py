"""DDIM sampling (Song et al. 2021, "Denoising Diffusion Implicit Models") with the CompVis reference's API.

`DDIMSampler(model).sample(S, batch_size, shape, conditioning, ...)` reproduces the reference's trajectories.
It is a facade: the steps are the registry's ``ddim`` (``plms`` for `PLMSSampler`) over the model's `Denoiser`
(`ldm.models.diffusion.samplers`), on the reference's timesteps; the facade converts between the reference's
x_t and the samplers' x_σ = x_t/√ᾱ_t and keeps the reference's schedule attributes, intermediates and callbacks.
Beyond the reference: any prediction (ε, x_0, v, flow, EDM), x̂_0 clipping, Imagen's dynamic thresholding, and
pasting the known region back exactly at the end of inpainting (`keep_known_exact`). The sampler's tensors live
on the model's schedule device; nothing is moved to CUDA.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Callable, Optional

import numpy as np
import torch

from ldm.models.diffusion.guidance import Condition, guided_model
from ldm.models.diffusion.noise import Generators, randn
from ldm.models.diffusion.samplers import EditedDenoiser, get_sampler, run_sampler, start_state
from ldm.models.diffusion.spacing import ddim_alphas, ddim_sigmas, make_ddim_timesteps, timestep_sigmas
from ldm.modules.diffusionmodules.denoiser import Denoiser
from ldm.modules.diffusionmodules.noise_process import DiscreteVP
from ldm.modules.diffusionmodules.schedule import extract

log = logging.getLogger(__name__)


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

    The model needs `apply_model(x, t, cond)`, `schedule` (a `NoiseSchedule`), `prediction` and `num_timesteps`,
    as `LatentDiffusion` has, and the discrete VP noise process (DDIM steps over its table). `schedule` is the
    reference's argument, unused there as here (the noise schedule is the model's); it is kept so the reference's
    calls work.
    """

    name = "DDIM"
    sampler = "ddim"  # its steps: the registry's function of this name

    def __init__(self, model: Any, schedule: str = "linear") -> None:
        process = getattr(model, "process", None)
        if process is not None and not process.discrete:
            raise ValueError(f"{self.name} steps over the discrete DDPM table; this model's noise process is "
                             f"{process.name}: use a σ-space sampler (euler, heun, dpmpp_2m, ...)")
        self.model = model
        self.process = process if process is not None else DiscreteVP(model.schedule)
        self.ddpm_num_timesteps = model.num_timesteps
        self.schedule = schedule
        self.ddim_timesteps: Optional[np.ndarray] = None
        self.eta = 0.0

    # ------------------------------------------------------------------------------------ schedule

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        """Pick the timesteps and their coefficients: `ddim_timesteps` (ascending), and `ddim_alphas`,
        `ddim_alphas_prev`, `ddim_sigmas` (the η-noise std), `ddim_sqrt_one_minus_alphas` by step position."""
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
        self.eta = ddim_eta
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
        down to the end) and after the first. `callback(i)` and `img_callback(x̂_0, i)` run at step i.

        Inpainting: with `mask` and `x0`, **mask == 1 marks the known region**, kept as every sampler keeps it
        (`samplers.run_sampler`): that region starts as x0 plus the run's noise and the denoiser's x̂_0 is x0 there,
        so the model sees x0 noised to each step's level, as in the reference's re-noising. `keep_known_exact`
        (not in the reference) then sets the final sample's known region to x0 exactly.

        Beyond the reference: `clip_denoised` clips x̂_0 to [−1, 1] and `dynamic_threshold` (a quantile,
        e.g. 0.995) applies Imagen's dynamic thresholding; the step uses the edited x̂_0 and the ε̂ it implies.
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

        def noise(x: torch.Tensor) -> torch.Tensor:
            drawn = randn(x.shape, generator, x.device, x.dtype) * temperature
            return torch.nn.functional.dropout(drawn, p=noise_dropout) if noise_dropout > 0 else drawn

        denoiser = self._denoiser(conditioning, unconditional_conditioning, unconditional_guidance_scale,
                                  clip_denoised, dynamic_threshold)
        return self._run(x, denoiser, self._levels(self.ddim_timesteps), known=x0, known_mask=mask,
                         paste_known=keep_known_exact, callback=callback, img_callback=img_callback,
                         log_every_t=log_every_t, noise=noise, generator=generator, disable=not verbose)

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
        if not use_original_steps:
            self._require_schedule("decode")
        timesteps = np.arange(self.ddpm_num_timesteps) if use_original_steps else self.ddim_timesteps
        if not 0 <= t_start <= len(timesteps):
            raise ValueError(f"t_start must lie in 0..{len(timesteps)} (the number of steps), got {t_start}")
        if t_start == 0:
            return x_latent
        # All T steps end at ᾱ = 1 (σ = 0), the reference's alphas_cumprod_prev[0].
        sigmas = self._levels(timesteps[:t_start], end=0.0 if use_original_steps else None)
        denoiser = self._denoiser(cond, unconditional_conditioning, unconditional_guidance_scale)
        return self._run(x_latent, denoiser, sigmas, disable=not progress)[0]

    # ------------------------------------------------------------------------------------ internals

    def _require_schedule(self, caller: str) -> None:
        if self.ddim_timesteps is None:
            raise RuntimeError(f"{caller} needs the sampling schedule: call make_schedule(ddim_num_steps, ...) first")

    def _levels(self, timesteps: np.ndarray, end: Optional[float] = None) -> torch.Tensor:
        """σ of the ascending `timesteps` from the highest, then `end` (default: σ of ᾱ_0, the reference's last
        ᾱ_prev)."""
        sigmas = timestep_sigmas(self.process, timesteps[::-1], float(self.process.sigmas[0]) if end is None else end)
        return sigmas.to(self.model.schedule.alphas_cumprod.device)

    def _denoiser(self, cond: Condition, uncond: Condition, scale: float, clip_denoised: bool = False,
                  dynamic_threshold: Optional[float] = None) -> Any:
        """The model's guided D(x_σ, σ), with x̂_0 thresholded and/or clipped to [−1, 1] when asked."""
        denoiser: Any = Denoiser(guided_model(self.model.apply_model, cond, uncond, scale), self.process,
                                 self.model.prediction)
        if dynamic_threshold is not None:
            denoiser = EditedDenoiser(denoiser, lambda x0: dynamic_threshold_x0(x0, dynamic_threshold))
        if clip_denoised:
            denoiser = EditedDenoiser(denoiser, lambda x0: x0.clamp(-1.0, 1.0))
        return denoiser

    def _run(self, x_T: torch.Tensor, denoiser: Any, sigmas: torch.Tensor, *, log_every_t: int = 100,
             callback: Optional[Callable[[int], None]] = None,
             img_callback: Optional[Callable[[torch.Tensor, int], None]] = None,
             **options: Any) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """The registry's sampler from x_T (the model's input at sigmas[0]), with the reference's intermediates:
        x (in x_t units) and x̂_0 after the first step and after every `log_every_t`-th counted down to the end."""
        total = len(sigmas) - 1
        logged = [i for i in range(total) if (total - i - 1) % log_every_t == 0 or i == 0]
        states: dict[int, torch.Tensor] = {}  # x_σ before step i, for the steps whose predecessor is logged
        predictions: dict[int, torch.Tensor] = {}

        def record(i: int, x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> None:
            if i - 1 in logged:
                states[i] = x * denoiser.input_scale(sigma)
            if i in logged:
                predictions[i] = denoised
            if callback is not None:
                callback(i)
            if img_callback is not None:
                img_callback(denoised, i)

        info = get_sampler(self.sampler)
        samples = run_sampler(info, denoiser, start_state(info, denoiser, x_T, sigmas[0]), sigmas, callback=record,
                              eta=self.eta, **options)
        states[total] = samples
        intermediates = {"x_inter": [x_T] + [states[i + 1] for i in logged],
                         "pred_x0": [x_T] + [predictions[i] for i in logged]}
        return samples, intermediates
