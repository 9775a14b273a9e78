"""Benchmark: where a text-to-image model of the built-in shapes loses the shape, measured with the judge.

    python bench/shape_diagnostics.py                       # the shipped txt2img model
    python bench/shape_diagnostics.py --model <model dir or config.yaml> [--ckpt <weights>] [-n 128]
    python bench/shape_diagnostics.py --class-model <run>/configs/<...>-project.yaml --class-ckpt <run>/checkpoints/last.ckpt

Three measurements on `n` validation images (seen colour-shape pairs), each read by the attribute classifier:
1. **Noised latents, decoded as they are**: how much shape the latent keeps under noise of the schedule's σ_t
   (no model involved: the ceiling a denoiser starts from).
2. **One denoising step**: the model's x̂₀ from x_t with the right caption, decoded; an ideal denoiser keeps at
   least what (1) keeps.
3. **SDEdit at strength s** (DDIM 20 steps, guidance 3): the image noised to s and regenerated, once with its
   own caption (shape kept?) and once with the caption's shape word swapped (shape followed?).

4. **Confusion**: one object in the center for every size, colour and shape: the shape read against the shape
   asked, and per size.
5. **A picture**: "a large red <shape> in the center" for every shape, four seeds (DPM-Solver++ 20 steps,
   guidance 3), above real images: bench/results/shape_diagnostics.png.

With `--class-model` (a model of configs/latent-diffusion/class2img.yaml), instead: 4 samples per colour-shape
class, and how often the asked shape / colour is in the image, against the same with shuffled labels (chance).
Whether a class label, which cannot be confused with another word, makes the shape appear.

Prints a table and writes bench/results/shape_diagnostics.md. The classifier only measures.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ldm.data.shapes import COLOURS, NUM_CLASSES, SHAPES, SIZES, ShapesValidation  # noqa: E402
from ldm.evaluation.attribute_classifier import load_attribute_classifier  # noqa: E402
from ldm.evaluation.prompt_following import prompt_match  # noqa: E402
from ldm.evaluation.reconstruction import dataset_images  # noqa: E402
from ldm.image_io import save_grid  # noqa: E402
from ldm.inference import (decode_latents, encode_images, generate, image_to_image, load_model,  # noqa: E402
                           text_to_image)
from ldm.script_args import user_errors  # noqa: E402

TIMESTEPS = (10, 50, 100, 200, 400)
STRENGTHS = (0.2, 0.4, 0.6, 0.8, 1.0)


def swap_shape(caption: str) -> str:
    """The caption with its first shape word replaced by the shape three places further in SHAPES."""
    for i, shape in enumerate(SHAPES):
        if re.search(rf"\b{shape}\b", caption):
            return re.sub(rf"\b{shape}\b", SHAPES[(i + 3) % len(SHAPES)], caption, count=1)
    raise ValueError(f"no shape word in {caption!r}")


@torch.no_grad()
def save_shape_grid(model: torch.nn.Module, path: Path, real: torch.Tensor, seeds: int = 4, zoom: int = 4) -> None:
    """One column per shape, one row per seed, and a last row of real images; nearest-neighbour zoomed."""
    captions = [f"a large red {shape} in the center" for shape in SHAPES]
    samples = [text_to_image(model, captions, scale=3.0, sampler="dpmpp_2m", steps=20, seed=seed, progress=False)
               for seed in range(seeds)]
    tiles = torch.cat([*samples, real.to(samples[0].device)]).clamp(-1, 1)
    save_grid(F.interpolate(tiles, scale_factor=zoom, mode="nearest"), path, nrow=len(SHAPES))


@torch.no_grad()
def shape_confusion(model: torch.nn.Module, judge: torch.nn.Module, seeds: int = 2) -> str:
    """Markdown: "a <size> <colour> <shape> in the center" for every size, colour and shape, `seeds` samples each
    (DPM-Solver++ 20 steps, guidance 3): the shape read against the shape asked, and the share read right per
    size. Which shapes the model draws, which it confuses, and whether small objects are the ones lost."""
    asked = [(size, colour, shape) for size in SIZES for colour in COLOURS for shape in SHAPES]
    captions = [f"a {size} {colour} {shape} in the center" for size, colour, shape in asked]
    images = torch.cat([text_to_image(model, captions, scale=3.0, sampler="dpmpp_2m", steps=20, seed=seed,
                                      progress=False) for seed in range(seeds)])
    read = judge.predict(images)["attributes"][:, 0, 0].cpu()
    shape_asked = torch.tensor([SHAPES.index(shape) for _, _, shape in asked]).repeat(seeds)
    size_asked = torch.tensor([SIZES.index(size) for size, _, _ in asked]).repeat(seeds)
    counts = torch.zeros(len(SHAPES), len(SHAPES), dtype=torch.long)
    counts.index_put_((shape_asked, read), torch.ones_like(read), accumulate=True)
    right = read == shape_asked
    lines = [f"| asked \\ read | {' | '.join(SHAPES)} | right |", "|---" * (len(SHAPES) + 2) + "|"]
    for k, shape in enumerate(SHAPES):
        row = counts[k]
        lines.append(f"| {shape} | {' | '.join(str(int(c)) for c in row)} | {row[k] / row.sum():.0%} |")
    by_size = ", ".join(f"{size} {right[size_asked == i].float().mean():.0%}" for i, size in enumerate(SIZES))
    return "\n".join(lines) + f"\n\nShape read right: {right.float().mean():.0%} ({by_size}).\n"


@torch.no_grad()
def class_conditional_reads(model: torch.nn.Module, judge: torch.nn.Module, per_class: int = 4) -> str:
    """Markdown: share of samples whose image holds the asked shape / colour (on any object), and chance."""
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    images = generate(model, len(labels), class_labels=labels.tolist(), scale=3.0, sampler="dpmpp_2m", steps=20,
                      seed=0, progress=False, batch_size=72)
    read = judge.predict(images)["attributes"].cpu()

    def present(asked: torch.Tensor) -> tuple[float, float]:
        shape, colour = asked // len(COLOURS), asked % len(COLOURS)
        return ((read[:, :, 0] == shape[:, None]).any(1).float().mean().item(),
                (read[:, :, 1] == colour[:, None]).any(1).float().mean().item())

    (shape, colour), (shape_chance, colour_chance) = present(labels), present(torch.roll(labels, len(COLOURS) + 1))
    return ("| class-conditional samples | asked shape in the image | asked colour in the image |\n|---|---|---|\n"
            f"| {len(labels)} ({per_class} per class) | {shape:.0%} | {colour:.0%} |\n"
            f"| chance (labels shuffled) | {shape_chance:.0%} | {colour_chance:.0%} |\n")


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="txt2img", help="built-in name, model directory or config.yaml")
    parser.add_argument("--ckpt", default=None, help="weights, when --model is a config")
    parser.add_argument("-n", type=int, default=128, help="validation images")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "shape_diagnostics.md")
    parser.add_argument("--class-model", default=None, help="a class-conditional model: run the class check only")
    parser.add_argument("--class-ckpt", default=None, help="weights of --class-model, when it is a config")
    opt = parser.parse_args()
    torch.manual_seed(0)
    if opt.class_model is not None:
        with user_errors():
            class_model = load_model(opt.class_model, opt.class_ckpt)
        text = class_conditional_reads(class_model, load_attribute_classifier())
        print(text)
        out = opt.out.with_name(opt.out.stem + "_class.md")
        out.write_text(f"# Shapes from class labels\n\n`python bench/shape_diagnostics.py --class-model "
                       f"{opt.class_model}`; DPM-Solver++ 20 steps, guidance 3.\n\n{text}")
        return
    with user_errors():
        model = load_model(opt.model, opt.ckpt)
    judge = load_attribute_classifier()
    data = ShapesValidation(size=32, num_samples=opt.n)
    captions = [data[i]["caption"] for i in range(opt.n)]
    swapped = [swap_shape(c) for c in captions]
    images = dataset_images(data, 0, opt.n)
    shape = lambda x, caps: prompt_match(judge, x, caps)["shape"]  # noqa: E731
    z = encode_images(model, images)
    cond = model.get_learned_conditioning(captions)
    schedule = model.schedule
    lines = ["# Where the shape is lost", "", f"`python bench/shape_diagnostics.py --model {opt.model}`, {opt.n} "
             "validation images; share of objects whose shape the attribute classifier reads as the caption's. "
             f"Real images: {shape(images, captions):.0%}; first-stage reconstructions: "
             f"{shape(decode_latents(model, z), captions):.0%}.", "",
             "| t | σ_t | noised latent, decoded | model's one-step x̂₀, decoded |", "|---|---|---|---|"]
    for t in TIMESTEPS:
        steps = torch.full((opt.n,), t, device=z.device)
        noisy = model.q_sample(z, steps, torch.randn_like(z))
        x0 = model.prediction.x0(model.apply_model(noisy, steps, cond), noisy, *schedule.coefficients(steps))
        a = float(schedule.sqrt_alphas_cumprod[t])
        sigma = float(schedule.sqrt_recipm1_alphas_cumprod[t])
        lines.append(f"| {t} | {sigma:.2f} | {shape(decode_latents(model, noisy / a), captions):.0%} | "
                     f"{shape(decode_latents(model, x0), captions):.0%} |")
    lines += ["", "SDEdit (DDIM 20 steps, guidance 3): regenerate from strength s with the image's own caption, and "
              "with the caption's shape word swapped.", "",
              "| strength | own caption: shape kept | swapped caption: new shape drawn | swapped: old shape kept |",
              "|---|---|---|---|"]
    for strength in STRENGTHS:
        own = image_to_image(model, images, captions, strength=strength, steps=20, scale=3.0, seed=0, progress=False)
        other = image_to_image(model, images, swapped, strength=strength, steps=20, scale=3.0, seed=0, progress=False)
        lines.append(f"| {strength} | {shape(own, captions):.0%} | {shape(other, swapped):.0%} | "
                     f"{shape(other, captions):.0%} |")
    lines += ["", "Single objects in the center, \"a <size> <colour> <shape> in the center\" for every size, colour and "
              "shape, two seeds (DPM-Solver++ 20 steps, guidance 3): shape asked (rows) against shape read (columns).",
              "", shape_confusion(model, judge)]
    save_shape_grid(model, opt.out.with_suffix(".png"), images[:len(SHAPES)])
    lines += ["", f"Samples of \"a large red <shape> in the center\" ({', '.join(SHAPES)}), four seeds, above real "
              f"validation images: `{opt.out.with_suffix('.png').name}`."]
    text = "\n".join(lines) + "\n"
    print(text)
    opt.out.parent.mkdir(parents=True, exist_ok=True)
    opt.out.write_text(text)


if __name__ == "__main__":
    main()
