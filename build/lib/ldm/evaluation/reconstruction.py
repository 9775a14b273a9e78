"""Reconstruction quality of a first-stage model: PSNR, SSIM and (when VGG16 weights exist) LPIPS."""
from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from typing import Optional

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from tqdm import tqdm


def dataset_images(dataset: Sequence[Mapping], start: int, stop: int) -> torch.Tensor:
    """Items ``start:stop`` of a dataset of reference-style dicts as one NCHW float batch in [-1, 1]."""
    return torch.stack([torch.as_tensor(dataset[i]["image"]) for i in range(start, stop)]).permute(0, 3, 1, 2).float()


@torch.no_grad()
def reconstruct(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Encode and decode NCHW images in [-1, 1] deterministically (posterior mode / nearest codes)."""
    # AutoencoderKL.forward samples the posterior by default; reconstructions for metrics use its mode.
    deterministic = "sample_posterior" in inspect.signature(model.forward).parameters
    out = model(images, sample_posterior=False) if deterministic else model(images)
    recon = out[0] if isinstance(out, tuple) else out
    return recon.clamp(-1, 1)


@torch.no_grad()
def reconstruction_metrics(model: torch.nn.Module, batches: Iterable[torch.Tensor],
                           lpips: Optional[torch.nn.Module] = None, progress: bool = True) -> dict[str, float]:
    """Mean PSNR (dB), SSIM and LPIPS over NCHW batches in [-1, 1]; PSNR/SSIM on the [0, 1] range."""
    totals: dict[str, float] = {"psnr": 0.0, "ssim": 0.0}
    if lpips is not None:
        totals["lpips"] = 0.0
    count = 0
    device = next(model.parameters()).device
    for images in tqdm(batches, desc="reconstructing", disable=not progress):
        images = images.to(device)
        recon = reconstruct(model, images)
        x, y = (images + 1) / 2, (recon + 1) / 2
        n = images.shape[0]
        totals["psnr"] += float(peak_signal_noise_ratio(y, x, data_range=1.0, reduction="none",
                                                        dim=(1, 2, 3)).sum())
        totals["ssim"] += float(structural_similarity_index_measure(y, x, data_range=1.0, reduction="sum"))
        if lpips is not None:
            totals["lpips"] += float(lpips(images, recon).sum())
        count += n
    return {k: v / count for k, v in totals.items()} | {"images": count}
