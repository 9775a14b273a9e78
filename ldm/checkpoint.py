"""Reading and writing model weights safely.

`.ckpt` files are pickles and can run code when unpickled, so they are always read with
``weights_only=True`` and a short allowlist of what released Lightning 1.x checkpoints hold besides tensors
(`load_checkpoint_file`); `.safetensors` is the format we write for sharing. Loading reports missing and
unexpected keys by name instead of failing deep inside ``load_state_dict``.
"""
from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from ldm import assets


# Weights only training needs: the first stage's LPIPS network and discriminator live under `loss.`.
TRAINING_ONLY_PREFIXES = ("loss.",)


def inference_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` without the training-only weights (`TRAINING_ONLY_PREFIXES`)."""
    return {k: v for k, v in state_dict.items() if not k.startswith(TRAINING_ONLY_PREFIXES)}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # no space left; disk quota exceeded


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` is a write that failed for want of space (which the user fixes, not the code)."""
    return isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS


class LightningCallbackStub:
    """Stands in for a callback class that a Lightning 1.x checkpoint pickled as a dict key (the released CompVis
    and Stable Diffusion `.ckpt` files key their callback states by the class itself). Inert: no behaviour, and
    nothing of it is used; it only lets the rest of the file be read."""


def _stub(path: str) -> tuple[type, str]:
    module, _, name = path.rpartition(".")
    return type(name, (LightningCallbackStub,), {"__module__": module}), path


def _numpy_globals() -> list[Any]:
    """numpy's scalar reconstructor (under numpy 1's and 2's module names) and its dtypes: the non-tensor numbers
    Lightning 1.x stored beside the weights."""
    import numpy as np

    reconstructor = np.float64(0).__reduce__()[0]
    dtypes = [getattr(np.dtypes, name) for name in dir(getattr(np, "dtypes", None))
              if name.endswith("DType") and name[:-5] not in ("Object", "String", "Str", "Bytes", "Void")]
    scalars = [(reconstructor, f"{root}.multiarray.scalar") for root in ("numpy.core", "numpy._core")]
    return [*scalars, np.dtype, *dtypes]


# The globals that released Lightning-1.x-era checkpoints hold beside their tensors, and nothing else: a .ckpt
# naming any other global (os.system, a class with a malicious __reduce__, ...) is refused with its name.
RELEASED_CHECKPOINT_CALLBACKS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "pytorch_lightning.callbacks.early_stopping.EarlyStopping",
    "pytorch_lightning.callbacks.lr_monitor.LearningRateMonitor",
    "pytorch_lightning.callbacks.gpu_stats_monitor.GPUStatsMonitor",
    "pytorch_lightning.callbacks.progress.ProgressBar",
    "main.SetupCallback",  # the reference's own main.py callbacks
    "main.ImageLogger",
    "main.CUDACallback",
)
_CALLBACK_STUBS = [_stub(path) for path in RELEASED_CHECKPOINT_CALLBACKS]


def released_checkpoint_globals() -> list[Any]:
    """What `torch.load(weights_only=True)` may additionally build when reading a `.ckpt`."""
    return [*_CALLBACK_STUBS, *_numpy_globals()]


def load_checkpoint_file(path: Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> Any:
    """A `.ckpt`/`.pt` file's contents, unpickled with ``weights_only=True`` and the allowlist above; a file that
    needs anything else is a `CheckpointError` naming the refused global. `mmap` maps the tensors instead of
    reading them (to look at a small entry of a large file)."""
    try:
        with torch.serialization.safe_globals(released_checkpoint_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:
        refused = re.search(r"GLOBAL (\S+) (was not an allowed global|whose module)", str(e))
        reason = (f"it names {refused.group(1)}, which is not allowed" if refused else
                  f"{e.__class__.__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}")
        raise CheckpointError(
            f"cannot read {path} as a weights-only checkpoint ({reason}). Only tensors, plain containers and the "
            "objects released Lightning checkpoints hold are loaded, never other pickled objects (they could run "
            "code); convert it to .safetensors with a trusted copy of the code that wrote it."
        ) from e


def load_state_dict(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The weights of a `.safetensors` file or a Lightning/PyTorch `.ckpt`/`.pt`/`.pth` file.

    A `.ckpt` holding a ``state_dict`` entry (Lightning, CompVis releases) yields that entry; a bare
    state dict is returned as is. Pickled non-tensor objects are refused by ``weights_only=True``.
    """
    path = assets.resolve(path)  # configs name the built-in weights relative to the repository root
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device=str(map_location))
        except Exception as e:  # SafetensorError (truncated, empty, not safetensors), OSError
            reason = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:200]
            raise CheckpointError(f"cannot read {path} as safetensors ({reason}): the file is damaged or not a "
                                  ".safetensors file; export it again (scripts/export_weights.py)") from e
    data = load_checkpoint_file(path, map_location)
    if isinstance(data, Mapping) and "state_dict" in data:
        data = data["state_dict"]
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors")
    return dict(data)


def _summarise(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def derived_state_keys(module: torch.nn.Module) -> set[str]:
    """Keys a checkpoint may hold that `module` recomputes instead of loading: each submodule lists its own in
    `derived_state_keys` (CLIP's `position_ids`, a persistent buffer in the transformers SD v1 was saved with)."""
    return {f"{name}.{key}" if name else key for name, sub in module.named_modules()
            for key in getattr(sub, "derived_state_keys", ())}


def load_weights(
    module: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    strict: bool = True,
    ignore_prefixes: Iterable[str] = (),
    source: Optional[str] = None,
) -> tuple[list[str], list[str]]:
    """Load `state_dict` into `module`, dropping keys that start with any of `ignore_prefixes`.

    With `strict`, missing or unexpected keys and shape mismatches raise `CheckpointError` listing them.
    Returns ``(missing, unexpected)``.
    """
    ignore = tuple(ignore_prefixes)
    derived = derived_state_keys(module)
    state = {k: v for k, v in state_dict.items() if not (ignore and k.startswith(ignore)) and k not in derived}
    own = module.state_dict()
    missing = [k for k in own if k not in state and not (ignore and k.startswith(ignore))]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    where = f" from {source}" if source else ""
    if mismatched:
        raise CheckpointError(f"shape mismatch loading weights{where}: {_summarise(mismatched)}")
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_summarise(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_summarise(unexpected)}")
        raise CheckpointError(
            f"checkpoint{where} does not fit {module.__class__.__name__}: " + "; ".join(parts)
            + ". Check that the config matches the checkpoint, or pass ignore_keys for parts to drop."
        )
    module.load_state_dict(state, strict=False)
    return missing, unexpected


def shared_parts(net: torch.nn.Module, state: Mapping[str, torch.Tensor], first_stage_ckpt: Optional[str]) -> list[str]:
    """State-dict prefixes a latent diffusion model's weights file may leave out: the frozen first stage when the
    config names its own checkpoint (`first_stage_ckpt`, loaded from there when the model was built) and the file has
    none of it."""
    if not first_stage_ckpt or any(k.startswith("first_stage_model.") for k in state):
        return []
    return ["first_stage_model.", "cond_stage_model."] if net.cond_stage_model is net.first_stage_model \
        else ["first_stage_model."]


def save_safetensors(
    state_dict: Mapping[str, torch.Tensor], path: str | Path, metadata: Optional[Mapping[str, object]] = None
) -> Path:
    """Write weights to `.safetensors` (contiguous CPU copies; shared tensors cloned).

    Non-string metadata values are stored as JSON.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    save_file(tensors, str(path), metadata=meta)
    with_umask_permissions(path)
    return path


def with_umask_permissions(path: Path) -> None:
    """`path` readable as the user's umask allows, as `open()` and `torch.save` create files: safetensors (and
    `tempfile.mkstemp`, used for atomic writes) create them 0600, so a shared model directory or run would
    otherwise be unreadable to the others it is shared with."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
