"""Speed options for a built U-Net (DEFAULT_SPEED_OPTIONS are on unless a config says otherwise); none
changes the state dict or what the network computes.

- ``channels_last``: parameters (and so activations, which follow the first convolution's weight) in NHWC
  memory order, which oneDNN and cuDNN convolutions prefer.
- ``compile``: ``torch.compile`` of the module in place, for static shapes. The first call of each input shape and
  grad mode compiles (about two minutes for the txt2img U-Net's forward and backward on 2 CPU cores; inductor's cache
  shortens it in later processes), and a new batch size compiles once more rather than switching to a dynamic-shape
  graph (a training set's short last batch: `data.params.drop_last` avoids it). In a real training loop at batch 128
  it measured 1.05x faster than eager (bench/results/training_step_compile): worth it for long runs only.

Mixed precision is not here: it is autocast around the call (Lightning's ``precision`` for training,
``--precision`` for the scripts), so the weights stay float32.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

SPEED_OPTIONS = ("channels_last", "compile")
# Measured faster for forward, training and sampling at both benchmark sizes on the CPU
# (bench/results/performance.md, stage "channels-last").
DEFAULT_SPEED_OPTIONS = ("channels_last",)


def apply_speed_options(module: nn.Module, options: Sequence[str]) -> nn.Module:
    """`module` with each of `options` (names from SPEED_OPTIONS) applied in place; returned for chaining."""
    unknown = [o for o in options if o not in SPEED_OPTIONS]
    if unknown:
        raise ValueError(f"unknown speed option(s) {', '.join(unknown)}; choose from {', '.join(SPEED_OPTIONS)}")
    if "channels_last" in options:
        module.to(memory_format=torch.channels_last)
    if "compile" in options:
        module.compile(dynamic=False)
    return module
