"""What every conditioning encoder is (`AbstractEncoder`), and what a frozen pretrained one adds."""
from __future__ import annotations

from typing import Any

from torch import nn


class AbstractEncoder(nn.Module):
    """A conditioning encoder: ``encode(c)`` gives what the diffusion model is conditioned on.

    By default that is the forward pass; encoders whose `encode` differs override it.
    """

    def encode(self, x: Any) -> Any:
        return self(x)


class FreezableEncoder(AbstractEncoder):
    """A pretrained encoder that `freeze` turns into a fixed feature extractor: no gradients, and eval mode
    for good (Lightning calls .train() on the whole model every epoch, which would switch dropout back on)."""

    frozen = False

    def freeze(self) -> None:
        self.frozen = True
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "FreezableEncoder":
        return super().train(mode and not self.frozen)
