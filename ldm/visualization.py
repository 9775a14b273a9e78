"""Image grids and PNG writing without torchvision (which has no CPU build for our torch here)."""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 0.0) -> torch.Tensor:
    """Tile a batch NCHW into one CHW image, `nrow` images per row (torchvision's layout)."""
    if images.ndim != 4:
        raise ValueError(f"make_grid expects a batch NCHW, got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    if c == 1:
        images = images.expand(n, 3, h, w)
        c = 3
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    grid = images.new_full((c, nrows * (h + padding) + padding, ncol * (w + padding) + padding), pad_value)
    for i in range(n):
        r, k = divmod(i, ncol)
        top, left = r * (h + padding) + padding, k * (w + padding) + padding
        grid[:, top:top + h, left:left + w] = images[i]
    return grid


def to_uint8(image: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """CHW float in `value_range` to HWC uint8 (clamped)."""
    lo, hi = value_range
    x = ((image.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    return (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


# The sampler names AUTOMATIC1111's web UI writes (and ComfyUI, civitai and other readers of its `parameters` text).
A1111_SAMPLER_NAMES = {"ddim": "DDIM", "plms": "PLMS", "euler": "Euler", "euler_a": "Euler a", "heun": "Heun",
                       "dpmpp_2m": "DPM++ 2M", "ddpm": "DDPM"}


def a1111_parameters(text: Mapping[str, str]) -> str:
    """The `parameters` PNG text of AUTOMATIC1111's web UI, from the toolkit's own keys: the prompt, then
    ``Negative prompt: ...``, then one line of ``Key: value`` settings."""
    names = {"steps": "Steps", "scale": "CFG scale", "seed": "Seed", "size": "Size", "model_hash": "Model hash",
             "model": "Model", "vae_hash": "VAE hash", "vae": "VAE", "strength": "Denoising strength", "eta": "Eta",
             "software": "Version"}
    settings = [f"{label}: {text[key]}" for key, label in names.items() if text.get(key) not in (None, "")]
    if text.get("sampler"):
        settings.insert(1, f"Sampler: {A1111_SAMPLER_NAMES.get(text['sampler'], text['sampler'])}")
    lines = [text.get("prompt", "")]
    if text.get("negative_prompt"):
        lines.append(f"Negative prompt: {text['negative_prompt']}")
    return "\n".join(lines + [", ".join(settings)])


def save_png(image: np.ndarray, path: str | Path, text: Optional[Mapping[str, str]] = None) -> Path:
    """Write an HWC uint8 array as PNG (creating the folder), with `text` as its tEXt metadata, its ``size``
    (WxH) added, and with a ``prompt`` also as the `parameters` text other tools read (`a1111_parameters`);
    returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = None
    if text:
        text = {**text, "size": f"{image.shape[1]}x{image.shape[0]}"}
        if "prompt" in text:
            text["parameters"] = a1111_parameters(text)
        info = PngInfo()
        for key, value in text.items():
            info.add_text(key, str(value))
    Image.fromarray(image).save(path, pnginfo=info)
    return path


def save_image_grid(
    images: torch.Tensor, path: str | Path, nrow: int = 8, value_range: tuple[float, float] = (-1.0, 1.0)
) -> Path:
    """Write a batch NCHW as one PNG grid; returns the path."""
    return save_png(to_uint8(make_grid(images, nrow=nrow), value_range), path)


def render_captions(captions: list[str], size: int = 64, chars_per_line: int | None = None) -> torch.Tensor:
    """Each caption written black on white in a `size`×`size` square, as NCHW in [-1, 1] (the conditioning
    shown beside samples in image logs). Long captions wrap; what does not fit is cut with an ellipsis."""
    font = ImageFont.load_default()
    left, top, right, bottom = font.getbbox("Mg")
    char_w, line_h = max(1, (right - left) // 2), bottom - top + 2
    chars_per_line = chars_per_line or max(1, (size - 4) // char_w)
    max_lines = max(1, (size - 4) // line_h)
    images = []
    for caption in captions:
        words, lines, line = str(caption).split(), [], ""
        for word in words:
            candidate = f"{line} {word}".strip()
            if len(candidate) > chars_per_line and line:
                lines.append(line)
                candidate = word
            line = candidate
        lines.append(line)
        if len(lines) > max_lines:
            lines = lines[:max_lines]
            lines[-1] = lines[-1][: max(0, chars_per_line - 3)] + "..."
        canvas = Image.new("RGB", (size, size), "white")
        draw = ImageDraw.Draw(canvas)
        for i, text in enumerate(lines):
            draw.text((2, 2 + i * line_h), text, fill="black", font=font)
        images.append(torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1))
    return torch.stack(images).float() / 127.5 - 1.0


def render_label_maps(segmentation: torch.Tensor, palette: np.ndarray) -> torch.Tensor:
    """One-hot (or score) maps (N, K, H, W) drawn with `palette` (K, 3) RGB in [0, 1], as NCHW in [-1, 1]."""
    colours = torch.as_tensor(palette, dtype=torch.float32, device=segmentation.device)
    return colours[segmentation.argmax(dim=1)].permute(0, 3, 1, 2) * 2 - 1


def render_boxes(layouts: list[list[tuple[str, tuple[float, float, float, float], tuple[float, float, float]]]],
                 size: int = 64) -> torch.Tensor:
    """Each layout, a list of (name, box [x0, y0, x1, y1] in [0, 1], RGB in [0, 1]), drawn as outlined boxes
    with their names on grey, `size`×`size`, as NCHW in [-1, 1]."""
    font = ImageFont.load_default()
    images = []
    for layout in layouts:
        canvas = Image.new("RGB", (size, size), (128, 128, 128))
        draw = ImageDraw.Draw(canvas)
        for name, (x0, y0, x1, y1), rgb in layout:
            colour = tuple(int(round(255 * c)) for c in rgb)
            draw.rectangle([x0 * size, y0 * size, x1 * size - 1, y1 * size - 1], outline=colour, width=2)
            draw.text((x0 * size + 3, y0 * size + 2), name, fill=colour, font=font)
        images.append(torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1))
    return torch.stack(images).float() / 127.5 - 1.0


CURVE_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))


def plot_curves(series: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str = "",
                size: tuple[int, int] = (720, 420), log_y: bool = True) -> Path:
    """A line chart of (x, y) series as PNG, drawn with PIL (matplotlib is not a dependency): one colour per
    series with a legend, the x range and the y range (log scale when every y is positive) written on the axes."""
    width, height = size
    left, right, top, bottom = 70, 20, 30, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    series = {name: (np.asarray(x, float), np.asarray(y, float)) for name, (x, y) in series.items() if len(x)}
    if not series:
        draw.text((left, height // 2), "no data", fill="black", font=font)
        return save_png(np.asarray(image), path)
    xs = np.concatenate([x for x, _ in series.values()])
    ys = np.concatenate([y for _, y in series.values()])
    log_y = log_y and bool((ys > 0).all())
    transform = np.log10 if log_y else (lambda v: v)
    x_lo, x_hi = float(xs.min()), float(xs.max()) or 1.0
    y_lo, y_hi = float(transform(ys).min()), float(transform(ys).max())
    x_hi, y_hi = (x_hi if x_hi > x_lo else x_lo + 1), (y_hi if y_hi > y_lo else y_lo + 1)

    def to_pixel(x: np.ndarray, y: np.ndarray) -> list[tuple[float, float]]:
        px = left + (x - x_lo) / (x_hi - x_lo) * (width - left - right)
        py = height - bottom - (transform(y) - y_lo) / (y_hi - y_lo) * (height - top - bottom)
        return list(zip(px.tolist(), py.tolist()))

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for k, (name, (x, y)) in enumerate(series.items()):
        colour = CURVE_COLOURS[k % len(CURVE_COLOURS)]
        points = to_pixel(x, y)
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        else:
            draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2], fill=colour)
        draw.text((left + 8, top + 6 + 14 * k), name, fill=colour, font=font)
    label = (lambda v: f"{10 ** v:.3g}") if log_y else (lambda v: f"{v:.3g}")
    draw.text((4, top), label(y_hi), fill="black", font=font)
    draw.text((4, height - bottom - 12), label(y_lo), fill="black", font=font)
    draw.text((left, height - bottom + 6), f"{x_lo:g}", fill="black", font=font)
    draw.text((width - right - 60, height - bottom + 6), f"{x_hi:g}", fill="black", font=font)
    draw.text((left, 8), title + (" (log scale)" if log_y else ""), fill="black", font=font)
    return save_png(np.asarray(image), path)
