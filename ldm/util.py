"""Small helpers shared across the package, under the reference's names (`ldm.util.*`)."""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional, TypeVar

import torch

from ldm.config import ConfigError, get_obj_from_str, instantiate_from_config

log = logging.getLogger(__name__)

__all__ = [
    "ConfigError",
    "count_params",
    "default",
    "exists",
    "get_obj_from_str",
    "instantiate_from_config",
]

T = TypeVar("T")


def exists(x: Any) -> bool:
    return x is not None


def default(value: Optional[T], fallback: T | Callable[[], T]) -> T:
    """`value` unless it is None, else `fallback` (called if it is a function)."""
    if value is not None:
        return value
    return fallback() if callable(fallback) else fallback


def count_params(model: torch.nn.Module, verbose: bool = False) -> int:
    total = sum(p.numel() for p in model.parameters())
    if verbose:
        log.info(f"{model.__class__.__name__} has {total * 1.e-6:.2f} M params.")
    return total
