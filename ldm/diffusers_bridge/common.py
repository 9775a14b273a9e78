"""What every part of the diffusers bridge needs: importing diffusers with a clear error, where a model
lives, and checking that a state dict is exactly the one a model expects."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

INSTALL_HINT = "pip install 'ldm[diffusers]' (or pip install diffusers)"


def import_diffusers() -> Any:
    """The diffusers module; ImportError saying how to install it when it is missing."""
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(f"converting to or from diffusers needs the diffusers package: {INSTALL_HINT}") from e
    return diffusers


def device_and_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where `module`'s weights live and their floating dtype."""
    weight = next(module.parameters())
    return weight.device, weight.dtype


def check_keys(state_dict: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size], what: str,
               hint: str = "") -> None:
    """Raise ValueError naming missing, unexpected and wrongly shaped keys of `state_dict` against `shapes`
    (`hint`, when given, ends the message)."""
    missing = [k for k in shapes if k not in state_dict]
    unexpected = [k for k in state_dict if k not in shapes]
    mismatched = [f"{k}: {tuple(state_dict[k].shape)} vs {tuple(shapes[k])}" for k in shapes
                  if k in state_dict and state_dict[k].shape != shapes[k]]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if mismatched:
        problems.append(f"shapes that do not fit ({len(mismatched)}): {', '.join(mismatched)}")
    if problems:
        raise ValueError(f"{what} does not fit the config: " + "; ".join(problems) + (f". {hint}" if hint else ""))
