"""Convert a text-to-image latent diffusion model to a diffusers pipeline folder, or back; or the U-Net alone.

    ldm-convert-diffusers --to-diffusers txt2img --outdir out/txt2img-diffusers
    ldm-convert-diffusers --from-diffusers out/txt2img-diffusers --outdir models/ldm/txt2img-imported
    ldm-convert-diffusers --to-diffusers txt2img --unet-only --outdir out/txt2img-unet
    ldm-convert-diffusers --from-diffusers out/txt2img-unet --outdir out/unet

(`python scripts/convert_diffusers.py ...` is the same.) --to-diffusers takes a built-in model name, a model
directory (config.yaml + model.safetensors), a LatentDiffusion config .yaml with --ckpt (a training .ckpt
gives its EMA weights), or, with --unet-only, a U-Net config written by --from-diffusers (unet.yaml, weights
default to unet.safetensors beside it).

By default it writes a whole `LDMTextToImagePipeline` (`DiffusionPipeline.save_pretrained`'s folder:
model_index.json, vqvae/, bert/, tokenizer/, unet/, scheduler/; see ldm/diffusers_bridge/pipeline.py),
which `diffusers.DiffusionPipeline.from_pretrained(outdir)` loads. Its DDIM images equal ours for a model
whose text encoder was trained on 77-token prompts; the pipeline pads every prompt to 77 tokens, so a model
trained on shorter prompts (the built-in ones: 16) gives different images there. With an f=4 autoencoder
pass height=width=8 x latent size to the pipeline, or leave them out (the defaults are set so).

--from-diffusers reads such a pipeline folder and writes our model directory (config.yaml,
model.safetensors, vocab.txt) that load_model and the sampling scripts load; or a UNet2DConditionModel
folder (config.json + weights) and writes unet.yaml (`target: ...UNetModel` and its params, for
`ldm.util.instantiate_from_config`) and unet.safetensors (the CompVis key names). Needs the diffusers
package: pip install "ldm[diffusers]" (or pip install diffusers).
"""
from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from ldm.checkpoint import load_state_dict, load_weights, save_safetensors
from ldm.diffusers_bridge.pipeline import export_pipeline, import_pipeline
from ldm.diffusers_bridge.unet import diffusers_unet_class, from_diffusers, to_diffusers, unet_params
from ldm.inference import load_model
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.script_args import HelpFormatter, check_writable, command_line, user_errors
from ldm.util import instantiate_from_config

UNET_TARGET = f"{UNetModel.__module__}.{UNetModel.__name__}"


def is_unet_config(model: str) -> bool:
    """Whether `model` is a U-Net config (as --from-diffusers writes unet.yaml), not a whole model."""
    path = Path(model)
    return path.suffix in (".yaml", ".yml") and path.is_file() and OmegaConf.load(path).get("target") == UNET_TARGET


def load_unet(model: str, ckpt: Optional[str]) -> UNetModel:
    """The U-Net of a LatentDiffusion model (as `ldm.inference.load_model` finds it), or of a unet.yaml."""
    if is_unet_config(model):
        unet = instantiate_from_config(OmegaConf.load(model))
        weights = Path(ckpt) if ckpt is not None else Path(model).with_name("unet.safetensors")
        load_weights(unet, load_state_dict(weights), source=str(weights))
        return unet.eval()
    return load_model(model, ckpt).model.diffusion_model


@contextlib.contextmanager
def conversion_errors() -> Iterator[None]:
    """A missing file, a model diffusers cannot represent, or no diffusers installed: a message, exit status 1."""
    try:
        with user_errors():
            yield
    except ImportError as e:
        raise SystemExit(f"error: {e}") from e


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--to-diffusers", nargs="?", const="", metavar="MODEL",
                      help="convert our model: a built-in name, a model directory, or a config .yaml (or --config)")
    mode.add_argument("--from-diffusers", type=Path, metavar="DIR",
                      help="convert a diffusers pipeline folder (model_index.json) or UNet2DConditionModel folder "
                           "(config.json + weights)")
    parser.add_argument("--config", default=None, help="with --to-diffusers: the model, as MODEL")
    parser.add_argument("--ckpt", default=None,
                        help="with --to-diffusers: the weights (.safetensors or a training .ckpt) for a config .yaml")
    parser.add_argument("--unet-only", action="store_true",
                        help="with --to-diffusers: write the U-Net alone (a UNet2DConditionModel folder)")
    parser.add_argument("--outdir", type=Path, required=True, help="folder to write")
    opt = parser.parse_args(argv)
    with user_errors():
        check_writable(opt.outdir)  # before converting anything

    if opt.from_diffusers is not None:
        if opt.config is not None or opt.ckpt is not None:
            parser.error("--config and --ckpt go with --to-diffusers; --from-diffusers reads DIR/config.json")
        if (opt.from_diffusers / "model_index.json").is_file():
            with conversion_errors():
                import_pipeline(opt.from_diffusers, opt.outdir)
            print(f"wrote the model directory {opt.outdir} (config.yaml, model.safetensors, vocab.txt)")
            return
        if not (opt.from_diffusers / "config.json").is_file():
            parser.error(f"--from-diffusers {opt.from_diffusers}: no model_index.json or config.json there (give a "
                         "folder written by DiffusionPipeline.save_pretrained or UNet2DConditionModel.save_pretrained)")
        with conversion_errors():
            # low_cpu_mem_usage needs `accelerate`; without it diffusers falls back to this anyway, with a warning.
            # (low_cpu_mem_usage needs `accelerate`; diffusers would fall back to False with a warning.)
            folder = diffusers_unet_class().from_pretrained(opt.from_diffusers, low_cpu_mem_usage=False)
            unet = from_diffusers(folder)
        opt.outdir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create({"target": UNET_TARGET, "params": unet_params(unet)}), opt.outdir / "unet.yaml")
        save_safetensors(unet.state_dict(), opt.outdir / "unet.safetensors",
                         metadata={"source": str(opt.from_diffusers)})
        print(f"wrote {opt.outdir / 'unet.yaml'} and {opt.outdir / 'unet.safetensors'}")
        return

    if opt.to_diffusers and opt.config is not None:
        parser.error("give the model once: --to-diffusers MODEL or --to-diffusers --config MODEL")
    model = opt.to_diffusers or opt.config
    if not model:
        parser.error("--to-diffusers needs a model: a built-in name (txt2img), a model directory, or a config .yaml")
    if opt.unet_only or is_unet_config(model):
        with conversion_errors():
            converted = to_diffusers(load_unet(model, opt.ckpt))
        converted.save_pretrained(opt.outdir)
        print(f"wrote {opt.outdir / 'config.json'} and {opt.outdir / 'diffusion_pytorch_model.safetensors'}")
        return
    with conversion_errors():
        export_pipeline(load_model(model, opt.ckpt), opt.outdir)
    print(f"wrote the diffusers pipeline {opt.outdir} (model_index.json, vqvae, bert, tokenizer, unet, scheduler)")


cli = command_line(main)
