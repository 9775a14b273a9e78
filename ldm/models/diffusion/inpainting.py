"""Latent diffusion trained for inpainting: the condition is the masked image and its mask.

The U-Net sees ``[z_t, E(masked image), mask↓]`` stacked on channels (``conditioning_key: concat``, so
``in_channels = 2·C + 1``), as the reference's ``inpainting_big`` model and Stable Diffusion's inpainting
model do. The mask is 1 where the model must fill (``masked_image = (1 − mask) · image``, the reference's
convention) and is resized to the latent grid by nearest-neighbour interpolation, as the reference's
``scripts/inpaint.py`` does, so its released inpainting checkpoint sees the inputs it was trained on.

With ``conditioning_key: hybrid`` the model also reads a caption through cross-attention, as Stable
Diffusion's inpainting model does (its text encoder is `cond_stage_config`, its batch key `cond_stage_key`):
a hole that hides a whole object can then be filled with the object the caption names. Caption dropout
(`ucg_training`) trains the text-free score that guidance needs; the masked image is never dropped.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ldm.checkpoint import CheckpointError, load_state_dict, load_weights
from ldm.models.diffusion.ddpm import DDPM, LatentDiffusion
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

log = logging.getLogger(__name__)


_LEARNED_PREFIXES = ("model.", "model_ema.", "cond_stage_model.", "first_stage_model.")
# The U-Net's first convolution, as a model key and as its EMA copy (LitEma drops the dots).
_FIRST_CONV_KEYS = ("model.diffusion_model.input_blocks.0.0.weight", "model_ema.diffusion_modelinput_blocks00weight")


class LatentInpaintDiffusion(LatentDiffusion):
    """`LatentDiffusion` whose condition is ``(masked image, mask)``, encoded by the frozen first stage, and with
    ``conditioning_key: hybrid`` also a caption.

    The raw image condition is one NCHW tensor, the masked image's channels then the mask channel (so
    samplers, loggers and `get_input` handle it as any image condition); `inpainting_condition` turns it into
    the concat input ``[scale_factor · E(masked image), mask↓]``. The latent of the masked image is the
    posterior mode (deterministic) times the same `scale_factor` as z, so both have the statistics the U-Net
    expects. A hybrid model's raw condition is ``{"c_concat": that tensor, "c_crossattn": captions}`` and its
    learned one ``{"c_concat": [concat input], "c_crossattn": [τθ(captions)]}``.
    """

    def __init__(self, mask_key: str = "mask", masked_image_key: str = "masked_image",
                 cond_stage_config: Any = "__is_first_stage__", conditioning_key: Optional[str] = "concat",
                 cond_stage_key: str = "masked_image", init_from_text_model: Optional[str] = None,
                 **kwargs: Any) -> None:
        if conditioning_key == "concat" and cond_stage_config != "__is_first_stage__":
            raise ValueError("LatentInpaintDiffusion with conditioning_key 'concat' encodes the masked image with the "
                             "first stage; set cond_stage_config: __is_first_stage__ (or leave it out), or use "
                             "conditioning_key 'hybrid' to add a text encoder")
        if conditioning_key == "hybrid" and cond_stage_config in ("__is_first_stage__", "__is_unconditional__"):
            raise ValueError("LatentInpaintDiffusion with conditioning_key 'hybrid' reads captions: set "
                             "cond_stage_config to a text encoder and cond_stage_key to the caption key")
        if conditioning_key not in ("concat", "hybrid"):
            raise ValueError(f"LatentInpaintDiffusion stacks the masked image on channels; conditioning_key must be "
                             f"'concat' or 'hybrid' (with a caption), got {conditioning_key!r}")
        super().__init__(cond_stage_config=cond_stage_config, conditioning_key=conditioning_key,
                         cond_stage_key=cond_stage_key, **kwargs)
        self.mask_key = mask_key
        self.masked_image_key = masked_image_key
        if init_from_text_model is not None:
            self.init_from_text_model(init_from_text_model)

    def init_from_text_model(self, path: str) -> None:
        """Start from a text-to-image model's weights (`path`: its .safetensors or .ckpt), as Stable Diffusion's
        inpainting model started from Stable Diffusion: every key as stored, except the U-Net's first
        convolution, whose added input channels (the masked image's latent and the mask) start at zero. The
        model then begins as the text-to-image model it came from, with its latent scale and text encoder,
        and learns to read the masked image from there."""
        state_dict = load_state_dict(path)
        own = self.state_dict()
        for key in [k for k in state_dict if k.endswith(_FIRST_CONV_KEYS) and k in own]:
            old, new = state_dict[key], own[key]
            if old.shape != new.shape:
                if old.shape[0] != new.shape[0] or old.shape[2:] != new.shape[2:] or old.shape[1] > new.shape[1]:
                    raise CheckpointError(f"{path}: the U-Net's first convolution {tuple(old.shape)} cannot be widened "
                                          f"to {tuple(new.shape)}; the text model's U-Net must match this one but for "
                                          "its input channels")
                widened = torch.zeros_like(new)
                widened[:, :old.shape[1]] = old
                state_dict[key] = widened
        # A model directory's weights hold the EMA already folded into `model.*`: the EMA then starts from them.
        has_ema = any(k.startswith("model_ema.") for k in state_dict)
        ignore = ("loss.", "first_stage_model.loss.") + (() if self.use_ema and has_ema else ("model_ema.",))
        # The noise schedule's tables are this config's own (they are made from it, not learned).
        ignore += tuple(k for k in own if not k.startswith(_LEARNED_PREFIXES) and k != "scale_factor")
        if not any(k.startswith("first_stage_model.") for k in state_dict):
            ignore += ("first_stage_model.",)  # a model directory leaves the first stage to its own file
        load_weights(self, state_dict, strict=True, ignore_prefixes=ignore, source=str(path))
        if self.use_ema and not has_ema:
            for param, shadow in self.model_ema._tracked(self.model):
                shadow.copy_(param.detach())
        self.restarted_from_ckpt = True  # keep the text model's scale_factor: its U-Net was trained on it
        log.info(f"{type(self).__name__}: initialised from the text-to-image model {path} (input convolution widened "
                 "with zeros)")

    @property
    def text_conditioned(self) -> bool:
        """Whether the model reads a caption beside the masked image (``conditioning_key: hybrid``)."""
        return self.model.conditioning_key == "hybrid"

    def get_raw_condition(self, batch: Mapping, key: Optional[str] = None) -> Any:
        """``cat([masked image, mask])`` on channels, NCHW (the mask 1 = fill); a hybrid model's with its captions."""
        for name in (self.masked_image_key, self.mask_key):
            if name not in batch:
                raise KeyError(f"an inpainting batch needs {name!r} (it has {sorted(batch)}); the built-in data "
                               "gives it with `with_mask: true` in the dataset params")
        image = torch.cat([DDPM.get_input(self, batch, self.masked_image_key),
                           DDPM.get_input(self, batch, self.mask_key)], dim=1)
        if not self.text_conditioned:
            return image
        return {"c_concat": image, "c_crossattn": super().get_raw_condition(batch, key)}

    def get_learned_conditioning(self, c: Any) -> Any:
        """The U-Net's condition from `get_raw_condition`'s: the concat input, and a hybrid model's τθ(captions)."""
        if not self.text_conditioned:
            return self.inpainting_condition(c[:, :-1], c[:, -1:])
        image = c["c_concat"]
        return {"c_concat": [self.inpainting_condition(image[:, :-1], image[:, -1:])],
                "c_crossattn": [super().get_learned_conditioning(c["c_crossattn"])]}

    def text_condition(self, concat: torch.Tensor, captions: Sequence[str]) -> dict[str, list]:
        """A hybrid model's learned condition for a concat input already made (`inpainting_condition`)."""
        return {"c_concat": [concat], "c_crossattn": [super().get_learned_conditioning(list(captions))]}

    def unconditional_guidance_inputs(self, cond: Any, batch: Mapping, n: int) -> Any:
        # Guidance drops the caption only: the masked image stays in both halves (as in Stable Diffusion's
        # inpainting); a concat-only model has nothing to drop.
        if not self.text_conditioned or not self.ucg_training or self.cond_stage_key not in self.ucg_training:
            return None
        return self.text_condition(cond["c_concat"][0], [self.ucg_training[self.cond_stage_key].get("val", "")] * n)

    @torch.no_grad()
    def inpainting_condition(self, masked_image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The U-Net's concat input for a masked image (N, 3, H, W) in [−1, 1] and its mask (N, 1, H, W)."""
        posterior = self.encode_first_stage(masked_image.to(self.device))
        latent = posterior.mode() if isinstance(posterior, DiagonalGaussianDistribution) else posterior
        latent = self.get_first_stage_encoding(latent)  # the same scaling (and channel norm) as z
        mask = F.interpolate(mask.to(latent), size=latent.shape[-2:])
        return torch.cat([latent, mask], dim=1)
