"""Convert a latent-diffusion U-Net to a diffusers UNet2DConditionModel folder, or back.

    python scripts/convert_diffusers.py --to-diffusers txt2img --outdir out/txt2img-unet-diffusers
    python scripts/convert_diffusers.py --to-diffusers --config cfg.yaml --ckpt last.ckpt --outdir out/unet
    python scripts/convert_diffusers.py --from-diffusers out/txt2img-unet-diffusers --outdir out/txt2img-unet

--to-diffusers takes a built-in model name, a model directory (config.yaml + model.safetensors), a
LatentDiffusion config .yaml with --ckpt (a training .ckpt gives its EMA weights), or a U-Net config
written by --from-diffusers (unet.yaml, weights default to unet.safetensors beside it). Only the U-Net is
converted (not the autoencoder or the conditioning encoder). It writes `save_pretrained`'s folder:
config.json + diffusion_pytorch_model.safetensors.

--from-diffusers reads such a folder and writes unet.yaml (`target: ...UNetModel` and its params, for
`ldm.util.instantiate_from_config`) and unet.safetensors (the CompVis key names, as
`model.diffusion_model.*` without that prefix). Needs the diffusers package: pip install -e .[bench].
"""
from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf


from ldm.checkpoint import load_state_dict, load_weights, save_safetensors
from ldm.inference import load_model
from ldm.modules.diffusionmodules.diffusers_conversion import (diffusers_unet_class, from_diffusers,
                                                                to_diffusers, unet_params)
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.script_args import HelpFormatter, command_line, user_errors
from ldm.util import instantiate_from_config

UNET_TARGET = f"{UNetModel.__module__}.{UNetModel.__name__}"


def load_unet(model: str, ckpt: Optional[str]) -> UNetModel:
    """The U-Net of a LatentDiffusion model (as `ldm.inference.load_model` finds it), or of a unet.yaml."""
    path = Path(model)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        config = OmegaConf.load(path)
        if config.get("target") == UNET_TARGET:
            unet = instantiate_from_config(config)
            weights = Path(ckpt) if ckpt is not None else path.with_name("unet.safetensors")
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
                      help="convert a diffusers UNet2DConditionModel folder (config.json + weights)")
    parser.add_argument("--config", default=None, help="with --to-diffusers: the model, as MODEL")
    parser.add_argument("--ckpt", default=None,
                        help="with --to-diffusers: the weights (.safetensors or a training .ckpt) for a config .yaml")
    parser.add_argument("--outdir", type=Path, required=True, help="folder to write")
    opt = parser.parse_args(argv)

    if opt.from_diffusers is not None:
        if opt.config is not None or opt.ckpt is not None:
            parser.error("--config and --ckpt go with --to-diffusers; --from-diffusers reads DIR/config.json")
        if not (opt.from_diffusers / "config.json").is_file():
            parser.error(f"--from-diffusers {opt.from_diffusers}: no config.json there (give a folder written by "
                         "UNet2DConditionModel.save_pretrained, e.g. a pipeline's unet/ folder)")
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
    with conversion_errors():
        converted = to_diffusers(load_unet(model, opt.ckpt))
    converted.save_pretrained(opt.outdir)
    print(f"wrote {opt.outdir / 'config.json'} and {opt.outdir / 'diffusion_pytorch_model.safetensors'}")


cli = command_line(main)
