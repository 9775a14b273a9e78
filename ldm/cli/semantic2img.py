"""Semantic image synthesis: an image from a label map (the LDM paper's sec. 4.3.2,
configs/latent-diffusion/semantic2img_shapes.yaml).

    python scripts/semantic2img.py --label map.png --outdir outputs/semantic2img --n_samples 4

The label map is a single-channel PNG of class indices (the built-in model: 0 background, 1 + class of each
object, class = shape * 6 + colour, see ldm/data/semantic.py; `--write-example N` writes the map of built-in
test scene N to start from). Its size sets the image size (multiples of the first stage's factor times 4;
larger than the 32x32 training size works too). Samples go to <outdir>/samples/NNNNN.png, and one grid per run:
[the map in colour, samples...].
"""
import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm.data.semantic import ShapesSemantic, label_palette, read_label_png
from ldm.inference import semantic_classes, semantic_to_image
from ldm.script_args import (HelpFormatter, SampleWriter, add_model_args, add_output_args, add_sampler_args,
                             command_line, model_from_args, sampler_kwargs)
from ldm.visualization import render_label_maps


def read_label_map(parser: argparse.ArgumentParser, path: Path) -> torch.Tensor:
    if not path.is_file():
        parser.error(f"--label {path}: no such file (give a single-channel PNG of class indices)")
    try:
        return torch.from_numpy(read_label_png(path))[None]
    except ValueError as e:
        parser.error(f"--label {e} (--write-example writes one)")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--label", type=Path, help="the label map: a PNG of class indices")
    source.add_argument("--write-example", type=int, metavar="N",
                        help="write the label map of built-in test scene N to <outdir>/label-N.png and stop")
    add_output_args(parser, "outputs/semantic2img-samples")
    add_model_args(parser, default_model="semantic2img")
    add_sampler_args(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = get_parser()
    opt = parser.parse_args(argv)
    if opt.write_example is not None:
        opt.outdir.mkdir(parents=True, exist_ok=True)
        item = ShapesSemantic(split="test", size=32)[opt.write_example]
        path = opt.outdir / f"label-{opt.write_example}.png"
        Image.fromarray(item["label_map"].astype(np.uint8), mode="L").save(path)
        print(f"wrote {path} (the scene: {item['caption']})")
        return
    labels = read_label_map(parser, opt.label)
    writer = SampleWriter(opt)
    model = model_from_args(opt)
    images = semantic_to_image(model, labels.expand(opt.n_samples, -1, -1), **sampler_kwargs(opt))
    writer.add(images, f"semantic map {opt.label.name}", opt.seed)
    one_hot = torch.nn.functional.one_hot(labels, semantic_classes(model)).permute(0, 3, 1, 2)
    shown = render_label_maps(one_hot, label_palette(semantic_classes(model)))
    writer.finish(torch.cat([shown, images.cpu()]), opt.n_samples + 1)


cli = command_line(main)
