"""Small things tests hand to main.py through configs (importable as `tests.helpers.*`), and `load_script`."""
import importlib
import importlib.util
import json
import os
import signal
from pathlib import Path
from types import ModuleType

import pytorch_lightning as pl
import torch


def optimizer_fingerprint(state: dict) -> list[float]:
    """Sum of every tensor in each optimizer's state: equal fingerprints mean equal moment buffers."""
    out = []
    for opt_state in state:
        total = 0.0
        for param_state in opt_state["state"].values():
            for v in param_state.values():
                if isinstance(v, torch.Tensor):
                    total += float(v.double().sum())
        out.append(total)
    return out


class StateRecorder(pl.Callback):
    """Writes the global step and optimizer fingerprint seen when training (re)starts."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = Path(path)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        states = [opt.state_dict() for opt in trainer.optimizers]
        ema = {k: float(v.double().sum()) for k, v in pl_module.state_dict().items() if k.startswith("model_ema")}
        self.path.write_text(json.dumps({"global_step": trainer.global_step,
                                         "optimizers": optimizer_fingerprint(states),
                                         "ema_sum": sum(ema.values())}))


# torchvision's vgg16().features written out by hand: (index, layer) for every conv, ReLU and max-pool.
VGG16_CONV_CHANNELS = {0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128), 10: (128, 256), 12: (256, 256),
                 14: (256, 256), 17: (256, 512), 19: (512, 512), 21: (512, 512), 24: (512, 512),
                 26: (512, 512), 28: (512, 512)}
POOLS = {4, 9, 16, 23, 30}
# LPIPS reads relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
TAPS = (3, 8, 15, 22, 29)



def random_vgg16_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """A torchvision-format VGG16 checkpoint with random (He-initialised) features and a dummy classifier."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for i, (c_in, c_out) in VGG16_CONV_CHANNELS.items():
        state[f"features.{i}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=gen) * (2.0 / (9 * c_in)) ** 0.5
        state[f"features.{i}.bias"] = 0.1 * torch.randn(c_out, generator=gen)
    state["classifier.0.weight"] = torch.randn(4, 3, generator=gen)  # ignored by the loader
    return state


REPO = Path(__file__).resolve().parents[1]


def load_script(name: str) -> ModuleType:
    """A program as a module, to call its functions or main() in this process: `ldm.cli.<name>` for the
    installed commands (scripts/<name>.py only calls it), else the checkout-only scripts/<name>.py."""
    if (REPO / "ldm" / "cli" / f"{name}.py").is_file():
        return importlib.import_module(f"ldm.cli.{name}")
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class KillAtStep(pl.Callback):
    """SIGKILLs the training process once it reaches `step` (once: `marker` records it), as `kill -9` would."""

    def __init__(self, step: int, marker: str) -> None:
        super().__init__()
        self.step, self.marker = step, Path(marker)

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step >= self.step and not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)


class _KillWhenPickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        self.marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)  # in the middle of writing the checkpoint file


class KillWhileSaving(pl.Callback):
    """SIGKILLs the process while it writes the first checkpoint after `after_step` (once: `marker`)."""

    def __init__(self, after_step: int, marker: str) -> None:
        super().__init__()
        self.after_step, self.marker = after_step, Path(marker)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if trainer.global_step > self.after_step and not self.marker.exists():
            checkpoint["kill_while_writing"] = _KillWhenPickled(self.marker)
