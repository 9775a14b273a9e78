"""The reference U-Net fixture and random weights, shared by the U-Net, speed-option and conversion tests."""
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file


@pytest.fixture(scope="session")
def unet_small(reference_dir):
    path = reference_dir / "unet_small.safetensors"
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["config"])
    weights = {k[len("weights."):]: v for k, v in tensors.items() if k.startswith("weights.")}
    return config, weights, {k: v for k, v in tensors.items() if not k.startswith("weights.")}


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Redraw every parameter so no zero-initialised layer hides a path from the gradient checks."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() > 1:  # conv/linear/embedding: variance 1/fan_in, as the reference fixtures
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):  # norm scales
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return model
