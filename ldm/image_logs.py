"""The images the ImageLogger writes for a diffusion model: inputs, reconstructions, the condition drawn as an image, a
diffusion row, samples, a denoise row and guided samples.

They are drawn here, not by a method of the model, because samples need the sampling API (`ldm.inference`) and a
condition is drawn with its dataset's own renderer (a layout's boxes, a label map's palette): both sit above the
model, which must not import them (tests/test_import_layers.py). The model gives what the images are made of
(`log_inputs`, `decode_for_display`, `unconditional_guidance_inputs`).

So the reference's ``model.log_images(batch, ...)`` of a diffusion model is ``log_images(model, batch, ...)`` here,
with the same keyword arguments and the same dict. A module of any other kind keeps its own ``log_images``: the first
stages (`ldm.models.autoencoder`, whose images need nothing above them) and modules written for the reference's
ImageLogger; `log_images` calls it.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from ldm.data.layout import drawable_layout, tokens_to_layout
from ldm.data.semantic import label_palette
from ldm.inference import sample_latents
from ldm.models.diffusion.ddpm import DDPM
from ldm.visualization import make_grid, render_boxes, render_captions, render_label_maps

LAYOUT_KEY = "objects_bbox"  # the reference's batch key of layout tokens (drawn as boxes)


class SamplingInterrupted(Exception):
    """Raised inside the sampling of `diffusion_images` when the run received SIGTERM; `diffusion_images` catches it."""


def shows_images(module: pl.LightningModule) -> bool:
    """Whether `log_images` has images of `module`: a diffusion model, or a module with a ``log_images`` of its own."""
    return isinstance(module, DDPM) or hasattr(module, "log_images")


def log_images(module: pl.LightningModule, batch: Mapping, split: str = "train",
               **kwargs: Any) -> dict[str, torch.Tensor]:
    """Images of `batch` to log (NCHW): `diffusion_images` for a diffusion model, else the module's own
    ``log_images(batch, split=split, **kwargs)`` (module docstring)."""
    if isinstance(module, DDPM):
        return diffusion_images(module, batch, **kwargs)
    return module.log_images(batch, split=split, **kwargs)


@torch.no_grad()
def diffusion_images(model: DDPM, batch: Mapping, N: int = 8, n_row: int = 2, sample: bool = True,
                     return_keys: Optional[Sequence[str]] = None, guidance_scale: float = 3.0,
                     sampler: str = "dpmpp_2m", steps: int = 20, **kwargs: Any) -> dict[str, torch.Tensor]:
    """Images of the first `N` examples of `batch` (NCHW in [-1, 1]): inputs, reconstructions, the conditioning, a
    diffusion row, samples (EMA weights), a denoise row (x̂_0 along the sampling run) and, for a model trained with
    condition dropout, guided samples; only `return_keys` when given. Other keyword arguments (the reference's
    ``log_images_kwargs``) are ignored.

    Samples come from `sampler` in `steps` steps (`ldm.inference.sample_latents`; `ddpm` is the 1000-step
    ancestral sampler): DPM-Solver++(2M) in 20 steps by default, 50× fewer U-Net calls than ancestral
    sampling. When the run the model trains in receives SIGTERM, sampling stops at the next step and the
    sample grids are left out, so a stopping run never waits for pictures.
    """
    log: dict[str, torch.Tensor] = {}
    x, cond, condition, shown = model.log_inputs(batch, N)
    log.update(shown)
    if condition is not None:
        log["conditioning"] = render_condition(condition, shown["inputs"].shape[-1], batch, model.cond_stage_key,
                                               model.device)
    log["diffusion_row"] = diffusion_row(model, x[:n_row])
    if sample:
        try:
            with model.ema_scope():
                log.update(_sample_grids(model, cond, batch, x.shape[0], n_row, guidance_scale, sampler, steps))
        except SamplingInterrupted:
            pass  # Lightning stops the run after this batch
    if return_keys:
        log = {k: v for k, v in log.items() if k in return_keys}
    return log


def diffusion_row(model: DDPM, x_start: torch.Tensor, n_steps: int = 5) -> torch.Tensor:
    """One grid: each row an input noised at increasing levels (the forward process), shown as images."""
    rows = []
    for u in torch.linspace(0, 1, n_steps, dtype=torch.float64):
        level = model.process.level_at_fraction(u.expand(x_start.shape[0])).to(model.device)
        rows.append(model.decode_for_display(model.process.add_noise(x_start, torch.randn_like(x_start), level)))
    return _rows_to_grid(rows)


def _is_one_hot(x: torch.Tensor) -> bool:
    """Whether channels hold a one-hot label map: 0s and 1s, one 1 per pixel, more channels than an image has."""
    return x.shape[1] > 3 and bool(((x == 0) | (x == 1)).all()) and bool((x.sum(1) == 1).all())


def render_condition(xc: Any, size: int, batch: Mapping, cond_key: Optional[str],
                     device: torch.device) -> torch.Tensor:
    """A raw condition (`cond_key`'s, of `batch`) as images: captions or class names written out, images (a
    low-resolution input enlarged to the image `size`), label maps in colour, layouts as boxes; a text-inpainting
    model's ``{"c_concat": masked image, "c_crossattn": captions}`` as the masked image with its captions under it."""
    if isinstance(xc, dict):
        masked = render_condition(xc["c_concat"], size, batch, cond_key, device)
        captions = render_condition(xc["c_crossattn"], size, batch, cond_key, device)
        return torch.cat([F.interpolate(masked, size=captions.shape[-2:], mode="nearest"), captions], dim=-2)
    if isinstance(xc, torch.Tensor) and xc.dim() == 4:
        if _is_one_hot(xc):  # a label map (semantic synthesis)
            return render_label_maps(xc, label_palette(xc.shape[1]))
        # An image, or an image with more channels after it (the inpainting model's masked image and mask).
        image = xc[:, :3] if xc.shape[1] >= 3 else xc[:, :1].expand(-1, 3, -1, -1)
        return F.interpolate(image, size=(size, size), mode="nearest") if image.shape[-1] != size else image
    if cond_key == LAYOUT_KEY:
        return render_boxes([drawable_layout(tokens_to_layout(tokens)) for tokens in xc.tolist()],
                            size=max(size, 64)).to(device)
    if isinstance(xc, torch.Tensor):
        # Datasets name their classes under the reference's `human_label` key.
        names = batch.get("human_label")
        xc = [names[i] if names is not None and names[i] else f"class {label}" for i, label in enumerate(xc.tolist())]
    return render_captions(list(xc), size=max(size, 64)).to(device)


def _sample_grids(model: DDPM, cond: Any, batch: Mapping, n: int, n_row: int, guidance_scale: float, sampler: str,
                  steps: int) -> dict[str, torch.Tensor]:
    """`samples`, `denoise_row` and, for a model trained with condition dropout, guided samples."""

    def stop_if_terminated(i: int, x0: torch.Tensor) -> None:
        # `_trainer`, not `trainer`: Lightning's property raises for a model outside a run, which nothing stops.
        if model._trainer is not None and model._trainer.received_sigterm:
            raise SamplingInterrupted

    denoised: list[torch.Tensor] = []

    def step(i: int, x0: torch.Tensor) -> None:
        stop_if_terminated(i, x0)
        denoised.append(x0[:n_row])

    samples = sample_latents(model, n, cond, sampler=sampler, steps=steps, callback=step, progress=False)
    out = {"samples": model.decode_for_display(samples),
           "denoise_row": _rows_to_grid([model.decode_for_display(z) for z in _evenly_spaced(denoised, 6)])}
    uncond = model.unconditional_guidance_inputs(cond, batch, n)
    if uncond is not None:
        guided = sample_latents(model, n, cond, uncond=uncond, scale=guidance_scale, sampler=sampler, steps=steps,
                                callback=stop_if_terminated, progress=False)
        out[f"samples_cfg_scale_{guidance_scale:.2f}"] = model.decode_for_display(guided)
    return out


def _evenly_spaced(items: Sequence[Any], k: int) -> list[Any]:
    """At most `k` of `items`, evenly spaced, the first and the last included."""
    if len(items) <= k:
        return list(items)
    return [items[i] for i in torch.linspace(0, len(items) - 1, k).round().long().tolist()]


def _rows_to_grid(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """Rows of images (each (n, C, H, W)) as one image, the i-th row holding example i across the row list."""
    stacked = torch.stack(list(rows), dim=1)  # (n, steps, C, H, W)
    grid = make_grid(stacked.flatten(0, 1), nrow=stacked.shape[1])
    return grid[None]
