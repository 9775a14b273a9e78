"""The VQ-autoencoder loss of latent-diffusion (`ldm/modules/losses/vqperceptual.py`, after taming's
VQGAN loss, Esser et al. 2021 eq. 4-6).

L = mean(rec) + codebook_weight * L_codebook + d_weight * disc_factor * L_GAN, with rec the l1 or l2
pixel loss (+ p * LPIPS). Unlike the KL loss, the reconstruction term is a plain mean over all elements.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ldm.modules.losses.adversarial import PerceptualGANLoss, check_optimizer_idx


class DummyLoss(nn.Module):
    """Placeholder `lossconfig` for VQ models that are only used for inference (as taming's)."""

    def forward(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError(
            "DummyLoss cannot train a model: it is meant for inference-only configs. Set `lossconfig` to "
            "ldm.modules.losses.vqperceptual.VQLPIPSWithDiscriminator to train."
        )


def measure_perplexity(predicted_indices: torch.Tensor, n_embed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codebook perplexity exp(H(p)) of the empirical code distribution p, and the number of codes used.

    Perplexity equals n_embed when all codes are used equally often and 1 when one code is used
    (after karpathy/deep-vector-quantization, as the reference). Both are float tensors, for logging.
    """
    flat = predicted_indices.reshape(-1).long()
    if flat.numel() == 0:
        raise ValueError("predicted_indices is empty")
    if int(flat.min()) < 0 or int(flat.max()) >= n_embed:
        raise ValueError(
            f"predicted_indices must lie in [0, {n_embed}) (n_classes is the codebook size); "
            f"got values in [{int(flat.min())}, {int(flat.max())}]"
        )
    # The column sums of the one-hot encodings, without building the (N, n_embed) one-hot matrix.
    counts = torch.bincount(flat, minlength=n_embed)
    avg_probs = counts.float() / flat.numel()
    perplexity = (-(avg_probs * torch.log(avg_probs + 1e-10)).sum()).exp()
    codebook_usage = torch.sum(avg_probs > 0).float()
    return perplexity, codebook_usage


class VQLPIPSWithDiscriminator(PerceptualGANLoss):
    """Loss of `VQModel`: `forward(..., optimizer_idx=0)` is the autoencoder loss, `optimizer_idx=1`
    the discriminator loss; both return `(loss, log)`."""

    def __init__(
        self,
        disc_start: int,
        codebook_weight: float = 1.0,
        pixelloss_weight: float = 1.0,
        disc_num_layers: int = 3,
        disc_in_channels: int = 3,
        disc_factor: float = 1.0,
        disc_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        use_actnorm: bool = False,
        disc_conditional: bool = False,
        disc_ndf: int = 64,
        disc_loss: str = "hinge",
        n_classes: Optional[int] = None,
        perceptual_loss: str = "lpips",
        pixel_loss: str = "l1",
        vgg_weights_path: Optional[str] = None,
    ) -> None:
        if perceptual_loss != "lpips":
            raise ValueError(f"perceptual_loss must be 'lpips' (the only one implemented), got {perceptual_loss!r}")
        super().__init__(
            disc_start=disc_start,
            pixelloss_weight=pixelloss_weight,
            perceptual_weight=perceptual_weight,
            pixel_loss=pixel_loss,
            disc_num_layers=disc_num_layers,
            disc_in_channels=disc_in_channels,
            disc_ndf=disc_ndf,
            disc_factor=disc_factor,
            disc_weight=disc_weight,
            use_actnorm=use_actnorm,
            disc_conditional=disc_conditional,
            disc_loss=disc_loss,
            vgg_weights_path=vgg_weights_path,
        )
        self.codebook_weight = codebook_weight
        self.n_classes = n_classes

    def forward(
        self,
        codebook_loss: Optional[torch.Tensor],
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        optimizer_idx: int,
        global_step: int,
        last_layer: Optional[torch.Tensor] = None,
        cond: Optional[torch.Tensor] = None,
        split: str = "train",
        predicted_indices: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`codebook_loss` is the quantizer's loss (None counts as 0); `predicted_indices` the chosen codes,
        for the perplexity/usage log (needs `n_classes`)."""
        check_optimizer_idx(optimizer_idx)
        if optimizer_idx == 1:
            return self.discriminator_step(inputs, reconstructions, cond, global_step, split)

        if codebook_loss is None:
            codebook_loss = inputs.new_zeros(())
        rec_loss, p_loss = self.reconstruction_loss(inputs, reconstructions)
        nll_loss = torch.mean(rec_loss)

        gan_term, gan_log = self.generator_gan_term(nll_loss, reconstructions, cond, global_step, last_layer)
        loss = nll_loss + gan_term + self.codebook_weight * codebook_loss.mean()

        log = {
            f"{split}/total_loss": loss.clone().detach().mean(),
            f"{split}/quant_loss": codebook_loss.detach().mean(),
            f"{split}/nll_loss": nll_loss.detach(),
            f"{split}/rec_loss": rec_loss.detach().mean(),
            f"{split}/p_loss": p_loss.detach().mean() if p_loss is not None else nll_loss.new_zeros(()),
            **{f"{split}/{name}": value for name, value in gan_log.items()},
        }
        if predicted_indices is not None:
            if self.n_classes is None:
                raise ValueError(
                    "logging codebook perplexity/usage needs the codebook size: set `n_classes` (= n_embed) "
                    "in the loss config"
                )
            with torch.no_grad():
                perplexity, codebook_usage = measure_perplexity(predicted_indices, self.n_classes)
            log[f"{split}/perplexity"] = perplexity
            log[f"{split}/codebook_usage"] = codebook_usage
        return loss, log
