"""Small helpers shared across the package, under the reference's names (`ldm.util.*`)."""
from __future__ import annotations

import logging
from pathlib import Path
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


def read_utf8(path: Path) -> str:
    """The text of a file users write (captions, prompts, metadata); one that is not UTF-8 is a ValueError naming
    the file and the first bad byte, not a traceback from deep inside the decoder."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")  # a BOM, as some editors write, is not part of the text
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); save it as "
                         "UTF-8") from None
