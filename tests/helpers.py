"""Small things tests hand to main.py through configs (importable as `tests.helpers.*`)."""
import json
from pathlib import Path

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
