"""The reconstruction + PatchGAN objective shared by the KL and VQ first-stage losses.

GAN definitions as in taming-transformers (`taming/modules/losses/vqperceptual.py`); the adaptive
generator weight is Esser et al. 2021 ("Taming Transformers for High-Resolution Image Synthesis"), eq. 7.
`PerceptualGANLoss` holds what `LPIPSWithDiscriminator` and `VQLPIPSWithDiscriminator` have in common:
the pixel + LPIPS reconstruction term, the discriminator, its warm-up gate, the weighted generator term
and the discriminator update.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.discriminator.model import NLayerDiscriminator, weights_init
from ldm.modules.losses.lpips import LPIPS


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """`weight` from `global_step == threshold` on, `value` before (the discriminator warm-up gate)."""
    if global_step < threshold:
        weight = value
    return weight


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss: 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_rec)))."""
    loss_real = torch.mean(F.relu(1.0 - logits_real))
    loss_fake = torch.mean(F.relu(1.0 + logits_fake))
    return 0.5 * (loss_real + loss_fake)


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Standard GAN discriminator loss (Goodfellow et al. 2014) on logits:
    0.5 * (mean -log sigmoid(D(x)) + mean -log(1 - sigmoid(D(x_rec)))), written with softplus."""
    return 0.5 * (torch.mean(F.softplus(-logits_real)) + torch.mean(F.softplus(logits_fake)))


DISCRIMINATOR_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "hinge": hinge_d_loss,
    "vanilla": vanilla_d_loss,
}


def l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.abs(x - y)


def l2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.pow(x - y, 2)


# The pixel losses of the first-stage objectives, elementwise (the caller reduces them).
PIXEL_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"l1": l1, "l2": l2}


def check_optimizer_idx(optimizer_idx: int) -> None:
    if optimizer_idx not in (0, 1):
        raise ValueError(f"optimizer_idx must be 0 (autoencoder) or 1 (discriminator), got {optimizer_idx}")


def adaptive_generator_weight(
    rec_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer: torch.Tensor,
    delta: float = 1e-4,
    max_weight: float = 1e4,
) -> torch.Tensor:
    """lambda = ||grad_GL[L_rec]|| / (||grad_GL[L_GAN]|| + delta), Esser et al. 2021 eq. 7.

    GL is the decoder's last layer; balancing the two gradients there keeps the GAN term from
    overpowering (or vanishing against) the reconstruction term. Clamped to [0, max_weight] and
    detached: it is a scale, not something to optimise.
    """
    rec_grads = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = torch.norm(rec_grads) / (torch.norm(g_grads) + delta)
    return torch.clamp(weight, 0.0, max_weight).detach()


class PerceptualGANLoss(nn.Module):
    """Base of the first-stage losses: pixel + LPIPS reconstruction term and the PatchGAN game.

    The LPIPS network is built only when `perceptual_weight > 0` (it needs the VGG16 weights, see
    `ldm.modules.losses.lpips`).
    """

    def __init__(
        self,
        disc_start: int,
        pixelloss_weight: float,
        perceptual_weight: float,
        pixel_loss: str,
        disc_num_layers: int,
        disc_in_channels: int,
        disc_ndf: int,
        disc_factor: float,
        disc_weight: float,
        use_actnorm: bool,
        disc_conditional: bool,
        disc_loss: str,
        vgg_weights_path: Optional[str],
    ) -> None:
        super().__init__()
        if disc_loss not in DISCRIMINATOR_LOSSES:
            raise ValueError(f"disc_loss must be one of {sorted(DISCRIMINATOR_LOSSES)}, got {disc_loss!r}")
        if pixel_loss not in PIXEL_LOSSES:
            raise ValueError(f"pixel_loss must be one of {sorted(PIXEL_LOSSES)}, got {pixel_loss!r}")
        self.pixel_weight = pixelloss_weight
        self.pixel_loss = PIXEL_LOSSES[pixel_loss]
        self.perceptual_weight = perceptual_weight
        self.perceptual_loss = LPIPS(vgg_weights_path=vgg_weights_path) if perceptual_weight > 0 else None

        self.discriminator = NLayerDiscriminator(
            input_nc=disc_in_channels, ndf=disc_ndf, n_layers=disc_num_layers, use_actnorm=use_actnorm
        ).apply(weights_init)
        self.discriminator_iter_start = disc_start
        self.disc_loss = DISCRIMINATOR_LOSSES[disc_loss]
        self.disc_factor = disc_factor
        self.discriminator_weight = disc_weight
        self.disc_conditional = disc_conditional

    def discriminator_active(self, global_step: int) -> bool:
        """Whether the GAN terms count at `global_step` (batches seen); before that the autoencoder can
        skip the discriminator entirely."""
        return global_step >= self.discriminator_iter_start and self.disc_factor > 0

    def reconstruction_loss(
        self, inputs: torch.Tensor, reconstructions: torch.Tensor
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Elementwise pixel_weight * pixel(x, x_rec) + perceptual_weight * LPIPS(x, x_rec), and the LPIPS
        part alone (shape (B, 1, 1, 1); None without the perceptual term).

        The reference accepts `pixelloss_weight` but never applies it; here it scales the pixel term,
        which is the same at its default (and every reference config's value) 1.0.
        """
        if inputs.shape != reconstructions.shape:
            raise ValueError(
                f"inputs {tuple(inputs.shape)} and reconstructions {tuple(reconstructions.shape)} differ in shape"
            )
        inputs, reconstructions = inputs.contiguous(), reconstructions.contiguous()
        rec_loss = self.pixel_weight * self.pixel_loss(inputs, reconstructions)
        if self.perceptual_loss is None:
            return rec_loss, None
        p_loss = self.perceptual_loss(inputs, reconstructions)
        return rec_loss + self.perceptual_weight * p_loss, p_loss

    def _logits(self, images: torch.Tensor, cond: Optional[torch.Tensor]) -> torch.Tensor:
        if (cond is not None) != self.disc_conditional:
            raise ValueError(
                f"the discriminator is {'' if self.disc_conditional else 'not '}conditional "
                f"(disc_conditional={self.disc_conditional}) but cond was {'not ' if cond is None else ''}given"
            )
        if cond is not None:
            images = torch.cat((images, cond), dim=1)
        return self.discriminator(images.contiguous())

    def generator_gan_term(
        self,
        rec_loss: torch.Tensor,
        reconstructions: torch.Tensor,
        cond: Optional[torch.Tensor],
        global_step: int,
        last_layer: Optional[torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """d_weight * disc_factor * g_loss with g_loss = -mean D(x_rec), and its parts for logging.

        `rec_loss` is the reconstruction loss whose gradient at `last_layer` sets the adaptive weight.
        While the discriminator is inactive the reference still evaluates it and multiplies the result
        by 0; here it is skipped (same loss and gradients) and g_loss/d_weight are logged as 0.
        """
        zero = rec_loss.new_zeros(())
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        parts = {"disc_factor": torch.tensor(float(disc_factor), device=rec_loss.device)}
        if disc_factor == 0:
            return zero, {**parts, "d_weight": zero, "g_loss": zero}
        g_loss = -torch.mean(self._logits(reconstructions, cond))
        if self.training and torch.is_grad_enabled():
            if last_layer is None:
                raise ValueError(
                    "last_layer is needed for the adaptive GAN weight: pass the decoder's final weight "
                    "(e.g. `decoder.conv_out.weight`)"
                )
            d_weight = adaptive_generator_weight(rec_loss, g_loss, last_layer) * self.discriminator_weight
        else:
            # Validation (eval mode / no autograd) has no graph to take the gradients from; the
            # reference falls back to 0 there, which leaves the GAN term out of val/total_loss.
            d_weight = zero
        parts.update(d_weight=d_weight, g_loss=g_loss.detach())
        return d_weight * disc_factor * g_loss, parts

    def discriminator_step(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        cond: Optional[torch.Tensor],
        global_step: int,
        split: str,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """disc_factor * D-loss(D(x), D(x_rec)) on detached images (optimizer_idx 1), and its log."""
        logits_real = self._logits(inputs.detach(), cond)
        logits_fake = self._logits(reconstructions.detach(), cond)
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        d_loss = disc_factor * self.disc_loss(logits_real, logits_fake)
        log = {
            f"{split}/disc_loss": d_loss.clone().detach().mean(),
            f"{split}/logits_real": logits_real.detach().mean(),
            f"{split}/logits_fake": logits_fake.detach().mean(),
        }
        return d_loss, log

