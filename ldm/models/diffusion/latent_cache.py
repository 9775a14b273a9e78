"""First-stage encodings cached per dataset item (`LatentDiffusion(cache_latents=...)`), as sd-scripts' and
diffusers' `cache_latents`.

The frozen first stage gives the same posterior for the same image every time, so encoding each training
image once saves its encoder pass on every later epoch (on the built-in txt2img config 40 % of the U-Net
training step's time: bench/results/training_step.md). What is cached is the posterior, not a draw from
it: for a KL first stage its parameters (mean and log-variance, from which the std follows), so training
still samples a fresh z = mean + std·ε at every visit exactly as without the cache; for VQ and identity
first stages the encoder's tensor output. `scale_factor` is applied after the cache, so `scale_by_std`
and the cached values do not depend on each other.

Items are keyed by the integer ``index`` entry every item of `ldm.data.shapes` and `ldm.data.folder` carries
(a stable key: the built-in item is a pure function of (seed, split, index); a folder item of its file).
A cache belongs to one (first stage, train data) pair, its *identity*: a SHA-256 of the first stage's
weights and the train dataset's config. `open` clears the cache when the identity changes, and the disk
cache (``dir``) names its file after the identity, so a changed first stage or data config never reuses
stale latents. Only training batches use it: validation and image logging encode as before.

Cost: the cache must be able to hold every training item (`max_items`, checked when training starts), and
only a finite pool of items can be cached. The built-in data can make as many distinct images as asked
for (txt2img.yaml asks for 1,000,000, more than a run ever draws); with the cache, training draws from a
pool of ``data.params.train.params.num_samples`` items, each reused every epoch, so it sees fewer distinct
images and captions: e.g. 20,000 items over 3,000 steps of 32 shows each about 5 times, and the first
epoch still pays the encoder for every item. Random augmentation (random crops, flips) cannot be cached:
a cached item would always show its first augmentation, so such a dataset is refused. Under DDP each
process caches the items it sees; only rank 0 writes the file.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from safetensors import safe_open
from torch import nn

from ldm.checkpoint import save_safetensors
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

log = logging.getLogger(__name__)

# Each cached item is about (2·C·h·w) float32 values: 2 KiB for the built-in 8x8x4 latents (200 MiB at the
# default), 32 KiB for 32x32x4 latents of 256² images.
DEFAULT_MAX_ITEMS = 100_000
OPTION_KEYS = ("dir", "max_items")
FORMAT = "ldm-latent-cache-1"  # part of the identity: a new storage format never reads an old file

Encoder = Callable[[torch.Tensor], Union[DiagonalGaussianDistribution, torch.Tensor]]
Encoding = Union[DiagonalGaussianDistribution, torch.Tensor]


class LatentCache:
    """Encodings of dataset items by their integer key, in memory and optionally in ``dir``.

    `encode(keys, images, encoder)` returns the batch's posterior (or tensor), encoding only the items not
    cached yet; `hits` and `misses` count items. `open(first_stage, dataset, data_config)` binds the cache to
    a first stage and train data (done by `LatentDiffusion.on_train_start`), loading the disk cache if
    there is one; `save()` writes the disk cache when it has new items.
    """

    def __init__(self, dir: Optional[Union[str, Path]] = None, max_items: int = DEFAULT_MAX_ITEMS) -> None:
        if isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 1:
            raise ValueError(f"cache_latents.max_items must be a positive integer, got {max_items!r}")
        self.dir = None if dir is None else Path(dir).expanduser()
        self.max_items = max_items
        self.identity: Optional[str] = None
        self.hits = 0
        self.misses = 0
        self._rows: dict[int, torch.Tensor] = {}
        self._kind: Optional[str] = None  # "gaussian", "deterministic_gaussian" or "tensor"
        self._unsaved = False

    @classmethod
    def from_option(cls, option: Union[bool, Mapping, None]) -> Optional["LatentCache"]:
        """The cache a `cache_latents` config value asks for: false/None (no cache), true, or a mapping
        with `dir` (a disk cache there) and `max_items`."""
        if option is None or option is False:
            return None
        if option is True:
            return cls()
        if not isinstance(option, Mapping):
            raise TypeError(f"cache_latents must be true, false or a mapping with {OPTION_KEYS}, got {option!r}")
        unknown = sorted(set(option) - set(OPTION_KEYS))
        if unknown:
            raise ValueError(f"cache_latents: unknown key(s) {unknown}; it accepts {', '.join(OPTION_KEYS)}")
        return cls(dir=option.get("dir"), max_items=option.get("max_items", DEFAULT_MAX_ITEMS))

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def path(self) -> Optional[Path]:
        """The disk cache file of the current identity (None without `dir` or before `open`)."""
        if self.dir is None or self.identity is None:
            return None
        return self.dir / f"latents-{self.identity[:32]}.safetensors"

    # ------------------------------------------------------------------------------------ binding

    def open(self, first_stage: nn.Module, dataset: Any, data_config: Optional[Mapping]) -> None:
        """Bind to `first_stage` and the train `dataset` (built from `data_config`): check that the cache can
        serve it, clear what another identity left, and load the disk cache of this one."""
        if getattr(dataset, "random_augmentation", False):
            raise ValueError("cache_latents: the train dataset augments at random (random crop or flip_p > 0), "
                             "which a cached latent would freeze; use crop: center and flip_p: 0, or turn the cache off")
        if not hasattr(dataset, "__len__"):
            raise ValueError("cache_latents needs a map-style train dataset (with a length and an 'index' in its "
                             "items); turn it off for this dataset")
        if len(dataset) > self.max_items:
            raise ValueError(f"cache_latents holds at most max_items={self.max_items} latents but the train dataset "
                             f"has {len(dataset)} items; lower its num_samples (the pool of built-in images reused "
                             "every epoch) or raise cache_latents.max_items")
        if self.dir is not None and data_config is None:
            raise ValueError("cache_latents.dir names its file after the train data's config, and this run's data "
                             "has none (use DataModuleFromConfig, or the in-memory cache: cache_latents: true)")
        identity = fingerprint(first_stage, data_config)
        if identity != self.identity:
            self._rows, self._kind, self._unsaved = {}, None, False
            self.identity = identity
            self._load()

    def _load(self) -> None:
        if self.path is None or not self.path.is_file():
            return
        with safe_open(str(self.path), framework="pt") as f:
            kind = f.metadata()["kind"]
            keys, values = f.get_tensor("keys").tolist(), f.get_tensor("values")
        self._kind = kind
        self._rows = dict(zip(keys, values.unbind(0)))
        log.info(f"cache_latents: loaded {len(self._rows)} latents from {self.path}")

    def save(self) -> Optional[Path]:
        """Write the disk cache if it has items not yet on disk; the file written, or None."""
        if self.path is None or not self._unsaved:
            return None
        keys = sorted(self._rows)
        tmp = self.path.with_suffix(".tmp")
        save_safetensors({"keys": torch.tensor(keys, dtype=torch.long),
                          "values": torch.stack([self._rows[k] for k in keys])}, tmp, metadata={"kind": self._kind})
        tmp.replace(self.path)  # a run killed mid-write leaves the previous file whole
        self._unsaved = False
        return self.path

    # ------------------------------------------------------------------------------------ lookup

    def encode(self, keys: Optional[Union[torch.Tensor, Sequence[int]]], images: torch.Tensor,
               encoder: Encoder) -> Encoding:
        """The encoder's output for `images` (N, C, H, W) whose items have `keys`, encoding only uncached ones."""
        if keys is None:
            raise KeyError("cache_latents needs an 'index' entry in every item (a stable integer key); the built-in "
                           "and folder datasets give one: add it to your dataset or turn cache_latents off")
        keys = keys.tolist() if isinstance(keys, torch.Tensor) else [int(k) for k in keys]
        if len(keys) != images.shape[0]:
            raise ValueError(f"cache_latents: {len(keys)} item keys for a batch of {images.shape[0]} images")
        missing = [i for i, key in enumerate(keys) if key not in self._rows]
        if missing:
            self._store([keys[i] for i in missing], encoder(images if len(missing) == len(keys) else images[missing]))
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        rows = torch.stack([self._rows[key] for key in keys]).to(images.device)
        if self._kind == "tensor":
            return rows
        return DiagonalGaussianDistribution(rows, deterministic=self._kind == "deterministic_gaussian")

    def _store(self, keys: list[int], encoded: Encoding) -> None:
        if isinstance(encoded, DiagonalGaussianDistribution):
            kind = "deterministic_gaussian" if encoded.deterministic else "gaussian"
            values = encoded.parameters
        elif isinstance(encoded, torch.Tensor):
            kind, values = "tensor", encoded
        else:
            raise TypeError(f"cache_latents: the first stage's encoder returned {type(encoded).__name__}; "
                            "expected DiagonalGaussianDistribution or Tensor")
        if self._kind not in (None, kind):
            raise ValueError(f"cache_latents: the encoder returned a {kind} output for a cache of {self._kind} ones")
        if len(self._rows) + len(keys) > self.max_items:
            raise ValueError(f"cache_latents: more than max_items={self.max_items} distinct item keys; raise "
                             "cache_latents.max_items or lower the number of training items")
        self._kind = kind
        # float32 on the CPU: one layout whatever the run's precision and device, and no accelerator memory.
        values = values.detach().float().cpu()
        self._rows.update(zip(keys, values.unbind(0)))
        self._unsaved = True


def fingerprint(first_stage: nn.Module, data_config: Optional[Mapping]) -> str:
    """SHA-256 of the first stage's weights (every state-dict tensor's name, dtype, shape and bytes), the
    train data's config and the cache format: what the cached values depend on."""
    digest = hashlib.sha256(FORMAT.encode())
    for name, tensor in sorted(first_stage.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(json.dumps(_plain(data_config), sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _plain(config: Any) -> Any:
    """An OmegaConf or plain config as JSON-able dicts and lists."""
    if isinstance(config, Mapping):
        return {str(k): _plain(v) for k, v in config.items()}
    if isinstance(config, Sequence) and not isinstance(config, str):
        return [_plain(v) for v in config]
    return config
