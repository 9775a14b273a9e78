"""Tiny random-weight model directories (config.yaml + model.safetensors) for end-to-end script tests.

They have the built-in models' interfaces (32x32 images, 8x8x4 latents) at a fraction of the size, and 16
diffusion steps so even the 1000-step-by-default ancestral sampler is quick. DDIM/PLMS step counts must
divide the 16 steps evenly (1, 2, 4, 8, 16).
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ldm.checkpoint import save_safetensors
from ldm.util import instantiate_from_config

TXT2IMG_CONFIG = Path(__file__).resolve().parent / "configs" / "ldm_tiny_txt2img.yaml"


def txt2img_config() -> dict:
    return OmegaConf.to_container(OmegaConf.load(TXT2IMG_CONFIG), resolve=True)


def class_config() -> dict:
    """Class-conditional (6 classes and a null class for guidance), through cross-attention as cin256."""
    config = txt2img_config()
    params = config["model"]["params"]
    params.update(cond_stage_key="class_label", cond_stage_trainable=True,
                  ucg_training={"class_label": {"p": 0.1, "val": 6}})
    params["cond_stage_config"] = {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                                   "params": {"embed_dim": 32, "n_classes": 6, "key": "class_label",
                                              "add_null_class": True}}
    return config


def inpainting_config() -> dict:
    """As configs/latent-diffusion/inpainting.yaml: concat of z_t, the masked image's latent and the mask."""
    config = txt2img_config()
    params = config["model"]["params"]
    config["model"]["target"] = "ldm.models.diffusion.inpainting.LatentInpaintDiffusion"
    for key in ("cond_stage_config", "cond_stage_trainable", "ucg_training"):
        params.pop(key)
    params.update(cond_stage_key="masked_image", conditioning_key="concat")
    unet = params["unet_config"]["params"]
    unet.update(in_channels=9, use_spatial_transformer=False)
    unet.pop("context_dim")
    unet.pop("transformer_depth")
    return config


def text_inpainting_config() -> dict:
    """As configs/latent-diffusion/inpainting_txt.yaml: the tiny txt2img model with the masked image and mask
    stacked on its input (hybrid conditioning)."""
    config = txt2img_config()
    config["model"]["target"] = "ldm.models.diffusion.inpainting.LatentInpaintDiffusion"
    config["model"]["params"]["conditioning_key"] = "hybrid"
    config["model"]["params"]["unet_config"]["params"]["in_channels"] = 9
    return config


def write_model_dir(directory: Path, config: dict, seed: int = 0) -> Path:
    """Build `config`'s model with seeded random weights and write it as a model directory."""
    torch.manual_seed(seed)
    model = instantiate_from_config(copy.deepcopy(config)["model"])
    with torch.no_grad():
        # The U-Net zero-initialises its output layers (a fresh model predicts 0 whatever its input); give
        # them small random values so conditions and guidance change the samples, as in a trained model.
        for param in model.model.parameters():
            if not param.any():
                param.normal_(0.0, 0.05)
    directory.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(config), directory / "config.yaml")
    # As an export: the weights to sample with, no EMA copy.
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("model_ema.")}
    save_safetensors(state, directory / "model.safetensors")
    return directory
