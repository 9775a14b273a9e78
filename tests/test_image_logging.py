"""Sample grids of `ldm.image_logs.log_images`: a short configurable sampler run, and SIGTERM never waits for it."""
import os
import signal
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from ldm.callbacks import ImageLogger
from ldm.data.datamodule import DataModuleFromConfig
from ldm.image_logs import log_images, render_condition
from ldm.util import instantiate_from_config

TINY_TXT2IMG = Path(__file__).resolve().parent / "configs" / "ldm_tiny_txt2img.yaml"


def tiny_txt2img():
    torch.manual_seed(0)
    model = instantiate_from_config(OmegaConf.load(TINY_TXT2IMG).model)
    model.learning_rate = 1e-4
    return model


def count_sampling_calls(model, on_call=lambda n: None) -> dict:
    """Counts the U-Net calls made in eval mode (the image logger's sampling); `on_call(n)` after each."""
    calls = {"n": 0}
    apply_model = model.apply_model

    def counted(x, t, cond=None):
        if not model.training:
            calls["n"] += 1
            on_call(calls["n"])
        return apply_model(x, t, cond)

    model.apply_model = counted
    return calls


def shapes_data() -> DataModuleFromConfig:
    return DataModuleFromConfig(batch_size=2, num_workers=0,
                                train={"target": "ldm.data.shapes.ShapesTrain", "params": {"size": 32, "num_samples": 8}})


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "ddim"])
def test_sample_grids_use_the_configured_sampler_and_steps(sampler):
    model = tiny_txt2img().eval()
    calls = count_sampling_calls(model)
    batch = {"image": torch.rand(2, 32, 32, 3) * 2 - 1, "caption": ["a red circle", "a blue square"]}
    log = log_images(model, batch, N=2, sampler=sampler, steps=4)
    assert calls["n"] == 8  # 4 steps for the samples, 4 for the guided samples (one batched call per step)
    assert {"samples", "denoise_row", "samples_cfg_scale_3.00"} <= set(log)
    assert log["denoise_row"].shape[-1] == 4 * 32 + 5 * 2  # x̂_0 after each of the 4 steps, in a row


def test_sigterm_while_logging_images_stops_sampling_and_writes_nothing(tmp_path):
    model = tiny_txt2img()
    # Lightning's handler only sets a flag on SIGTERM; the sampling loop must look at it.
    calls = count_sampling_calls(model, lambda n: os.kill(os.getpid(), signal.SIGTERM) if n == 2 else None)
    logger = ImageLogger(batch_frequency=1, max_images=2, log_images_kwargs={"steps": 200})
    trainer = pl.Trainer(max_steps=50, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[logger],
                         default_root_dir=str(tmp_path))
    with pytest.raises(SystemExit):  # Lightning's SIGTERMException, raised after the batch
        trainer.fit(model, shapes_data())
    assert calls["n"] == 2  # stopped right after the step the signal came in, of 400 (200 steps, plain and guided)
    assert trainer.global_step == 1
    assert not list(tmp_path.rglob("*.png"))


def test_a_masked_image_with_its_mask_is_shown_as_the_image_and_a_label_map_in_colour():
    masked = torch.rand(2, 3, 8, 8) * 2 - 1
    mask = (torch.rand(2, 1, 8, 8) > 0.5).float()
    shown = render_condition(torch.cat([masked, mask], 1), 8, {}, None, torch.device("cpu"))
    assert torch.equal(shown, masked)  # the inpainting model's concat condition: image first, mask after it
    labels = torch.nn.functional.one_hot(torch.randint(0, 5, (2, 8, 8)), 5).permute(0, 3, 1, 2).float()
    coloured = render_condition(labels, 8, {}, None, torch.device("cpu"))
    assert coloured.shape == (2, 3, 8, 8)
    same_class = labels.argmax(1) == labels.argmax(1)[0, 0, 0]
    assert (coloured.permute(0, 2, 3, 1)[same_class] == coloured[0, :, 0, 0]).all()  # one colour per class
