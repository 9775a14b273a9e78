"""Sampling from trained latent diffusion models: the API the scripts use, for notebooks in three lines.

    from ldm.inference import load_model, text_to_image
    from ldm.image_io import save_images
    save_images(text_to_image(load_model("txt2img"), ["a red circle above a blue square"]), "outputs/nb")

Images are float tensors NCHW in [−1, 1]; inpainting masks are N1HW with **1 = the region to fill** (the
reference's `scripts/inpaint.py` convention, `masked_image = (1 − mask) · image`). Every sampler of
the registry (`ldm.models.diffusion.samplers.SAMPLERS`) is reachable by name with classifier-free guidance,
and every one keeps known latents when inpainting with a model not trained for it.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from ldm.data.layout import PAD_TOKEN, layout_tokens
from ldm.model_files import BUILTIN_MODELS, ModelNotFound  # noqa: F401 (the API)
from ldm.model_loading import PRECISIONS, load_model, resolve_device  # noqa: F401 (the API)
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.models.diffusion.inpainting import LatentInpaintDiffusion
from ldm.models.diffusion.noise import Generators, generators_for, randn
from ldm.models.diffusion.samplers import SAMPLERS, get_sampler, run_sampler, sampler_sigmas, start_state  # noqa: F401
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.encoders.modules import ClassEmbedder

log = logging.getLogger(__name__)

# Callback of every sampler here: (step index, current x̂_0 in latent space).
StepCallback = Callable[[int, torch.Tensor], None]


# ---------------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def precision_scope(model: LatentDiffusion) -> Iterator[None]:
    """Autocast to the model's `inference_precision` (nothing for fp32)."""
    dtype = PRECISIONS[getattr(model, "inference_precision", "fp32")]
    if dtype is None:
        yield
    else:
        with torch.autocast(model.device.type, dtype=dtype):
            yield


def downsampling_factor(model: LatentDiffusion) -> int:
    """Pixels per latent cell along each axis (1 for pixel-space models)."""
    encoder = getattr(model.first_stage_model, "encoder", None)
    return 2 ** (encoder.num_resolutions - 1) if encoder is not None else 1


def latent_shape(model: LatentDiffusion, height: Optional[int] = None, width: Optional[int] = None) -> tuple[int, int, int]:
    """(C, h, w) of the latents of an image of `height` × `width` pixels (default: the training size)."""
    factor = downsampling_factor(model)
    size = model.image_size * factor
    height, width = height or size, width or size
    for name, value in (("height", height), ("width", width)):
        if value % factor:
            raise ValueError(f"{name} {value} is not a multiple of the first stage's downsampling factor {factor}; "
                             f"use e.g. {max(factor, value // factor * factor)}")
    return model.channels, height // factor, width // factor


def encode_images(model: LatentDiffusion, images: torch.Tensor) -> torch.Tensor:
    """The model's latents of images in [−1, 1] (`get_first_stage_encoding` of the posterior's mode: deterministic)."""
    posterior = model.encode_first_stage(images.to(model.device))
    z = posterior.mode() if isinstance(posterior, DiagonalGaussianDistribution) else posterior
    return model.get_first_stage_encoding(z)


@torch.no_grad()
def decode_latents(model: LatentDiffusion, z: torch.Tensor) -> torch.Tensor:
    """Images in [−1, 1] (float32) from latents."""
    with precision_scope(model):
        return model.decode_first_stage(z).float().clamp(-1.0, 1.0)


Prompts = Union[str, Sequence[str]]
Seeds = Union[int, Sequence[int], None]  # one for the batch (global generator), or one per image


def prompt_list(prompts: Prompts, n: Optional[int] = None, what: str = "prompts") -> list[str]:
    """`prompts` as a list: a plain string is one prompt, or the prompt of each of `n` images when `n` is given
    (as diffusers' pipelines broadcast it); a list must then have `n` entries."""
    if isinstance(prompts, str):
        return [prompts] * (n or 1)
    listed = list(prompts)
    if not all(isinstance(p, str) for p in listed):
        raise TypeError(f"{what} must be strings, got {[type(p).__name__ for p in listed]}")
    if n is not None and len(listed) != n:
        raise ValueError(f"got {len(listed)} {what} for {n} images; give one per image, or one string")
    return listed


def negative_prompts(negative_prompt: Union[str, Sequence[str], None], n: int) -> list[str]:
    """What guidance steers away from, one per image: the empty prompt by default (plain classifier-free
    guidance), one string for every image, or a list of n."""
    return prompt_list("" if negative_prompt is None else negative_prompt, n, "negative prompts")


@torch.no_grad()
def text_condition(model: LatentDiffusion, prompts: Prompts, scale: float,
                   negative_prompt: Union[str, Sequence[str], None] = None,
                   encode: Optional[Callable[[list[str]], Any]] = None) -> tuple[Any, Any]:
    """(τθ(prompts), τθ(negative prompts) when guidance needs it, else None). The negative prompts stand where
    classifier-free guidance puts the empty prompt: the output moves from them towards `prompts`. `encode`
    replaces `model.get_learned_conditioning` (a text-conditioned inpainting model adds its masked image)."""
    prompts = prompt_list(prompts)
    encode = encode or model.get_learned_conditioning
    cond = encode(prompts)
    uncond = encode(negative_prompts(negative_prompt, len(prompts))) if scale != 1.0 else None
    return cond, uncond


def reads_prompts(model: LatentDiffusion) -> bool:
    """Whether `inpaint` conditions `model` on prompts: a text-conditioned inpainting model, or any other
    conditional model (which keeps the known latents)."""
    if isinstance(model, LatentInpaintDiffusion):
        return model.text_conditioned
    return model.model.conditioning_key is not None


@torch.no_grad()
def class_condition(model: LatentDiffusion, labels: torch.Tensor, scale: float) -> tuple[Any, Any]:
    """(τθ(labels), τθ of the null class when guidance needs it, else None) for a class-conditional model."""
    cond = model.get_learned_conditioning(labels)
    uncond = None
    if scale != 1.0:
        uncond = model.get_learned_conditioning(torch.full_like(labels, model.cond_stage_model.null_class))
    return cond, uncond


# ---------------------------------------------------------------------------------------------- sampling


def eta_option(eta: float) -> dict[str, float]:
    """The `eta` keyword for a sampler: none at 0, so each sampler keeps its own default (0 for DDIM, 1 for the
    ancestral and SDE samplers)."""
    return {"eta": eta} if eta > 0 else {}


@torch.no_grad()
def sample_latents(model: LatentDiffusion, batch_size: int, cond: Any = None, *, uncond: Any = None,
                   scale: float = 1.0, sampler: str = "ddim", steps: int = 50, eta: float = 0.0,
                   spacing: Optional[str] = None, shape: Optional[Sequence[int]] = None,
                   x_T: Optional[torch.Tensor] = None, known: Optional[torch.Tensor] = None,
                   known_mask: Optional[torch.Tensor] = None, seed: Seeds = None,
                   callback: Optional[StepCallback] = None, progress: bool = True,
                   generator: Generators = None) -> torch.Tensor:
    """Latents (batch_size, *shape) from `sampler` with classifier-free guidance at `scale` (when `uncond`).

    `shape` is the latent (C, h, w), default the training size. `known` with `known_mask` (latent space,
    **1 = keep**) keeps the known latents at every step, for every sampler, and exactly at the end. `eta`
    is DDIM's noise (0 = deterministic) and the stochastic σ-space samplers' (0 = their default, 1). `spacing`
    picks the σ-space samplers' noise levels (`ldm.models.diffusion.spacing.SIGMA_SPACINGS`; default the
    process's own); `ddim`, `plms` and `ddpm` visit the trained timesteps their registry entry names (`ddpm`: all T,
    `steps` is ignored; DDIM and PLMS trailing ones for a zero-terminal-SNR model, Lin et al. 2024, sec. 3.3).
    `callback(i, x̂_0)` runs at each step.

    Randomness: `seed` (an int) seeds torch's global generator, as the reference's scripts do; a list of seeds,
    one per image, or `generator` (a `torch.Generator`, or a list of them, one per image, as diffusers takes)
    draws each image's noise from its own generator, so a seed gives the same image whatever else is in the
    batch (`ldm.models.diffusion.noise`).
    """
    info = get_sampler(sampler)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    sigmas = sampler_sigmas(info, model.process, steps, spacing, device=model.device)
    if (known is None) != (known_mask is None):
        raise ValueError("keeping known latents needs both `known` and `known_mask` (1 = keep)")
    shape = tuple(shape) if shape is not None else (model.channels, model.image_size, model.image_size)
    generator = _generators(seed, generator, batch_size)
    x_T = randn((batch_size, *shape), generator, device=model.device) if x_T is None else x_T.to(model.device)
    log.info(f"{sampler} sampler: {len(sigmas) - 1} steps from σ = {float(sigmas[0]):.4g} to {float(sigmas[-1]):.4g}, "
             f"latents {(batch_size, *shape)}, eta {eta}")
    with precision_scope(model):
        denoiser = model.sigma_denoiser(cond, uncond, scale)
        z = run_sampler(info, denoiser, start_state(info, denoiser, x_T, sigmas[0]), sigmas, known=known,
                        known_mask=known_mask, generator=generator, disable=not progress,
                        callback=None if callback is None else lambda i, x, sigma, x0: callback(i, x0),
                        **eta_option(eta))
    return z.float()


def _generators(seed: Seeds, generator: Generators, batch_size: int) -> Generators:
    """`sample_latents`' source of noise: `generator` as given, per-image generators for a list of seeds, or the
    global generator (seeded by an int seed)."""
    if generator is not None and seed is not None:
        raise ValueError("give either seed or generator, not both")
    if isinstance(seed, (list, tuple)):
        if len(seed) != batch_size:
            raise ValueError(f"got {len(seed)} seeds for {batch_size} images; give one per image, or one int")
        return generators_for(seed)
    if seed is not None:
        torch.manual_seed(seed)
    return generator


@torch.no_grad()
def text_to_image(model: LatentDiffusion, prompts: Prompts, *, scale: float = 3.0, sampler: str = "ddim",
                  steps: int = 50, eta: float = 0.0, spacing: Optional[str] = None, height: Optional[int] = None,
                  width: Optional[int] = None, seed: Seeds = None, progress: bool = True,
                  callback: Optional[StepCallback] = None,
                  negative_prompt: Union[str, Sequence[str], None] = None,
                  num_images_per_prompt: int = 1,
                  generator: Generators = None) -> torch.Tensor:
    """`num_images_per_prompt` images per prompt (a string or a list), each prompt's images next to each other:
    (len(prompts) · num_images_per_prompt, 3, H, W) in [−1, 1]. Guidance (`scale` ≠ 1) steers away from
    `negative_prompt` (default: the empty prompt; one string, or one per prompt). `seed` / `generator` as
    `sample_latents`: per-image seeds or generators make each image independent of the batch.

    `height`/`width` (pixels, multiples of the first stage's factor) may exceed the training size: the
    U-Net is convolutional, so it samples a larger latent (LDM paper, sec. 4.3.2).
    """
    if num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be at least 1, got {num_images_per_prompt}")
    prompts = prompt_list(prompts)
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        negative_prompt = [p for p in negative_prompts(negative_prompt, len(prompts))
                           for _ in range(num_images_per_prompt)]
    prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
    cond, uncond = text_condition(model, prompts, scale, negative_prompt)
    z = sample_latents(model, len(prompts), cond, uncond=uncond, scale=scale, sampler=sampler, steps=steps, eta=eta,
                       spacing=spacing,
                       shape=latent_shape(model, height, width), seed=seed, callback=callback, progress=progress,
                       generator=generator)
    return decode_latents(model, z)


@torch.no_grad()
def generate(model: LatentDiffusion, n: int, *, class_labels: Optional[Sequence[int]] = None, scale: float = 1.0,
             sampler: str = "ddim", steps: int = 50, eta: float = 0.0, spacing: Optional[str] = None,
             seed: Optional[int] = None, batch_size: int = 16, progress: bool = True) -> torch.Tensor:
    """`n` unconditional samples, or one per entry of `class_labels` (len n) for a class-conditional model,
    made `batch_size` at a time; guidance (`scale` ≠ 1) uses the model's null class."""
    if class_labels is not None and len(class_labels) != n:
        raise ValueError(f"got {len(class_labels)} class labels for n = {n} samples; give one per sample")
    if class_labels is None and model.model.conditioning_key is not None:
        raise ValueError(f"this model is conditioned on {model.cond_stage_key!r}; give class_labels "
                         "(or use text_to_image for text)")
    if seed is not None:
        torch.manual_seed(seed)
    images = []
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        cond = uncond = None
        if class_labels is not None:
            labels = torch.as_tensor(list(class_labels[start:start + count]), device=model.device)
            cond, uncond = class_condition(model, labels, scale)
        z = sample_latents(model, count, cond, uncond=uncond, scale=scale, sampler=sampler, steps=steps, eta=eta,
                           spacing=spacing, progress=progress)
        images.append(decode_latents(model, z))
    return torch.cat(images)


@torch.no_grad()
def image_to_image(model: LatentDiffusion, images: torch.Tensor, prompts: Optional[Prompts] = None, *,
                   strength: float = 0.75, scale: float = 3.0, sampler: str = "ddim", steps: int = 50,
                   eta: float = 0.0, spacing: Optional[str] = None, seed: Optional[int] = None,
                   progress: bool = True, negative_prompt: Union[str, Sequence[str], None] = None) -> torch.Tensor:
    """SDEdit (Meng et al. 2022) as Stable Diffusion's img2img: the images' latents are noised to the level
    `strength` · n steps from the end of a `steps`-step run of `sampler` (n its steps: all T for ddpm), which then
    denoises from there.

    Every sampler starts from z + σ·ε at the first noise level it runs (for DDIM and PLMS the reference's img2img:
    DDIM's forward process to that timestep).
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1] (the share of the steps to redo), got {strength}")
    info = get_sampler(sampler)
    if not info.starts_midway:
        raise ValueError(f"image_to_image needs a sampler that can start midway, not {sampler}: use one of "
                         + ", ".join(name for name, entry in SAMPLERS.items() if entry.starts_midway))
    sigmas = sampler_sigmas(info, model.process, steps, spacing, device=model.device)
    n = images.shape[0]
    prompts = prompt_list("" if prompts is None else prompts, n)
    if seed is not None:
        torch.manual_seed(seed)
    cond, uncond = (text_condition(model, prompts, scale, negative_prompt) if model.model.conditioning_key is not None
                    else (None, None))
    t_enc = max(1, int(strength * (len(sigmas) - 1)))
    sigmas = sigmas[len(sigmas) - 1 - t_enc:]
    with precision_scope(model):
        z = encode_images(model, images)
        z = run_sampler(info, model.sigma_denoiser(cond, uncond, scale), z + torch.randn_like(z) * sigmas[0], sigmas,
                        disable=not progress, **eta_option(eta))
    return decode_latents(model, z.float())


def _check_masks(images: torch.Tensor, masks: torch.Tensor) -> None:
    if images.dim() != 4 or masks.dim() != 4 or masks.shape[1] != 1:
        raise ValueError(f"images must be (N, 3, H, W) and masks (N, 1, H, W); got {tuple(images.shape)} and "
                         f"{tuple(masks.shape)}")
    if images.shape[0] != masks.shape[0] or images.shape[-2:] != masks.shape[-2:]:
        raise ValueError(f"each image needs a mask of its size: images {tuple(images.shape)}, masks "
                         f"{tuple(masks.shape)}")


@torch.no_grad()
def inpaint(model: LatentDiffusion, images: torch.Tensor, masks: torch.Tensor,
            prompts: Optional[Prompts] = None, *, scale: float = 1.0, sampler: str = "ddim", steps: int = 50,
            eta: float = 0.0, spacing: Optional[str] = None, seed: Optional[int] = None,
            progress: bool = True, negative_prompt: Union[str, Sequence[str], None] = None) -> torch.Tensor:
    """Fill the region where `masks` is 1; the result keeps the other pixels exactly.

    A model trained for inpainting (`LatentInpaintDiffusion`) is conditioned on the masked image and mask,
    as the reference's inpaint.py does, and a text-conditioned one (``hybrid``) also on `prompts`, guided by
    `scale` against `negative_prompt` (default the empty prompt) with the masked image kept in both halves.
    Any other model keeps the known latents at every step (RePaint-style replacement, Lugmayr et al. 2022,
    without resampling): a latent cell counts as known when none of its pixels is to be filled. A text model
    takes `prompts` (default empty, i.e. unconditional).
    """
    _check_masks(images, masks)
    images, masks = images.to(model.device), (masks >= 0.5).to(model.device, images.dtype)
    n = images.shape[0]
    shape = latent_shape(model, images.shape[-2], images.shape[-1])
    if seed is not None:
        torch.manual_seed(seed)
    prompts = prompt_list("" if prompts is None else prompts, n)
    if isinstance(model, LatentInpaintDiffusion):
        concat = model.inpainting_condition(images * (1.0 - masks), masks)
        cond, uncond = concat, None
        if model.text_conditioned:
            cond, uncond = text_condition(model, prompts, scale, negative_prompt,
                                          encode=lambda captions: model.text_condition(concat, captions))
        z = sample_latents(model, n, cond, uncond=uncond, scale=scale, sampler=sampler, steps=steps, eta=eta,
                           spacing=spacing, shape=shape, progress=progress)
    else:
        cond = uncond = None
        if isinstance(model.cond_stage_model, ClassEmbedder):
            raise ValueError("inpaint() conditions text models on prompts and unconditional models on nothing; "
                             "a class-conditional model is not supported here (use a text or inpainting model)")
        if model.model.conditioning_key is not None:
            cond, uncond = text_condition(model, prompts, scale, negative_prompt)
        factor = downsampling_factor(model)
        known_mask = 1.0 - F.max_pool2d(masks, factor) if factor > 1 else 1.0 - masks
        z = sample_latents(model, n, cond, uncond=uncond, scale=scale, sampler=sampler, steps=steps, eta=eta,
                           spacing=spacing, shape=shape, known=encode_images(model, images), known_mask=known_mask, progress=progress)
    return images * (1.0 - masks) + masks * decode_latents(model, z)


# ------------------------------------------------------------------------------- spatial conditioning


def _check_conditioned_on(model: LatentDiffusion, key: str, function: str, config: str) -> None:
    if model.cond_stage_key != key:
        raise ValueError(f"{function} needs a model conditioned on {key!r} (e.g. {config}); this one is conditioned "
                         f"on {model.cond_stage_key!r}")


@torch.no_grad()
def super_resolve(model: LatentDiffusion, images: torch.Tensor, *, sampler: str = "ddim", steps: int = 50,
                  eta: float = 0.0, spacing: Optional[str] = None, seed: Seeds = None, progress: bool = True,
                  generator: Generators = None) -> torch.Tensor:
    """Low-resolution images (N, 3, h, w) in [−1, 1] -> (N, 3, f·h, f·w), f the first stage's factor (4 for the
    built-in super-resolution model, configs/latent-diffusion/sr_shapes.yaml). The low-resolution pixels are
    concatenated with the latent, whose grid they match; any h, w works, also beyond the training size (the
    U-Net is convolutional: LDM paper, sec. 4.4)."""
    _check_conditioned_on(model, "LR_image", "super_resolve", "configs/latent-diffusion/sr_shapes.yaml")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, h, w), got {tuple(images.shape)}")
    cond = model.get_learned_conditioning(images.to(model.device, torch.float32))
    z = sample_latents(model, len(images), cond, sampler=sampler, steps=steps, eta=eta, spacing=spacing,
                       shape=(model.channels, *images.shape[-2:]), seed=seed, progress=progress, generator=generator)
    return decode_latents(model, z)


def semantic_classes(model: LatentDiffusion) -> int:
    """How many labels a semantic-synthesis model's maps hold (its SpatialRescaler's input channels)."""
    mapper = getattr(model.cond_stage_model, "channel_mapper", None)
    if mapper is None:
        raise ValueError("this model's condition encoder has no channel mapper: it is not a semantic-synthesis model")
    return mapper.in_channels


@torch.no_grad()
def semantic_to_image(model: LatentDiffusion, label_maps: torch.Tensor, *, sampler: str = "ddim", steps: int = 50,
                      eta: float = 0.0, spacing: Optional[str] = None, seed: Seeds = None, progress: bool = True,
                      generator: Generators = None) -> torch.Tensor:
    """Label maps (N, H, W) of class indices -> images (N, 3, H, W) in [−1, 1] with those regions
    (configs/latent-diffusion/semantic2img_shapes.yaml: 0 background, 1 + class of each object); H, W multiples
    of the first stage's factor, larger than the training size too."""
    _check_conditioned_on(model, "segmentation", "semantic_to_image",
                          "configs/latent-diffusion/semantic2img_shapes.yaml")
    if label_maps.dim() != 3 or label_maps.is_floating_point():
        raise ValueError(f"label maps must be integer class indices (N, H, W), got a {label_maps.dtype} tensor of "
                         f"shape {tuple(label_maps.shape)}")
    classes = semantic_classes(model)
    if label_maps.min() < 0 or label_maps.max() >= classes:
        raise ValueError(f"label values must lie in 0..{classes - 1} (the model's classes), got "
                         f"{int(label_maps.min())}..{int(label_maps.max())}")
    one_hot = F.one_hot(label_maps.long(), classes).permute(0, 3, 1, 2).float().to(model.device)
    cond = model.get_learned_conditioning(one_hot)
    z = sample_latents(model, len(label_maps), cond, sampler=sampler, steps=steps, eta=eta, spacing=spacing,
                       shape=latent_shape(model, *label_maps.shape[-2:]), seed=seed, progress=progress,
                       generator=generator)
    return decode_latents(model, z)


@torch.no_grad()
def layout_to_image(model: LatentDiffusion, layouts: Sequence[Sequence[tuple[int, Sequence[float]]]], *,
                    scale: float = 3.0, sampler: str = "ddim", steps: int = 50, eta: float = 0.0,
                    spacing: Optional[str] = None, seed: Seeds = None, progress: bool = True,
                    generator: Generators = None) -> torch.Tensor:
    """One image per layout, a list of (class label, box [x0, y0, x1, y1] in [0, 1]) in slot order
    (`ldm.data.layout`; `read_layout_file` reads one from JSON); guidance (`scale` ≠ 1) against the empty layout."""
    _check_conditioned_on(model, "objects_bbox", "layout_to_image", "configs/latent-diffusion/layout2img_shapes.yaml")
    tokens = torch.as_tensor(np.stack([layout_tokens(layout) for layout in layouts]), device=model.device)
    cond = model.get_learned_conditioning(tokens)
    uncond = model.get_learned_conditioning(torch.full_like(tokens, PAD_TOKEN)) if scale != 1.0 else None
    z = sample_latents(model, len(tokens), cond, uncond=uncond, scale=scale, sampler=sampler, steps=steps, eta=eta,
                       spacing=spacing, seed=seed, progress=progress, generator=generator)
    return decode_latents(model, z)
