"""A few Lightning steps of tiny AutoencoderKL / VQModel with the real GAN losses (manual optimisation)."""
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader

from ldm.divergence import TrainingDiverged
from ldm.models.autoencoder import AutoencoderKL, VQModel

RESOLUTION = 16
DDCONFIG = dict(double_z=True, z_channels=4, resolution=RESOLUTION, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                num_res_blocks=1, attn_resolutions=[8], dropout=0.0)
DISC_START = 2  # in batches


@pytest.fixture(autouse=True)
def _one_thread():
    # Two threads on a shared 2-core machine contend badly (100x slower); these models are tiny anyway.
    torch.set_num_threads(1)


def kl_model(**kwargs):
    loss = {"target": "ldm.modules.losses.LPIPSWithDiscriminator",
            "params": dict(disc_start=DISC_START, kl_weight=1e-6, perceptual_weight=0.0, disc_num_layers=1,
                           disc_weight=0.5)}
    model = AutoencoderKL(ddconfig=DDCONFIG, lossconfig=loss, embed_dim=4, **kwargs)
    model.learning_rate = 1e-3
    return model


def vq_model(**kwargs):
    loss = {"target": "ldm.modules.losses.VQLPIPSWithDiscriminator",
            "params": dict(disc_start=DISC_START, perceptual_weight=0.0, disc_num_layers=1, disc_ndf=16,
                           n_classes=32)}
    model = VQModel(ddconfig={**DDCONFIG, "double_z": False, "z_channels": 3}, lossconfig=loss, n_embed=32,
                    embed_dim=3, **kwargs)
    model.learning_rate = 1e-3
    return model


def loader(n=4, batch_size=2, seed=0, channels=3):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, RESOLUTION, RESOLUTION, channels, generator=generator) * 2 - 1
    return DataLoader([{"image": image} for image in images], batch_size=batch_size, shuffle=False)


def trainer(batches, callbacks=(), **kwargs):
    # Manual optimisation steps two optimisers per batch, so max_steps counts 2 per batch.
    kwargs.setdefault("limit_val_batches", 0)
    return pl.Trainer(max_steps=2 * batches, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      callbacks=list(callbacks), **kwargs)


class DiscriminatorWatch(pl.Callback):
    """Records, per batch, the discriminator's state and when its forward pass ran."""

    def __init__(self):
        self.states, self.forward_steps = [], []

    def on_fit_start(self, trainer, module):
        self.initial = {k: v.clone() for k, v in module.loss.discriminator.state_dict().items()}
        module.loss.discriminator.register_forward_hook(lambda *_: self.forward_steps.append(module.batch_step))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.states.append({k: v.clone() for k, v in module.loss.discriminator.state_dict().items()})


def same_state(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_kl_training_steps_both_optimizers_and_learns_logvar():
    torch.manual_seed(0)
    model = kl_model(learn_logvar=True)
    initial_logvar = model.loss.logvar.item()
    initial_encoder = model.encoder.conv_in.weight.detach().clone()
    watch = DiscriminatorWatch()
    fit = trainer(4, callbacks=[watch])
    fit.fit(model, loader(8))

    assert fit.global_step == 8 and model.batch_step == 4
    assert torch.isfinite(fit.callback_metrics["train/total_loss"])
    assert torch.isfinite(fit.callback_metrics["discloss"])
    opt_ae, opt_disc = fit.optimizers
    assert any(p is model.loss.logvar for group in opt_ae.param_groups for p in group["params"])
    assert model.loss.logvar.item() != initial_logvar
    assert not torch.equal(model.encoder.conv_in.weight, initial_encoder)
    assert len(opt_disc.state) > 0  # the discriminator optimiser stepped once disc_start was reached
    # Before disc_start the discriminator was neither run nor changed (weights and BatchNorm statistics).
    assert min(watch.forward_steps) == DISC_START
    assert same_state(watch.states[DISC_START - 1], watch.initial)
    assert not same_state(watch.states[DISC_START], watch.initial)


def test_kl_fixed_logvar_stays_out_of_the_optimizer():
    torch.manual_seed(0)
    model = kl_model(learn_logvar=False)
    fit = trainer(1)
    fit.fit(model, loader(2))
    assert not model.loss.logvar.requires_grad and model.loss.logvar.item() == 0.0
    assert all(p is not model.loss.logvar for group in fit.optimizers[0].param_groups for p in group["params"])


def test_vq_training_with_ema_codebook_restarts_and_weight_ema_logs_validation():
    torch.manual_seed(0)
    model = vq_model(use_ema=True, quantizer_ema_decay=0.9, restart_unused_codes=True, restart_after_steps=1)
    codebook = model.quantize.embedding.weight.detach().clone()
    watch = DiscriminatorWatch()
    fit = trainer(3, callbacks=[watch], limit_val_batches=1, val_check_interval=3)
    fit.fit(model, loader(6), loader(2, seed=1))

    metrics = fit.callback_metrics
    assert torch.isfinite(metrics["train/total_loss"]) and torch.isfinite(metrics["train/quant_loss"])
    assert "train/perplexity" in metrics and "train/codebook_usage" in metrics
    for key in ("val/rec_loss", "val_ema/rec_loss", "val/total_loss", "val/disc_loss"):
        assert torch.isfinite(metrics[key]), key
    assert min(watch.forward_steps) == DISC_START
    assert len(fit.optimizers[1].state) > 0
    # The EMA codebook moved although it takes no gradient and is not in the optimiser.
    assert not torch.equal(model.quantize.embedding.weight, codebook)
    assert all(p is not model.quantize.embedding.weight for g in fit.optimizers[0].param_groups for p in g["params"])
    assert model.model_ema.num_updates.item() == 3


def test_vq_resume_continues_weights_and_ema_exactly(tmp_path):
    def fresh():
        torch.manual_seed(0)
        return vq_model(use_ema=True, quantizer_ema_decay=0.9)

    # One batch per epoch: Lightning restarts a non-stateful loader on resume, so only then do both runs
    # see the same data sequence.
    straight = fresh()
    trainer(4).fit(straight, loader(2))

    first = fresh()
    partial = trainer(2)
    partial.fit(first, loader(2))
    partial.save_checkpoint(tmp_path / "half.ckpt")
    resumed = fresh()
    trainer(4).fit(resumed, loader(2), ckpt_path=tmp_path / "half.ckpt")

    expected = straight.state_dict()
    assert any(k.startswith("model_ema.") for k in expected)
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_fp16_grad_scaler_steps_the_idle_discriminator_without_changing_it():
    # GradScaler refuses to step an optimiser without gradients; CPU fp16 autocast stands in for CUDA here.
    torch.manual_seed(0)
    model = kl_model()
    watch = DiscriminatorWatch()
    scaler = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    fit = trainer(3, callbacks=[watch], plugins=[scaler])
    fit.fit(model, loader(6))
    assert fit.global_step == 6 and torch.isfinite(fit.callback_metrics["train/total_loss"])
    assert same_state(watch.states[DISC_START - 1], watch.initial)
    assert not same_state(watch.states[DISC_START], watch.initial)


class HalvingSchedule:
    """A learning-rate multiplier for `scheduler_config`: 0.5 ** (batches seen)."""

    def schedule(self, step):
        return 0.5 ** step


def test_scheduler_scales_both_learning_rates_per_batch():
    torch.manual_seed(0)
    model = vq_model(lr_g_factor=2.0,
                     scheduler_config={"target": "tests.test_autoencoder_training.HalvingSchedule"})
    fit = trainer(3)
    fit.fit(model, loader(2))
    opt_ae, opt_disc = fit.optimizers
    assert opt_ae.param_groups[0]["lr"] == pytest.approx(2.0 * 1e-3 * 0.5 ** 3)
    assert opt_disc.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5 ** 3)


def test_non_finite_loss_stops_training_with_a_message():
    torch.manual_seed(0)
    model = kl_model()
    data = loader(2)
    data.dataset[1]["image"][0, 0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"loss is nan at the autoencoder step of batch step 0 .*train/rec_loss"):
        trainer(1).fit(model, data)


def test_log_images_inputs_reconstructions_and_fixed_prior_samples():
    torch.manual_seed(0)
    model = kl_model(ema_decay=0.99).eval()
    batch = next(iter(loader(4, batch_size=4)))
    images = model.log_images(batch, N=3, plot_ema=True)
    assert set(images) == {"inputs", "reconstructions", "samples", "reconstructions_ema", "samples_ema"}
    for key, value in images.items():
        assert value.shape == (3, 3, RESOLUTION, RESOLUTION), key
        assert value.min() >= -1 and value.max() <= 1, key
    assert torch.equal(images["samples"], model.log_images(batch, N=3)["samples"])  # same latents every time
    assert set(model.log_images(batch, only_inputs=True)) == {"inputs"}

    vq = vq_model().eval()
    vq_images = vq.log_images(batch, N=2)
    assert {k: tuple(v.shape) for k, v in vq_images.items()} == {
        k: (2, 3, RESOLUTION, RESOLUTION) for k in ("inputs", "reconstructions", "samples")}


def test_log_images_shows_non_rgb_data_as_rgb():
    torch.manual_seed(0)
    config = {**DDCONFIG, "in_channels": 5, "out_ch": 5}
    model = AutoencoderKL(ddconfig=config, lossconfig={"target": "torch.nn.Identity"}, embed_dim=4).eval()
    images = model.log_images(next(iter(loader(2, channels=5))))
    assert all(v.shape[1] == 3 and v.min() >= -1 and v.max() <= 1 for v in images.values())
    assert "colorize" not in model.state_dict()  # made on demand, not added to checkpoints


def test_get_input_rejects_channels_first_batches():
    model = kl_model()
    with pytest.raises(ValueError, match="channels-last"):
        model.get_input({"image": torch.zeros(2, 3, RESOLUTION, RESOLUTION)}, "image")
    with pytest.raises(KeyError, match="image_key"):
        model.get_input({"jpg": torch.zeros(2, RESOLUTION, RESOLUTION, 3)}, "image")
