"""Classifier-free guidance (Ho & Salimans 2022): training-time condition dropout and the guided output.

Both halves of the method live here: `drop_conditions` replaces a batch's conditions with their "no
condition" value at a set rate during training, and `guided_model` combines the conditional and
unconditional predictions at sampling time, for every sampler.
"""
from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any, Callable, Optional, Union

import torch

Condition = Union[torch.Tensor, dict, list, None]


def drop_conditions(batch: MutableMapping[str, Any], ucg_training: Mapping[str, Mapping[str, Any]],
                    generator: Optional[torch.Generator] = None) -> MutableMapping[str, Any]:
    """Replace each example's `batch[key]` by `val` with probability `p`, independently per key and example.

    `ucg_training` maps a batch key to ``{p: float, val: value}`` (Stable Diffusion 2's name): ``val`` is
    what stands for "no condition", e.g. ``""`` for captions or the null class index for labels. Lists
    (captions) and tensors (labels, images) are supported; the batch is changed in place and returned.
    """
    for key, spec in ucg_training.items():
        if key not in batch:
            raise KeyError(f"ucg_training names batch key {key!r}, but the batch has only {sorted(batch)}; "
                           "use the name of the conditioning key (the model's cond_stage_key)")
        p = float(spec["p"])
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"ucg_training.{key}.p must be a probability in [0, 1], got {p}")
        value = spec.get("val", "")
        items = batch[key]
        drop = torch.rand(len(items), generator=generator) < p
        if isinstance(items, torch.Tensor):
            fill = torch.as_tensor(value, dtype=items.dtype, device=items.device)
            mask = drop.to(items.device).reshape(-1, *([1] * (items.dim() - 1)))
            batch[key] = torch.where(mask, fill, items)
        else:
            batch[key] = [value if d else item for item, d in zip(items, drop.tolist())]
    return batch


def _concat_conditions(uncond: Condition, cond: Condition) -> Condition:
    """One batch holding the unconditional half first, then the conditional half (the reference's order)."""
    if isinstance(cond, dict):
        return {k: _concat_conditions(uncond[k], cond[k]) for k in cond}
    if isinstance(cond, list):
        return [_concat_conditions(u, c) for u, c in zip(uncond, cond)]
    return torch.cat([uncond, cond])


def guided_model(model: Callable[[torch.Tensor, torch.Tensor, Condition], torch.Tensor], cond: Condition,
                 uncond: Condition = None, scale: float = 1.0) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`f(x, t)`: the model output with classifier-free guidance, out_u + scale · (out_c − out_u) (Ho &
    Salimans, eq. 6).

    Both passes run as one batch of 2B (unconditional half first); scale 1 or no `uncond` is a single
    conditional pass. `cond`/`uncond` are tensors, lists or dicts of them (hybrid conditioning); their
    concatenation is made once here, not at every sampling step. The combination is linear, so it holds
    for ε, x_0 and v outputs alike.
    """
    if uncond is None or scale == 1.0:
        return lambda x, t: model(x, t, cond)
    both = _concat_conditions(uncond, cond)

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out_uncond, out_cond = model(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return out_uncond + scale * (out_cond - out_uncond)

    return guided
