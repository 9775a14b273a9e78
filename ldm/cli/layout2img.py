"""Layout-to-image synthesis: an image from boxes with class labels (the LDM paper's sec. 4.3.1,
configs/latent-diffusion/layout2img_shapes.yaml).

    python scripts/layout2img.py --layout boxes.json --outdir outputs/layout2img --n_samples 4

The layout is JSON, a list of at most two objects, each {"shape": "circle", "colour": "red",
"box": [x0, y0, x1, y1]} with the box in [0, 1] image coordinates (x right, y down); see ldm/data/layout.py.
Samples go to <outdir>/samples/NNNNN.png, and one grid per run: [the layout drawn, samples...].
"""
import argparse
from pathlib import Path

import torch

from ldm.data.layout import drawable_layout, read_layout_file
from ldm.data.shapes import CLASS_NAMES
from ldm.inference import layout_to_image
from ldm.script_args import (HelpFormatter, SampleWriter, add_model_args, add_output_args, add_sampler_args,
                             command_line, guidance_scale, model_from_args, sampler_kwargs)
from ldm.visualization import render_boxes


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--layout", type=Path, required=True, help="the layout: a JSON file of boxes")
    parser.add_argument("--scale", type=guidance_scale, default=3.0,
                        help="classifier-free guidance scale against the empty layout (1 = no guidance)")
    add_output_args(parser, "outputs/layout2img-samples")
    add_model_args(parser, default_model="layout2img")
    add_sampler_args(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = get_parser()
    opt = parser.parse_args(argv)
    if not opt.layout.is_file():
        parser.error(f"--layout {opt.layout}: no such file")
    try:
        layout = read_layout_file(opt.layout)
    except ValueError as e:
        parser.error(f"--layout: {e}")
    writer = SampleWriter(opt)
    model = model_from_args(opt)
    images = layout_to_image(model, [layout] * opt.n_samples, scale=opt.scale, **sampler_kwargs(opt))
    description = ", ".join(f"{CLASS_NAMES[label]} at {[round(v, 3) for v in box]}" for label, box in layout)
    writer.add(images, description, opt.seed)
    drawn = render_boxes([drawable_layout(layout)], size=images.shape[-1])
    writer.finish(torch.cat([drawn, images.cpu()]), opt.n_samples + 1)


cli = command_line(main)
