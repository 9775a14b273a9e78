"""Interpolation through the diffusion process and progressive generation (Ho et al. 2020, "DDPM", sec. 4.3).

Interpolation (DDPM sec. 4.3 and appendix D, fig. 8): two images x_0, x_0' are encoded to latents and noised
to the same step t by q with the **same** noise ε (eq. 4: x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε), so both lie on
the same noise realisation and differ only in their content. The noisy latents are mixed, linearly
x̄_t = (1 − λ) x_t + λ x_t' (sec. 4.3) or spherically (an option: Gaussian vectors concentrate on a sphere,
where a straight line cuts inside), and each mixture is decoded by the reverse process from t to 0 with
the same reverse-process noise for every λ. λ = 0 and λ = 1 are then exactly the reconstructions of the two
images through step t: the larger t, the more the decoder invents and the smoother the path.

Progressive generation (DDPM sec. 4.3, fig. 6): while the reverse process runs from x_T, the prediction
x̂_0 = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t (eq. 15) shows what the sample is becoming; large-scale features
appear first and details last.

Every function takes the model first and returns image tensors NCHW in [−1, 1] (or latents, where said).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ldm.inference import (class_condition, decode_latents, encode_images, eta_option, precision_scope,
                           sample_latents, text_condition)
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.models.diffusion.samplers import SAMPLERS, SamplerInfo, get_sampler, run_sampler, sampler_sigmas, start_state
from ldm.modules.encoders.modules import ClassEmbedder
# Within this angle (radians) of 0 or π, the great circle through two latents is ill-defined (sin θ → 0):
# slerp falls back to the straight line. Well above float32's resolution of acos near ±1 (~3e-4).
DEGENERATE_ANGLE = 1e-3


def lerp(a: torch.Tensor, b: torch.Tensor, weight: float) -> torch.Tensor:
    """(1 − λ) a + λ b (DDPM sec. 4.3's mixture of the noisy latents)."""
    return (1.0 - weight) * a + weight * b


def slerp(a: torch.Tensor, b: torch.Tensor, weight: float) -> torch.Tensor:
    """Spherical interpolation per example (dim 0 is the batch), along the great circle from a to b.

    slerp(a, b; λ) = sin((1 − λ)θ)/sin θ · a + sin(λθ)/sin θ · b with θ the angle between a and b
    (Shoemake 1985). For two equally long vectors every point keeps their length; a straight line would
    shorten the middle by cos(θ/2), pulling a mix of independent Gaussian latents (θ ≈ 90°) towards
    norm √½ · √d, where the model never saw data. (Anti)parallel pairs fall back to `lerp`. Computed in
    float32, which every device supports.
    """
    if a.shape != b.shape:
        raise ValueError(f"slerp needs two tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    flat_a, flat_b = a.flatten(1).float(), b.flatten(1).float()
    cos = (flat_a * flat_b).sum(1) / (flat_a.norm(dim=1) * flat_b.norm(dim=1)).clamp_min(1e-30)
    theta = cos.clamp(-1.0, 1.0).acos()[:, None]
    degenerate = (theta < DEGENERATE_ANGLE) | (theta > torch.pi - DEGENERATE_ANGLE)
    sin_theta = torch.where(degenerate, torch.ones_like(theta), theta.sin())
    coef_a = torch.where(degenerate, torch.full_like(theta, 1.0 - weight), ((1.0 - weight) * theta).sin() / sin_theta)
    coef_b = torch.where(degenerate, torch.full_like(theta, weight), (weight * theta).sin() / sin_theta)
    return (coef_a * flat_a + coef_b * flat_b).reshape(a.shape).to(a.dtype)


def mixing_weights(n_frames: int) -> list[float]:
    """`n_frames` evenly spaced λ from 0 to 1 (both ends included)."""
    if isinstance(n_frames, bool) or not isinstance(n_frames, int) or n_frames < 2:
        raise ValueError(f"n_frames must be an integer of at least 2 (the two ends), got {n_frames!r}")
    return torch.linspace(0.0, 1.0, n_frames, dtype=torch.float64).tolist()


def condition_for(model: LatentDiffusion, n: int, prompt: Optional[str] = None, class_label: Optional[int] = None,
                  scale: float = 1.0) -> tuple[Any, Any]:
    """(cond, uncond) for `n` samples of one prompt or class, or (None, None) for an unconditional model.

    `uncond` (the empty prompt, or the null class) is None when `scale` is 1. A text model's empty prompt
    is its unconditional score, so it needs no guidance pass either.
    """
    key = model.model.conditioning_key
    if key is None:
        if prompt or class_label is not None:
            raise ValueError("this model is unconditional; leave out the prompt and class label")
        return None, None
    if key == "concat":
        raise ValueError("this model is conditioned on a masked image (an inpainting model); use "
                         "scripts/inpaint.py, or a text-to-image, class-conditional or unconditional model here")
    if isinstance(model.cond_stage_model, ClassEmbedder):
        if prompt or class_label is None:
            classes = model.cond_stage_model.n_classes
            raise ValueError(f"this model is class-conditional: give a class label in 0..{classes - 1} (and no prompt)")
        labels = torch.full((n,), int(class_label), device=model.device, dtype=torch.long)
        return class_condition(model, labels, scale)
    if class_label is not None:
        raise ValueError("this model is conditioned on text: give a prompt, not a class label")
    cond, uncond = text_condition(model, [prompt or ""] * n, scale)
    return cond, (uncond if prompt else None)


def starts_at_a_timestep(info: SamplerInfo) -> bool:
    """Whether a sampler can start the reverse process from a trained timestep t: it steps over the trained
    levels (so t can be one of its levels) and can start midway."""
    return info.needs_discrete_levels and info.starts_midway


def interpolation_samplers() -> list[str]:
    """The samplers `interpolate` runs (`starts_at_a_timestep`)."""
    return [name for name, info in SAMPLERS.items() if starts_at_a_timestep(info)]


def _timesteps(model: LatentDiffusion, info: SamplerInfo, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ, trained timestep of each step start, descending) of a `steps`-step run of `info` on `model`."""
    sigmas = sampler_sigmas(info, model.process, steps)
    return sigmas, model.process.level_of_sigma(sigmas[:-1])[0]


def start_step(model: LatentDiffusion, t: int, sampler: str = "ddim", steps: int = 50) -> int:
    """The timestep the reverse process starts from for a requested noise level `t` (0-based, < T): the highest
    of the sampler's timesteps not above t (ancestral DDPM visits every t; DDIM and PLMS a subsequence of `steps`),
    so that the noisy latent and the first update are at the same level.
    """
    info = get_sampler(sampler)
    if not starts_at_a_timestep(info):
        raise ValueError(f"the reverse process can start from an intermediate step with "
                         f"{', '.join(interpolation_samplers())}, not {sampler!r}")
    if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < model.num_timesteps:
        raise ValueError(f"t must be a timestep in 0..{model.num_timesteps - 1} (this model has "
                         f"{model.num_timesteps}), got {t!r}")
    _, timesteps = _timesteps(model, info, steps)
    below = timesteps[timesteps <= t]
    if below.numel() == 0:
        raise ValueError(f"t = {t} lies below the first of the {steps} {sampler} timesteps ({int(timesteps[-1])}); "
                         "raise t or use more --steps")
    return int(below[0])


@torch.no_grad()
def denoise_from(model: LatentDiffusion, x_t: torch.Tensor, t: int, cond: Any = None, *, uncond: Any = None,
                 scale: float = 1.0, sampler: str = "ddim", steps: int = 50, eta: float = 0.0,
                 seed: Optional[int] = None, progress: bool = False) -> torch.Tensor:
    """Latents x_0 from the reverse process p(x_0 | x_t) started at timestep `t` (as `start_step` gives it).

    ``ddpm``: ancestral sampling (DDPM Algorithm 2) over t, t − 1, ..., 0. ``ddim``: DDIM (Song et al. 2021,
    eq. 12) over the `steps`-step schedule's timesteps up to t, with its `eta`; ``plms`` alike. `seed` fixes the
    reverse process's noise, so equal inputs give equal outputs.
    """
    if start_step(model, t, sampler, steps) != t:
        raise ValueError(f"{sampler} with {steps} steps cannot start at t = {t}, which is not one of its timesteps; "
                         f"pass start_step(model, t, {sampler!r}, steps)")
    info = get_sampler(sampler)
    sigmas, timesteps = _timesteps(model, info, steps)
    sigmas = sigmas[int((timesteps > t).sum()):].to(model.device)
    x_t = x_t.to(model.device)
    if seed is not None:  # the samplers draw their noise from the global generator, as sample_latents
        torch.manual_seed(seed)
    with precision_scope(model):
        denoiser = model.sigma_denoiser(cond, uncond, scale)
        z = run_sampler(info, denoiser, start_state(info, denoiser, x_t, sigmas[0]), sigmas, disable=not progress,
                        **eta_option(eta))
    return z.float()


@torch.no_grad()
def interpolate(model: LatentDiffusion, images_a: torch.Tensor, images_b: torch.Tensor, *, t: int = 500,
                n_frames: int = 8, spherical: bool = False, prompt: Optional[str] = None,
                class_label: Optional[int] = None, scale: float = 1.0, sampler: str = "ddim", steps: int = 50,
                eta: float = 0.0, spacing: Optional[str] = None, seed: Optional[int] = None,
                progress: bool = False) -> torch.Tensor:
    """Interpolations between pairs of images through step t: (N, n_frames, 3, H, W) for N pairs.

    Frame k decodes the mixture at λ_k = k / (n_frames − 1) of the pair's latents noised to `start_step(t)`
    with one shared ε (DDPM appendix D); every frame reuses the same reverse-process noise, so frame 0 and
    the last frame are exactly the reconstructions of image a and image b through that step. `seed` draws ε,
    `seed + 1` the reverse process's noise (so the first reverse step does not re-add ε). A conditional
    model decodes under `prompt` or `class_label` (`condition_for`), with guidance `scale`.
    """
    if images_a.shape != images_b.shape or images_a.dim() != 4:
        raise ValueError(f"images_a and images_b must be batches (N, 3, H, W) of one shape, got "
                         f"{tuple(images_a.shape)} and {tuple(images_b.shape)}")
    if spacing is not None:
        raise ValueError(f"interpolation runs {', '.join(interpolation_samplers())} over the DDPM table, which take "
                         f"no sigma spacing (got {spacing})")
    weights = mixing_weights(n_frames)
    step = start_step(model, t, sampler, steps)
    if seed is None:  # still one seed for all frames, so they share their noise
        seed = int(torch.randint(0, 2 ** 31, ()).item())
    z_a, z_b = encode_images(model, images_a), encode_images(model, images_b)
    generator = torch.Generator(device=z_a.device).manual_seed(seed)
    noise = torch.randn(z_a.shape, generator=generator, device=z_a.device, dtype=z_a.dtype)
    timestep = torch.full((z_a.shape[0],), step, device=z_a.device, dtype=torch.long)
    # DDPM eq. 4 with the same ε for both images: x_t and x_t' share their noise and differ in content only.
    x_a, x_b = model.q_sample(z_a, timestep, noise), model.q_sample(z_b, timestep, noise)
    mix = slerp if spherical else lerp
    mixtures = torch.stack([mix(x_a, x_b, weight) for weight in weights], dim=1).flatten(0, 1)  # pair-major
    # A deterministic run decodes every frame in one batch; otherwise each frame is decoded alone and reseeded,
    # so the reverse-process noise is the same for every λ and pair.
    deterministic = not get_sampler(sampler).stochastic and eta == 0
    batches = [mixtures] if deterministic else list(mixtures.split(1))
    cond, uncond = condition_for(model, batches[0].shape[0], prompt, class_label, scale)
    latents = torch.cat([denoise_from(model, x, step, cond, uncond=uncond, scale=scale, sampler=sampler, steps=steps,
                                      eta=eta, seed=seed + 1, progress=progress) for x in batches])
    images = decode_latents(model, latents)
    return images.reshape(z_a.shape[0], n_frames, *images.shape[1:])


@torch.no_grad()
def progressive_generation(model: LatentDiffusion, n_samples: int, *, n_frames: int = 8,
                           prompt: Optional[str] = None, class_label: Optional[int] = None, scale: float = 1.0,
                           sampler: str = "ddim", steps: int = 50, eta: float = 0.0, spacing: Optional[str] = None,
                           seed: Optional[int] = None, progress: bool = False) -> torch.Tensor:
    """The prediction x̂_0 along the reverse process (DDPM fig. 6): (n_samples, n_frames, 3, H, W).

    Frames are the decoded x̂_0 at `n_frames` evenly spaced sampler steps, from the first step (mostly the
    data mean) to the last (the sample). Samples follow `prompt` or `class_label` on a conditional model
    (`condition_for`), with guidance `scale`.
    """
    cond, uncond = condition_for(model, n_samples, prompt, class_label, scale)
    total = len(sampler_sigmas(get_sampler(sampler), model.process, steps, spacing)) - 1
    if isinstance(n_frames, bool) or not isinstance(n_frames, int) or not 1 <= n_frames <= total:
        raise ValueError(f"n_frames must be between 1 and the number of sampler steps ({total}), got {n_frames!r}")
    wanted = torch.linspace(0, total - 1, n_frames).round().long().tolist()
    predictions: list[torch.Tensor] = []
    calls = 0

    def record(_: int, pred_x0: torch.Tensor) -> None:
        # Count the calls rather than trusting the index: samplers number their steps differently.
        nonlocal calls
        if calls in wanted:
            predictions.append(pred_x0.float())
        calls += 1

    sample_latents(model, n_samples, cond, uncond=uncond, scale=scale, sampler=sampler, steps=steps, eta=eta,
                   spacing=spacing, seed=seed, callback=record, progress=progress)
    if calls != total:
        raise RuntimeError(f"the {sampler} sampler reported {calls} steps, expected {total}")
    latents = torch.stack(predictions, dim=1)  # (n_samples, n_frames, C, h, w)
    images = decode_latents(model, latents.flatten(0, 1))
    return images.reshape(n_samples, n_frames, *images.shape[1:])
