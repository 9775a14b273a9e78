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
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ldm.checkpoint import TRAINING_ONLY_PREFIXES, load_state_dict, load_weights
from ldm.config import load_configs
from ldm.models.diffusion.ancestral import ancestral_sample
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.models.diffusion.inpainting import LatentInpaintDiffusion
from ldm.models.diffusion.plms import PLMSSampler
from ldm.models.diffusion.samplers import SAMPLERS, SamplerInfo, get_sampler, keep_known
from ldm.models.diffusion.spacing import make_sigmas
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.encoders.modules import ClassEmbedder
from ldm.util import instantiate_from_config

REPO = Path(__file__).resolve().parents[1]
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Built-in models: a directory holding config.yaml and model.safetensors (written by scripts/export_weights.py).
BUILTIN_MODELS = {
    "txt2img": Path("models/ldm/txt2img-shapes"),
    "inpainting": Path("models/ldm/inpainting-shapes"),
}
# How to make a missing built-in model.
RECIPES = {
    "txt2img": "configs/latent-diffusion/txt2img.yaml",
    "inpainting": "configs/latent-diffusion/inpainting.yaml",
}
# Callback of every sampler here: (step index, current x̂_0 in latent space).
StepCallback = Callable[[int, torch.Tensor], None]


class ModelNotFound(FileNotFoundError):
    """A model's config or weights are missing; the message says how to make them."""


# ---------------------------------------------------------------------------------------------- loading


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` is CUDA when available, else the CPU; anything else is passed to `torch.device`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here; use --device cpu (or auto)")
    return device


def _model_files(model: Union[str, Path], ckpt: Optional[Union[str, Path]]) -> tuple[Path, Path, Optional[str]]:
    """(config, weights, built-in name or None) for `load_model`'s arguments."""
    name = str(model) if str(model) in BUILTIN_MODELS else None
    path = _repo_path(BUILTIN_MODELS[name]) if name else Path(model)
    if path.suffix in (".yaml", ".yml"):
        config = path
        weights = Path(ckpt) if ckpt is not None else path.with_name("model.safetensors")
    else:
        config = path / "config.yaml"
        weights = Path(ckpt) if ckpt is not None else path / "model.safetensors"
    for needed in (config, weights):
        if not needed.is_file():
            raise ModelNotFound(_missing_model_message(needed, name, config))
    return config, weights, name


def _missing_model_message(missing: Path, name: Optional[str], config: Path) -> str:
    if name is not None:
        target = BUILTIN_MODELS[name]
        return (f"the built-in {name!r} model is missing ({missing} does not exist). Make it with the main job,\n"
                f"  bash scripts/demo.sh            (trains the first stage, txt2img and inpainting: ~30 min on 2 cores)\n"
                f"or train it alone and export its weights:\n"
                f"  python main.py --base {RECIPES[name]} -t\n"
                f"  python scripts/export_weights.py logs/<that run>/checkpoints/last.ckpt --model-dir {target}")
    if missing == config:
        return f"no model config at {config}: pass a config .yaml, or a directory holding config.yaml and model.safetensors"
    return (f"no weights at {missing}: pass --ckpt (a .safetensors export or a Lightning .ckpt), or export a run with\n"
            f"  python scripts/export_weights.py logs/<run>/checkpoints/last.ckpt --model-dir {config.parent}")


def _repo_path(path: Path) -> Path:
    """A relative path as given when it exists from here, else under the repository root (scripts run anywhere)."""
    return path if path.is_absolute() or path.exists() or not (REPO / path).exists() else REPO / path


def _resolve_file_params(node: Any) -> Any:
    """Config file references (`ckpt_path`, `tokenizer_path`) made to work from any working directory."""
    if isinstance(node, Mapping):
        return {k: (str(_repo_path(Path(v))) if k in ("ckpt_path", "tokenizer_path") and isinstance(v, str)
                    else _resolve_file_params(v)) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_resolve_file_params(v) for v in node]
    return node


def load_model(model: Union[str, Path] = "txt2img", ckpt: Optional[Union[str, Path]] = None,
               device: Union[str, torch.device] = "cpu", precision: str = "fp32") -> LatentDiffusion:
    """A trained model, in eval mode on `device`, ready for the functions below.

    `model` is a built-in name (`BUILTIN_MODELS`), a directory holding config.yaml and model.safetensors,
    or a config .yaml (then `ckpt` names the weights: a weights-only export or a training .ckpt, whose EMA
    weights are used when it has them). An export may leave out the frozen first stage when its config
    names the first stage's own checkpoint (`first_stage_config.params.ckpt_path`): it is loaded from there.
    `precision` ("fp32", "bf16", "fp16") is kept as `model.inference_precision`: sampling then runs under
    autocast in that type while the weights stay float32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    device = resolve_device(device) if isinstance(device, str) else device
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("fp16 autocast needs a GPU; on the CPU use precision bf16 (or fp32)")
    config_path, weights_path, _ = _model_files(model, ckpt)
    config = OmegaConf.to_container(load_configs([config_path]), resolve=True)
    if "model" not in config:
        raise ValueError(f"{config_path} has no 'model:' section")
    params = config["model"].setdefault("params", {})
    state = load_state_dict(weights_path)
    ema_keys = [k for k in state if k.startswith("model_ema.")]
    params["use_ema"] = bool(ema_keys)  # an export already holds the EMA weights as the model's
    params.pop("ckpt_path", None)  # the weights come from `weights_path`, not the training config's init
    config["model"]["params"] = _resolve_file_params(params)
    net = instantiate_from_config(config["model"])
    ignore = list(TRAINING_ONLY_PREFIXES)
    first_stage_params = params.get("first_stage_config", {}).get("params", {})
    if first_stage_params.get("ckpt_path") and not any(k.startswith("first_stage_model.") for k in state):
        ignore.append("first_stage_model.")
        if net.cond_stage_model is net.first_stage_model:
            ignore.append("cond_stage_model.")
    load_weights(net, state, strict=True, ignore_prefixes=ignore, source=str(weights_path))
    if ema_keys:
        net.model_ema.copy_to(net.model)
    net.inference_precision = precision
    return net.to(device).eval()


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
    """Latents z = scale_factor · E(x) of images in [−1, 1], taking the posterior's mode (deterministic)."""
    posterior = model.encode_first_stage(images.to(model.device))
    z = posterior.mode() if isinstance(posterior, DiagonalGaussianDistribution) else posterior
    return model.scale_factor * z


@torch.no_grad()
def decode_latents(model: LatentDiffusion, z: torch.Tensor) -> torch.Tensor:
    """Images in [−1, 1] (float32) from latents."""
    with precision_scope(model):
        return model.decode_first_stage(z).float().clamp(-1.0, 1.0)


@torch.no_grad()
def text_condition(model: LatentDiffusion, prompts: Sequence[str], scale: float) -> tuple[Any, Any]:
    """(τθ(prompts), τθ of empty prompts when guidance needs it, else None)."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    cond = model.get_learned_conditioning(list(prompts))
    uncond = model.get_learned_conditioning([""] * len(prompts)) if scale != 1.0 else None
    return cond, uncond


@torch.no_grad()
def class_condition(model: LatentDiffusion, labels: torch.Tensor, scale: float) -> tuple[Any, Any]:
    """(τθ(labels), τθ of the null class when guidance needs it, else None) for a class-conditional model."""
    cond = model.get_learned_conditioning(labels)
    uncond = None
    if scale != 1.0:
        uncond = model.get_learned_conditioning(torch.full_like(labels, model.cond_stage_model.null_class))
    return cond, uncond


# ---------------------------------------------------------------------------------------------- sampling


def _sampler_for(model: LatentDiffusion, sampler: str, spacing: Optional[str]) -> SamplerInfo:
    """The registered sampler, checked against the model's noise process and the run's options."""
    info = get_sampler(sampler)
    if info.timestep and not model.process.discrete:
        raise ValueError(f"the {sampler} sampler steps over the discrete DDPM table; this model's noise process is "
                         f"{model.process.name}: use " + ", ".join(n for n, i in SAMPLERS.items() if not i.timestep))
    if info.timestep and spacing is not None:
        raise ValueError(f"a sigma spacing ({spacing}) applies to the σ-space samplers, not to {sampler}")
    return info


@torch.no_grad()
def sample_latents(model: LatentDiffusion, batch_size: int, cond: Any = None, *, uncond: Any = None,
                   scale: float = 1.0, sampler: str = "ddim", steps: int = 50, eta: float = 0.0,
                   spacing: Optional[str] = None, shape: Optional[Sequence[int]] = None,
                   x_T: Optional[torch.Tensor] = None, known: Optional[torch.Tensor] = None,
                   known_mask: Optional[torch.Tensor] = None, seed: Optional[int] = None,
                   callback: Optional[StepCallback] = None, progress: bool = True) -> torch.Tensor:
    """Latents (batch_size, *shape) from `sampler` with classifier-free guidance at `scale` (when `uncond`).

    `shape` is the latent (C, h, w), default the training size. `known` with `known_mask` (latent space,
    **1 = keep**) keeps the known latents at every step, for every sampler, and exactly at the end. `eta`
    is DDIM's noise (0 = deterministic) and the stochastic σ-space samplers' (0 = their default, 1). `spacing`
    picks the σ-space samplers' noise levels (`ldm.models.diffusion.spacing.SIGMA_SPACINGS`; default the
    process's own). `ddpm` is the DDPM paper's ancestral sampler over all T steps (`steps` is ignored).
    `callback(i, x̂_0)` runs after each step. DDIM and PLMS use trailing timesteps for a zero-terminal-SNR
    model (Lin et al. 2024, sec. 3.3: start at its pure noise).
    """
    info = _sampler_for(model, sampler, spacing)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if (known is None) != (known_mask is None):
        raise ValueError("keeping known latents needs both `known` and `known_mask` (1 = keep)")
    if uncond is not None and scale == 1.0:
        uncond = None  # scale 1 is the conditional model: no second pass
    shape = tuple(shape) if shape is not None else (model.channels, model.image_size, model.image_size)
    if seed is not None:
        torch.manual_seed(seed)
    x_T = torch.randn((batch_size, *shape), device=model.device) if x_T is None else x_T.to(model.device)
    with precision_scope(model):
        if sampler in ("ddim", "plms"):
            ddim = (DDIMSampler if sampler == "ddim" else PLMSSampler)(model)
            discretize = "trailing" if model.schedule.zero_terminal_snr else "uniform"
            z, _ = ddim.sample(S=steps, batch_size=batch_size, shape=shape, conditioning=cond, eta=eta, x_T=x_T,
                               ddim_discretize=discretize,
                               unconditional_guidance_scale=scale, unconditional_conditioning=uncond,
                               mask=known_mask, x0=known, verbose=progress,
                               img_callback=None if callback is None else lambda x0, i: callback(i, x0))
        elif sampler == "ddpm":
            z, _ = ancestral_sample(model.denoiser(cond, uncond, scale), model.schedule, model.prediction, x_T,
                                    progress=progress, mask=known_mask, x0=known,
                                    callback=None if callback is None else
                                    lambda t, x, x0: callback(model.num_timesteps - 1 - t, x0))
        else:
            denoiser = model.sigma_denoiser(cond, uncond, scale)
            if known is not None:
                denoiser = keep_known(denoiser, known, known_mask)
            sigmas = make_sigmas(spacing, steps, model.process, device=model.device)
            z = info.fn(denoiser, x_T * sigmas[0], sigmas, eta=eta if eta > 0 else 1.0, disable=not progress,
                        callback=None if callback is None else lambda i, x, sigma, x0: callback(i, x0))
    if known is not None:
        z = known_mask * known + (1.0 - known_mask) * z
    return z.float()


@torch.no_grad()
def text_to_image(model: LatentDiffusion, prompts: Sequence[str], *, scale: float = 3.0, sampler: str = "ddim",
                  steps: int = 50, eta: float = 0.0, spacing: Optional[str] = None, height: Optional[int] = None,
                  width: Optional[int] = None, seed: Optional[int] = None, progress: bool = True,
                  callback: Optional[StepCallback] = None) -> torch.Tensor:
    """One image per prompt, (len(prompts), 3, H, W) in [−1, 1].

    `height`/`width` (pixels, multiples of the first stage's factor) may exceed the training size: the
    U-Net is convolutional, so it samples a larger latent (LDM paper, sec. 4.3.2).
    """
    cond, uncond = text_condition(model, prompts, scale)
    z = sample_latents(model, len(prompts), cond, uncond=uncond, scale=scale, sampler=sampler, steps=steps, eta=eta,
                       spacing=spacing,
                       shape=latent_shape(model, height, width), seed=seed, callback=callback, progress=progress)
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
def image_to_image(model: LatentDiffusion, images: torch.Tensor, prompts: Optional[Sequence[str]] = None, *,
                   strength: float = 0.75, scale: float = 3.0, sampler: str = "ddim", steps: int = 50,
                   eta: float = 0.0, spacing: Optional[str] = None, seed: Optional[int] = None,
                   progress: bool = True) -> torch.Tensor:
    """SDEdit (Meng et al. 2022) as Stable Diffusion's img2img: the images' latents are noised to step
    `strength · steps` of a `steps`-step run of `sampler`, which then denoises from there.

    DDIM and PLMS noise by DDIM's forward process (the reference's img2img); a σ-space sampler starts from
    z + σ·ε at the first noise level it runs. `ddpm` runs all T steps and cannot start midway.
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1] (the share of the steps to redo), got {strength}")
    info = _sampler_for(model, sampler, spacing)
    if sampler == "ddpm":
        raise ValueError("image_to_image needs a sampler that can start midway: ddim, plms or a σ-space sampler "
                         "(euler, dpmpp_2m, ...), not ddpm")
    n = images.shape[0]
    prompts = [""] * n if prompts is None else list(prompts)
    if len(prompts) != n:
        raise ValueError(f"got {len(prompts)} prompts for {n} images; give one per image (or none)")
    if seed is not None:
        torch.manual_seed(seed)
    cond, uncond = (text_condition(model, prompts, scale) if model.model.conditioning_key is not None
                    else (None, None))
    t_enc = max(1, int(strength * steps))
    with precision_scope(model):
        z = encode_images(model, images)
        if info.timestep:
            ddim = (DDIMSampler if sampler == "ddim" else PLMSSampler)(model)
            ddim.make_schedule(ddim_num_steps=steps, ddim_eta=eta, verbose=False)
            # Noised to the step decoding starts from (position t_enc − 1); the reference's img2img noises one
            # step further than it denoises from.
            z = ddim.stochastic_encode(z, torch.full((n,), t_enc - 1, device=model.device))
            z = ddim.decode(z, cond, t_enc, unconditional_guidance_scale=scale, unconditional_conditioning=uncond,
                            progress=progress)
        else:
            sigmas = make_sigmas(spacing, steps, model.process, device=model.device)[steps - t_enc:]
            z = info.fn(model.sigma_denoiser(cond, uncond, scale), z + torch.randn_like(z) * sigmas[0], sigmas,
                        eta=eta if eta > 0 else 1.0, disable=not progress)
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
            prompts: Optional[Sequence[str]] = None, *, scale: float = 1.0, sampler: str = "ddim", steps: int = 50,
            eta: float = 0.0, spacing: Optional[str] = None, seed: Optional[int] = None,
            progress: bool = True) -> torch.Tensor:
    """Fill the region where `masks` is 1; the result keeps the other pixels exactly.

    A model trained for inpainting (`LatentInpaintDiffusion`) is conditioned on the masked image and mask,
    as the reference's inpaint.py does. Any other model keeps the known latents at every step (RePaint-style
    replacement, Lugmayr et al. 2022, without resampling): a latent cell counts as known when none of its
    pixels is to be filled. A text model takes `prompts` (default empty, i.e. unconditional).
    """
    _check_masks(images, masks)
    images, masks = images.to(model.device), (masks >= 0.5).to(model.device, images.dtype)
    n = images.shape[0]
    shape = latent_shape(model, images.shape[-2], images.shape[-1])
    if seed is not None:
        torch.manual_seed(seed)
    if isinstance(model, LatentInpaintDiffusion):
        cond = model.inpainting_condition(images * (1.0 - masks), masks)
        z = sample_latents(model, n, cond, sampler=sampler, steps=steps, eta=eta, spacing=spacing, shape=shape,
                           progress=progress)
    else:
        cond = uncond = None
        if isinstance(model.cond_stage_model, ClassEmbedder):
            raise ValueError("inpaint() conditions text models on prompts and unconditional models on nothing; "
                             "a class-conditional model is not supported here (use a text or inpainting model)")
        if model.model.conditioning_key is not None:
            cond, uncond = text_condition(model, [""] * n if prompts is None else list(prompts), scale)
        factor = downsampling_factor(model)
        known_mask = 1.0 - F.max_pool2d(masks, factor) if factor > 1 else 1.0 - masks
        z = sample_latents(model, n, cond, uncond=uncond, scale=scale, sampler=sampler, steps=steps, eta=eta,
                           spacing=spacing, shape=shape, known=encode_images(model, images), known_mask=known_mask, progress=progress)
    return images * (1.0 - masks) + masks * decode_latents(model, z)
