"""The KL-autoencoder loss of latent-diffusion (`ldm/modules/losses/contperceptual.py`).

L = sum(w * NLL) / B + kl_weight * sum(KL) / B + d_weight * disc_factor * L_GAN, where
NLL = rec / exp(logvar) + logvar is the negative log-likelihood (up to constants) of the input under a
Laplace-like decoder with one learned scalar log-scale `logvar`, rec = |x - x_rec| (+ p * LPIPS), and
the KL term is the posterior's KL to N(0, I) (Rombach et al. 2022, sec. 3 and appendix G; the GAN term
and its adaptive weight d_weight as in Esser et al. 2021).

Sums run over all C*H*W elements and are divided by the batch size, exactly as the reference, so its
configs' weights (e.g. `kl_weight: 1e-6`, `disc_weight: 0.5`) mean the same here. Because those sums
grow with the image and latent size, the log also carries per-element means (`*_per_element`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from ldm.modules.losses.adversarial import PerceptualGANLoss, check_optimizer_idx

if TYPE_CHECKING:
    from ldm.modules.distributions.distributions import DiagonalGaussianDistribution


class LPIPSWithDiscriminator(PerceptualGANLoss):
    """Loss of `AutoencoderKL`: `forward(..., optimizer_idx=0)` is the autoencoder loss,
    `optimizer_idx=1` the discriminator loss; both return `(loss, log)`."""

    def __init__(
        self,
        disc_start: int,
        logvar_init: float = 0.0,
        kl_weight: float = 1.0,
        pixelloss_weight: float = 1.0,
        disc_num_layers: int = 3,
        disc_in_channels: int = 3,
        disc_factor: float = 1.0,
        disc_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        use_actnorm: bool = False,
        disc_conditional: bool = False,
        disc_loss: str = "hinge",
        vgg_weights_path: Optional[str] = None,
    ) -> None:
        super().__init__(
            disc_start=disc_start,
            pixelloss_weight=pixelloss_weight,
            perceptual_weight=perceptual_weight,
            pixel_loss="l1",
            disc_num_layers=disc_num_layers,
            disc_in_channels=disc_in_channels,
            disc_ndf=64,
            disc_factor=disc_factor,
            disc_weight=disc_weight,
            use_actnorm=use_actnorm,
            disc_conditional=disc_conditional,
            disc_loss=disc_loss,
            vgg_weights_path=vgg_weights_path,
        )
        self.kl_weight = kl_weight
        # The decoder's learned log-scale: one scalar shared by all pixels.
        self.logvar = nn.Parameter(torch.ones(size=()) * logvar_init)

    def forward(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        posteriors: DiagonalGaussianDistribution,
        optimizer_idx: int,
        global_step: int,
        last_layer: Optional[torch.Tensor] = None,
        cond: Optional[torch.Tensor] = None,
        split: str = "train",
        weights: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`posteriors` is a `DiagonalGaussianDistribution` (its `kl()` summed over C, H, W per sample);
        `weights` optionally weights the NLL elementwise; `last_layer` is the decoder's final weight,
        needed in training once the discriminator is active."""
        check_optimizer_idx(optimizer_idx)
        if optimizer_idx == 1:
            return self.discriminator_step(inputs, reconstructions, cond, global_step, split)

        rec_loss, _ = self.reconstruction_loss(inputs, reconstructions)
        nll_loss = rec_loss / torch.exp(self.logvar) + self.logvar
        weighted_nll_loss = nll_loss if weights is None else weights * nll_loss
        batch_size = nll_loss.shape[0]
        weighted_nll_loss = torch.sum(weighted_nll_loss) / batch_size
        nll_per_element = nll_loss.detach().mean()
        nll_loss = torch.sum(nll_loss) / batch_size
        kl_loss = posteriors.kl()
        kl_loss = torch.sum(kl_loss) / kl_loss.shape[0]
        kl_per_element = kl_loss.detach() / posteriors.mean[0].numel()

        # The adaptive weight balances against the unweighted NLL, as the reference does.
        gan_term, gan_log = self.generator_gan_term(nll_loss, reconstructions, cond, global_step, last_layer)
        loss = weighted_nll_loss + self.kl_weight * kl_loss + gan_term

        log = {
            f"{split}/total_loss": loss.clone().detach().mean(),
            f"{split}/logvar": self.logvar.detach(),
            f"{split}/kl_loss": kl_loss.detach().mean(),
            f"{split}/kl_loss_per_element": kl_per_element,
            f"{split}/nll_loss": nll_loss.detach().mean(),
            f"{split}/nll_loss_per_element": nll_per_element,
            f"{split}/rec_loss": rec_loss.detach().mean(),
            **{f"{split}/{name}": value for name, value in gan_log.items()},
        }
        return loss, log
