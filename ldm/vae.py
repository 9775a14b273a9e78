"""Swapping a latent diffusion model's first stage for another one of the same architecture, as AUTOMATIC1111 and
ComfyUI users swap VAEs: typically a decoder fine-tuned on their images (configs/autoencoder/decoder_finetune.yaml),
whose encoder, and so whose latent space, is the one the diffusion model was trained in (as Stability's
sd-vae-ft-mse is for Stable Diffusion).

A VAE is named by a path (`vae_weights_file`): a first stage's `.safetensors` export or training `.ckpt`, its model
directory (``model.safetensors``) or its training run (``checkpoints/last.ckpt``). A whole latent diffusion model's
weights are read for their ``first_stage_model.*`` part. A training checkpoint's EMA weights are used where it keeps
them (the ones it samples with), its training-only ``loss.*`` weights never. Used by `load_model(..., vae=PATH)` and
``--vae`` of the sampling scripts, by `ldm-export --vae` (the model directory then carries the decoder), and by
``model.params.vae`` of a diffusion model's config (fine-tuning runs that sample through it).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Union

import torch
from torch import nn

from ldm import assets
from ldm.checkpoint import TRAINING_ONLY_PREFIXES, load_state_dict

log = logging.getLogger(__name__)

FIRST_STAGE_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."
# The parts that make the latent space: a VAE that changes them no longer decodes the latents the model draws.
ENCODER_PREFIXES = ("encoder.", "quant_conv.")


class VaeMismatch(ValueError):
    """A VAE whose weights do not fit the model's first stage (another architecture, or no first stage at all)."""


def vae_weights_file(path: Union[str, Path]) -> Path:
    """The weights file a VAE path names: the file itself, a model directory's ``model.safetensors`` or a training
    run's ``checkpoints/last.ckpt``."""
    found = assets.resolve(path)  # the shipped first stages by their repository paths, from anywhere
    if found.is_file():
        return found
    if found.is_dir():
        for candidate in (found / "model.safetensors", found / "checkpoints" / "last.ckpt"):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"VAE {path}: a folder with neither model.safetensors (a model directory) nor "
                                "checkpoints/last.ckpt (a training run); give one of those, or the weights file")
    raise FileNotFoundError(f"VAE {path}: no such file or folder; give a first stage's .safetensors or .ckpt, its "
                            "model directory or its training run")


def _first_stage_part(state: Mapping[str, torch.Tensor], first_stage: nn.Module) -> dict[str, torch.Tensor]:
    """The first stage's weights in `state` (a first stage's own, or a whole model's ``first_stage_model.*``), the
    EMA weights in place of the trained ones where the file keeps them, without training-only weights."""
    if any(k.startswith(FIRST_STAGE_PREFIX) for k in state):
        state = {k[len(FIRST_STAGE_PREFIX):]: v for k, v in state.items() if k.startswith(FIRST_STAGE_PREFIX)}
    ema = {k[len(EMA_PREFIX):]: v for k, v in state.items() if k.startswith(EMA_PREFIX)}
    weights = {k: v for k, v in state.items() if not k.startswith((*TRAINING_ONLY_PREFIXES, EMA_PREFIX))}
    for name, _ in first_stage.named_parameters():  # `LitEma` names a parameter's copy without its dots
        if name.replace(".", "") in ema:
            weights[name] = ema[name.replace(".", "")]
    return weights


def _mismatch(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> str:
    """What keeps `state` from loading into a module whose state is `own` ("" when nothing does)."""
    shapes = [k for k in state if k in own and state[k].shape != own[k].shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if not own:
        return "the model has no first-stage weights (a pixel-space model): there is no VAE to swap"
    if len(missing) == len(own):
        return "the file holds none of the first stage's weights (is it a first stage's?)"
    problems = []
    if shapes:
        k = shapes[0]
        problems.append(f"{k} is {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
                        + (f" (and {len(shapes) - 1} more shapes differ)" if len(shapes) > 1 else ""))
    if missing:
        problems.append(f"{len(missing)} weights missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} weights the model lacks (e.g. {unexpected[0]})")
    return "; ".join(problems)


def vae_state(path: Union[str, Path], first_stage: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of the VAE `path` names, checked to fit `first_stage` key for key and shape for shape
    (`VaeMismatch`, one line naming the first difference, otherwise)."""
    file = vae_weights_file(path)
    state = _first_stage_part(load_state_dict(file), first_stage)
    problem = _mismatch(state, first_stage.state_dict())
    if problem:
        raise VaeMismatch(f"VAE {path} does not fit this model's first stage ({type(first_stage).__name__}): "
                          f"{problem}; give a first stage of the model's architecture (e.g. a decoder fine-tuned "
                          "from its own, configs/autoencoder/decoder_finetune.yaml)")
    return state


@torch.no_grad()
def swap_vae(model: nn.Module, path: Union[str, Path]) -> Path:
    """Replace the weights of `model.first_stage_model` by the VAE's `path` names (`vae_state`); returns its
    weights file. A VAE whose encoder differs from the model's is loaded with a warning: the diffusion model's
    latents then mean something else to it (a decoder-only fine-tune keeps the encoder)."""
    first_stage = model.first_stage_model
    state = vae_state(path, first_stage)
    own = first_stage.state_dict()
    changed = [k for k in state if k.startswith(ENCODER_PREFIXES) and not torch.equal(state[k], own[k].to(state[k]))]
    if changed:
        log.warning(f"VAE {path} has another encoder than the model's first stage ({changed[0]} differs): its latent "
                    "space is not the one the diffusion model was trained in, so samples may be off; a decoder-only "
                    "fine-tune (configs/autoencoder/decoder_finetune.yaml) keeps the encoder")
    first_stage.load_state_dict(state, strict=True)
    file = vae_weights_file(path)
    log.info(f"first stage weights from the VAE {file}")
    return file
