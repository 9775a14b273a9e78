"""Training that diverges stops, and never leaves non-finite weights in a checkpoint.

Two guards, one per place a diverged run can do harm:
- `raise_if_not_finite`, called by every module's training step before its backward pass: a NaN or infinite
  loss stops the run with a message naming the step and the non-finite loss terms (`TrainingDiverged`).
- `SafeCheckpointIO`, the Trainer's checkpoint writer (main.py): it refuses to write a checkpoint whose
  weights are not all finite, so the last good one stays in place, and it writes atomically (a temporary
  file in the target's own directory, flushed to disk, then renamed over the target), so a run killed while
  saving leaves the previous checkpoint whole and no temporary file behind. Reading a damaged checkpoint
  (`-r`) is a one-line `CheckpointError`, not a traceback.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from ldm.checkpoint import CheckpointError, is_disk_full, with_umask_permissions


class TrainingDiverged(FloatingPointError):
    """The loss or the weights stopped being finite; the message says where and what to change."""


ADVICE = ("Lower the learning rate (model.base_learning_rate) or, with 16-bit mixed precision, train with "
          "precision bf16-mixed or 32; resume from the last good checkpoint with -r.")


def raise_if_not_finite(loss: torch.Tensor, terms: Mapping[str, Any], where: str) -> None:
    """Raise `TrainingDiverged` when `loss` is NaN or infinite, naming `where` (e.g. the global step) and
    the logged `terms` that are not finite."""
    if bool(torch.isfinite(loss.detach()).all()):
        return
    bad = {name: float(torch.as_tensor(value).detach().float().mean())
           for name, value in terms.items() if not bool(torch.isfinite(torch.as_tensor(value)).all())}
    raise TrainingDiverged(f"the training loss is {float(loss.detach().float().mean())} at {where}; non-finite "
                           f"terms: {bad or 'none of the logged ones'}. Training stopped. {ADVICE}")


def non_finite_tensors(state_dict: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors of `state_dict` holding a NaN or an infinity."""
    return [name for name, value in state_dict.items()
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())]


def non_finite_optimizer_state(optimizer_states: Any) -> list[str]:
    """Names (``optimizer 0, parameter 3: exp_avg_sq``) of the optimizer-state tensors holding a NaN or an
    infinity, in Lightning's checkpoint list of `Optimizer.state_dict()`s."""
    bad = []
    for index, optimizer in enumerate(optimizer_states):
        for parameter, state in (optimizer.get("state", {}) if isinstance(optimizer, Mapping) else {}).items():
            bad += [f"optimizer {index}, parameter {parameter}: {name}"
                    for name in non_finite_tensors(state if isinstance(state, Mapping) else {})]
    return bad


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint writer with two guarantees: finite weights only, written atomically; and a
    checkpoint that cannot be read (damaged, or not a checkpoint) is a `CheckpointError` naming the file."""

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        # weights_only explicitly, whatever torch's default or TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD say: -r never runs
        # pickled code. Only map_location is passed on positionally.
        kwargs["weights_only"] = True
        try:
            return super().load_checkpoint(path, *args[:1], **kwargs)
        except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as e:
            reason = (str(e).strip().splitlines() or [""])[0][:200]
            raise CheckpointError(f"cannot read {path} ({e.__class__.__name__}: {reason}): it is damaged or not a "
                                  "checkpoint; resume from another one with -r <run>/checkpoints/<file>.ckpt") from e

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        # The optimizer's moments too: finite weights with a NaN in Adam's second moment diverge on the next step.
        bad = non_finite_tensors(checkpoint.get("state_dict", {})) + non_finite_optimizer_state(
            checkpoint.get("optimizer_states", []))
        if bad:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise TrainingDiverged(f"not writing {path}: the weights or optimizer state are not finite ({shown}); "
                                   f"the checkpoint already there is kept. {ADVICE}")
        atomic_torch_save(checkpoint, Path(path))


PARTIAL_WRITE = ".{name}.*.tmp"  # atomic_torch_save's temporary file for `name`


def remove_partial_writes(directory: Path) -> list[Path]:
    """Delete the temporary files of checkpoint writes that a kill (SIGKILL, power loss) cut short: the
    checkpoints themselves are whole (the last complete write of each), these are leftovers."""
    if not directory.is_dir():
        return []
    partial = sorted(directory.glob(PARTIAL_WRITE.format(name="*")))
    for path in partial:
        path.unlink(missing_ok=True)
    return partial


class _RecordingWriter:
    """A file for `torch.save` that keeps the first OSError of its writes: torch's zip writer reports a write
    that failed for want of space as "unexpected pos" (a RuntimeError), losing the reason."""

    def __init__(self, file: Any) -> None:
        self.file, self.error = file, None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.file.flush()


def atomic_torch_save(obj: Any, path: Path) -> None:
    """`torch.save` to `path` through a temporary file in its directory, fsync'd, then `os.replace`d: readers
    see the old file or the new one, never a part; a failure removes the temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, _, suffix = PARTIAL_WRITE.format(name=path.name).partition("*")
    handle, temporary = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    writer = None
    try:
        with os.fdopen(handle, "wb") as f:
            writer = _RecordingWriter(f)
            torch.save(obj, writer)
            f.flush()
            os.fsync(f.fileno())
        with_umask_permissions(Path(temporary))
        os.replace(temporary, path)
    except BaseException as e:
        Path(temporary).unlink(missing_ok=True)
        cause = writer.error if writer is not None and writer.error is not None else e
        if is_disk_full(cause):  # say which file it was: a failed write() names none
            raise OSError(cause.errno, cause.strerror, str(path)) from e
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power loss
    finally:
        os.close(directory)
