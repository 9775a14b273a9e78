"""PatchGAN discriminator of the first-stage GAN losses (taming-transformers'
`taming/modules/discriminator/model.py`, with `ActNorm` from `taming/modules/util.py`).

Same layer layout and state-dict keys (`main.N.*`), so the `loss.discriminator.*` weights of a
reference checkpoint load unchanged.

Size of the patch map: the first `n_layers` 4x4 convs have stride 2 (padding 1, so each halves H and
W), the last two have stride 1 (each takes 1 off H and W). A 256x256 input with n_layers=3 gives 30x30,
64x64 gives 6x6, but 32x32 only 2x2 (each logit then sees most of the image). For 32x32 data,
n_layers=2 gives a 6x6 map and n_layers=1 a 14x14 one.
"""
from __future__ import annotations

import torch
from torch import nn


def weights_init(m: nn.Module) -> None:
    """pix2pix initialisation, applied with `module.apply(weights_init)`: convs N(0, 0.02), batch norms
    weight N(1, 0.02) and bias 0 (Isola et al. 2017, following Radford et al. 2016)."""
    classname = m.__class__.__name__
    if classname.find("Conv") != -1:
        nn.init.normal_(m.weight.data, 0.0, 0.02)
    elif classname.find("BatchNorm") != -1:
        nn.init.normal_(m.weight.data, 1.0, 0.02)
        nn.init.constant_(m.bias.data, 0)


class ActNorm(nn.Module):
    """Activation normalisation (Kingma & Dhariwal 2018, Glow sec. 3.1): y = scale * (x + loc) per channel.

    `loc` and `scale` are set from the first batch seen in training mode so that y has zero mean and
    unit (unbiased) standard deviation per channel; the `initialized` buffer records that this happened,
    so a loaded checkpoint is not re-initialised. With `logdet`, also returns the log-determinant of
    the map per sample, H * W * sum_c log|scale_c|.
    """

    def __init__(self, num_features: int, logdet: bool = False) -> None:
        super().__init__()
        self.logdet = logdet
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def initialize(self, input: torch.Tensor) -> None:
        flatten = input.transpose(0, 1).reshape(input.shape[1], -1)
        mean = flatten.mean(1).view(1, -1, 1, 1)
        std = flatten.std(1).view(1, -1, 1, 1)
        self.loc.data.copy_(-mean)
        self.scale.data.copy_(1 / (std + 1e-6))

    def forward(self, input: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if input.dim() != 4 or input.shape[1] != self.loc.shape[1]:
            raise ValueError(
                f"ActNorm({self.loc.shape[1]}) expects (B, {self.loc.shape[1]}, H, W) input, got {tuple(input.shape)}"
            )
        if self.training and self.initialized.item() == 0:
            self.initialize(input)
            self.initialized.fill_(1)
        h = self.scale * (input + self.loc)
        if not self.logdet:
            return h
        height, width = input.shape[2:]
        logdet = height * width * torch.sum(torch.log(torch.abs(self.scale)))
        return h, logdet * torch.ones(input.shape[0]).to(input)


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator as in pix2pix (Isola et al. 2017): one logit per overlapping patch.

    Output shape (B, 1, H', W'); see the module docstring for H', W'.
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, use_actnorm: bool = False) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"NLayerDiscriminator needs n_layers >= 1 (disc_num_layers), got {n_layers}")
        norm_layer = ActNorm if use_actnorm else nn.BatchNorm2d
        use_bias = norm_layer is not nn.BatchNorm2d  # BatchNorm's affine shift makes a conv bias redundant

        kw = 4
        padw = 1
        sequence: list[nn.Module] = [
            nn.Conv2d(input_nc, ndf, kernel_size=kw, stride=2, padding=padw),
            nn.LeakyReLU(0.2, True),
        ]
        nf_mult = 1
        for n in range(1, n_layers):  # gradually increase the number of filters
            nf_mult_prev = nf_mult
            nf_mult = min(2**n, 8)
            sequence += [
                nn.Conv2d(ndf * nf_mult_prev, ndf * nf_mult, kernel_size=kw, stride=2, padding=padw, bias=use_bias),
                norm_layer(ndf * nf_mult),
                nn.LeakyReLU(0.2, True),
            ]

        nf_mult_prev = nf_mult
        nf_mult = min(2**n_layers, 8)
        sequence += [
            nn.Conv2d(ndf * nf_mult_prev, ndf * nf_mult, kernel_size=kw, stride=1, padding=padw, bias=use_bias),
            norm_layer(ndf * nf_mult),
            nn.LeakyReLU(0.2, True),
        ]
        sequence += [nn.Conv2d(ndf * nf_mult, 1, kernel_size=kw, stride=1, padding=padw)]  # 1-channel logit map
        self.main = nn.Sequential(*sequence)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.main(input)
