"""The step progress bar redraws by optimizer steps, across epochs shorter than its refresh interval."""
import re

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from ldm.progress import StepProgressBar


class _Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_bar_counts_steps_across_short_epochs(tmp_path, capfd):
    data = TensorDataset(torch.randn(6, 2), torch.randn(6, 1))  # 3 batches an epoch
    bar = StepProgressBar(refresh_rate=4)
    trainer = pl.Trainer(max_steps=10, callbacks=[bar], logger=False, enable_checkpointing=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path), accelerator="cpu")
    trainer.fit(_Regression(), DataLoader(data, batch_size=2))
    shown = [int(n) for n in re.findall(r"\| *(\d+)/10 ", capfd.readouterr().out)]  # Lightning's bars go to stdout
    # every 4 steps although no epoch has 4 batches (the batch index never reaches 4), then the last step
    assert {4, 8, 10} <= set(shown), shown
    assert max(shown) == 10
