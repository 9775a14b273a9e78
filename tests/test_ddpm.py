"""`DDPM` and `LatentDiffusion` on tiny models: checkpoint layout, losses, conditioning, guidance, EMA,
latent scaling, image logging and likelihood. Each test builds its own tiny model (8x8 U-Nets, 16 steps)."""
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.loggers import CSVLogger
from safetensors.torch import load_file

from ldm.checkpoint import save_safetensors
from ldm.image_logs import log_images
from ldm.models.diffusion.ddpm import DDPM, LatentDiffusion
from ldm.models.diffusion.guidance import drop_conditions, guided_model
from ldm.modules.diffusionmodules.likelihood import variational_bound
from ldm.modules.diffusionmodules.schedule import NoiseSchedule
from ldm.util import instantiate_from_config

TINY_TXT2IMG = Path(__file__).resolve().parent / "configs" / "ldm_tiny_txt2img.yaml"
TIMESTEPS = 16


def tiny_unet(in_channels: int = 3, out_channels: int = 3, **extra) -> dict:
    """An 8x8 U-Net with one level and one ResBlock per stage: milliseconds per call."""
    params = dict(image_size=8, in_channels=in_channels, out_channels=out_channels, model_channels=32,
                  attention_resolutions=[], num_res_blocks=1, channel_mult=[1], num_heads=1)
    params.update(extra)
    return {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": params}


def cross_attention_unet(in_channels: int = 3, context_dim: int = 16, **extra) -> dict:
    return tiny_unet(in_channels=in_channels, attention_resolutions=[1], num_heads=2, use_spatial_transformer=True,
                     context_dim=context_dim, **extra)


def tiny_ddpm(**kwargs) -> DDPM:
    params = dict(unet_config=tiny_unet(), timesteps=TIMESTEPS, image_size=8, channels=3, use_ema=False,
                  log_every_t=4, monitor=None)
    params.update(kwargs)
    return DDPM(**params)


def perturb_(module: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> None:
    """Move every weight off its initial value: zero-initialised output layers would hide the inputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))


def pixel_batch(n: int = 4, size: int = 8, seed: int = 0) -> torch.Tensor:
    """8-bit images scaled to [-1, 1], NCHW."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=generator).float() / 127.5 - 1.0


def load_tiny_txt2img(overrides: list[str] = ()) -> LatentDiffusion:
    config = OmegaConf.merge(OmegaConf.load(TINY_TXT2IMG), OmegaConf.from_dotlist(list(overrides)))
    return instantiate_from_config(config.model)


def tiny_class_conditional_ldm() -> LatentDiffusion:
    """The tiny txt2img model conditioned on 10 class labels (index 10 = the null class) instead."""
    config = OmegaConf.load(TINY_TXT2IMG)
    params = config.model.params
    params.cond_stage_key = "class_label"
    params.ucg_training = {"class_label": {"p": 0.1, "val": 10}}
    params.cond_stage_config = {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                                "params": {"embed_dim": 32, "n_classes": 10, "key": "class_label",
                                           "add_null_class": True}}
    return instantiate_from_config(config.model)


def image_batch(n: int = 2, seed: int = 0) -> dict:
    """A batch as the datasets give it: NHWC images in [-1, 1] and captions."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 32, 32, 3, generator=generator) * 2 - 1
    return {"image": images, "caption": [f"a photo of thing {i}" for i in range(n)]}


# ------------------------------------------------------------------------------------ schedule buffers


def test_schedule_buffers_are_top_level_state_dict_keys(reference_dir):
    model = tiny_ddpm(timesteps=1000, linear_start=0.00085, linear_end=0.012)
    state_dict = model.state_dict()
    assert [k for k in state_dict if k in NoiseSchedule.BUFFER_NAMES] == list(NoiseSchedule.BUFFER_NAMES)
    assert not any(k.startswith("schedule.") for k in state_dict)
    # lvlb_weights is derived (not persistent) and a fixed logvar is a plain tensor, as in the reference.
    assert "lvlb_weights" not in state_dict and "logvar" not in state_dict
    expected = load_file(str(reference_dir / "schedule_linear.safetensors"))
    for name in NoiseSchedule.BUFFER_NAMES:
        assert torch.equal(state_dict[name], expected[name]), name
    # The attributes user scripts read from the reference model.
    assert model.alphas_cumprod is model.schedule.alphas_cumprod
    assert torch.equal(model.sqrt_one_minus_alphas_cumprod, expected["sqrt_one_minus_alphas_cumprod"])


def test_schedule_buffers_load_back():
    source = tiny_ddpm(beta_schedule="cosine")
    target = tiny_ddpm(beta_schedule="linear")
    assert not torch.equal(source.betas, target.betas)
    result = target.load_state_dict(source.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for name in NoiseSchedule.BUFFER_NAMES:
        assert torch.equal(getattr(target, name), getattr(source, name)), name
    # A reference-style checkpoint with the schedule keys missing is refused by name.
    incomplete = {k: v for k, v in source.state_dict().items() if k != "posterior_mean_coef2"}
    with pytest.raises(RuntimeError, match="posterior_mean_coef2"):
        target.load_state_dict(incomplete, strict=True)


# ------------------------------------------------------------------------------------ losses


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_overfits_one_batch(parameterization):
    torch.manual_seed(0)
    model = tiny_ddpm(parameterization=parameterization)
    x = pixel_batch()
    t = torch.tensor([0, 5, 10, 15])
    noise = torch.randn_like(x)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def loss_simple() -> float:
        with torch.no_grad():
            return float(model.p_losses(x, None, t, noise)[1]["train/loss_simple"])

    start = loss_simple()
    for _ in range(60):
        optimizer.zero_grad()
        loss, _ = model.p_losses(x, None, t, noise)
        loss.backward()
        optimizer.step()
    # A tiny U-Net memorises 4 fixed examples quickly: the loss drops by orders of magnitude (to ~1e-3x).
    assert loss_simple() < 0.05 * start


def test_elbo_term_uses_vlb_weights():
    torch.manual_seed(0)
    model = tiny_ddpm(original_elbo_weight=0.5, linear_start=1e-3, linear_end=0.2)
    perturb_(model.model)
    x, t = pixel_batch(), torch.tensor([0, 1, 7, 15])
    noise = torch.randn_like(x)
    with torch.no_grad():
        loss, log = model.p_losses(x, None, t, noise)

    # Directly from the β schedule in float64: x_t (DDPM eq. 4) and the ε weight of L_{t-1} (eq. 12),
    # β_t² / (2 σ_t² α_t (1 − ᾱ_t)) with σ_t² = β̃_t; entry 0 (σ_0² = 0) takes entry 1's value.
    betas = model.betas.double()
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    sigma2 = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
    weights = betas ** 2 / (2 * sigma2 * (1 - betas) * (1 - alphas_cumprod))
    weights[0] = weights[1]
    assert torch.allclose(model.lvlb_weights.double(), weights, rtol=1e-5)
    x_t = (alphas_cumprod[t].sqrt()[:, None, None, None] * x.double()
           + (1 - alphas_cumprod[t]).sqrt()[:, None, None, None] * noise.double()).float()
    with torch.no_grad():
        squared_error = (model.apply_model(x_t, t) - noise).pow(2).flatten(1).mean(1).double()
    loss_vlb = (weights[t] * squared_error).mean()
    assert float(log["train/loss_vlb"]) == pytest.approx(float(loss_vlb), rel=1e-4)
    assert float(loss) == pytest.approx(float(squared_error.mean() + 0.5 * loss_vlb), rel=1e-4)
    assert float(log["train/loss_simple"]) == pytest.approx(float(squared_error.mean()), rel=1e-4)


def test_learned_logvar_reweights_the_loss():
    torch.manual_seed(0)
    model = tiny_ddpm(learn_logvar=True, logvar_init=0.0)
    assert "logvar" in model.state_dict() and "logvar" in dict(model.named_parameters())
    assert any(p is model.logvar for p in model.trainable_parameters())
    with torch.no_grad():
        model.logvar.copy_(torch.linspace(-1.0, 1.0, TIMESTEPS))
    perturb_(model.model)
    x, t = pixel_batch(), torch.tensor([0, 3, 3, 12])
    noise = torch.randn_like(x)
    loss, log = model.p_losses(x, None, t, noise)
    x_t = model.q_sample(x, t, noise)
    per_sample = (model.apply_model(x_t, t) - noise).pow(2).flatten(1).mean(1)
    logvar_t = model.logvar[t]
    expected = (per_sample / logvar_t.exp() + logvar_t).mean()
    assert torch.allclose(loss, expected, rtol=1e-5)
    assert torch.allclose(log["train/loss_gamma"], expected, rtol=1e-5)
    loss.backward()
    touched = model.logvar.grad != 0
    assert touched.tolist() == [i in (0, 3, 12) for i in range(TIMESTEPS)]
    # Without learn_logvar the weighting is the identity and logvar is no checkpoint key.
    plain = tiny_ddpm()
    assert "logvar" not in plain.state_dict() and not plain.logvar.any()


def test_configure_optimizers_steps_the_configured_schedule():
    scheduler_config = {"target": "ldm.lr_scheduler.LambdaLinearScheduler",
                        "params": {"warm_up_steps": [4], "f_min": [1.0], "f_max": [1.0], "f_start": [0.0],
                                   "cycle_lengths": [1000]}}
    model = tiny_ddpm(learn_logvar=True, scheduler_config=scheduler_config)
    model.learning_rate = 1e-3
    (optimizer,), (scheduler,) = model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.model.parameters())) + 1
    assert scheduler["interval"] == "step"
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler["scheduler"].step()
    assert lrs == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])


def test_weight_decay_reaches_the_optimizer():
    model = tiny_ddpm()
    model.learning_rate = 1e-3
    assert model.configure_optimizers().param_groups[0]["weight_decay"] == 0.01  # AdamW's default, as before
    model = tiny_ddpm(weight_decay=0.1)
    model.learning_rate = 1e-3
    assert model.configure_optimizers().param_groups[0]["weight_decay"] == 0.1
    with pytest.raises(ValueError, match="weight_decay"):
        tiny_ddpm(weight_decay=-1.0)


# ------------------------------------------------------------------------------------ condition dropout


def test_condition_dropout_rate_and_values():
    n, p = 20_000, 0.3
    generator = torch.Generator().manual_seed(0)
    captions = [f"caption {i}" for i in range(n)]
    labels = torch.randint(0, 10, (n,), generator=generator)
    batch = {"caption": list(captions), "class_label": labels.clone(), "image": torch.zeros(n, 2)}
    out = drop_conditions(batch, {"caption": {"p": p, "val": ""}, "class_label": {"p": p, "val": 10}},
                          generator=generator)
    sigma = (p * (1 - p) / n) ** 0.5
    dropped_captions = [c == "" for c in out["caption"]]
    assert abs(np.mean(dropped_captions) - p) < 4 * sigma
    assert all(new == old for new, old, d in zip(out["caption"], captions, dropped_captions) if not d)
    dropped_labels = out["class_label"] == 10
    assert abs(dropped_labels.float().mean().item() - p) < 4 * sigma
    assert torch.equal(out["class_label"][~dropped_labels], labels[~dropped_labels])
    # Independent per key: the two drop masks are not the same draw.
    assert dropped_labels.tolist() != dropped_captions
    assert torch.equal(out["image"], torch.zeros(n, 2))


def test_condition_dropout_errors():
    with pytest.raises(KeyError, match="'txt'.*cond_stage_key"):
        drop_conditions({"caption": ["a"]}, {"txt": {"p": 0.1, "val": ""}})
    with pytest.raises(ValueError, match="probability"):
        drop_conditions({"caption": ["a"]}, {"caption": {"p": 1.5, "val": ""}})


def test_condition_dropout_only_while_training():
    model = load_tiny_txt2img(["model.params.ucg_training.caption.p=1.0"])
    batch = image_batch()
    model.eval()
    assert model.prepare_batch(batch)["caption"] == batch["caption"]
    model.train()
    assert model.prepare_batch(batch)["caption"] == ["", ""]


# ------------------------------------------------------------------------------------ guidance


def test_guided_model_combines_conditional_and_unconditional_calls():
    torch.manual_seed(0)
    model = tiny_ddpm(unet_config=cross_attention_unet(), conditioning_key="crossattn")
    perturb_(model.model)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 11])
    cond, uncond = torch.randn(2, 5, 16), torch.zeros(2, 5, 16)
    with torch.no_grad():
        out_cond = model.apply_model(x, t, cond)
        out_uncond = model.apply_model(x, t, uncond)
        assert torch.equal(guided_model(model.apply_model, cond, uncond, 1.0)(x, t), out_cond)
        assert torch.equal(guided_model(model.apply_model, cond, None, 5.0)(x, t), out_cond)
        guided = guided_model(model.apply_model, cond, uncond, 4.0)(x, t)
        assert (out_cond - out_uncond).abs().max() > 1e-2  # the condition matters
        torch.testing.assert_close(guided, out_uncond + 4.0 * (out_cond - out_uncond), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.sigma_denoiser(cond, uncond, 4.0).model_fn(x, t), guided, atol=0, rtol=0)


# ------------------------------------------------------------------------------------ EMA


def test_ema_scope_swaps_weights_and_restores_them():
    torch.manual_seed(0)
    model = tiny_ddpm(use_ema=True, ema_decay=0.5)
    optimizer = torch.optim.SGD(model.model.parameters(), lr=0.5)
    x = pixel_batch()
    for _ in range(3):
        optimizer.zero_grad()
        model(x)[0].backward()
        optimizer.step()
        model.on_train_batch_end()
    trained = {k: v.clone() for k, v in model.model.named_parameters()}
    shadows = dict(model.model_ema.named_buffers())
    averaged = {k: shadows[s].clone() for k, s in model.model_ema.m_name2s_name.items()}
    assert any(not torch.equal(trained[k], averaged[k]) for k in trained)

    with model.ema_scope("test"):
        for k, v in model.model.named_parameters():
            assert torch.equal(v, averaged[k]), k
    for k, v in model.model.named_parameters():
        assert torch.equal(v, trained[k]), k

    with pytest.raises(RuntimeError, match="inside the scope"):
        with model.ema_scope():
            raise RuntimeError("inside the scope")
    for k, v in model.model.named_parameters():
        assert torch.equal(v, trained[k]), k


# ------------------------------------------------------------------------------------ latent scaling


def test_scale_by_std_measures_first_batch_and_is_kept_from_checkpoint(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = load_tiny_txt2img()
    assert model.scale_by_std and float(model.scale_factor) == 1.0
    batch = image_batch()
    torch.manual_seed(1)
    model.on_train_batch_start(batch, 0)
    torch.manual_seed(1)  # the same posterior sample
    x = batch["image"].permute(0, 3, 1, 2)
    z = model.first_stage_model.encode(x).sample()
    measured = float(model.scale_factor)
    assert measured == pytest.approx(1.0 / float(z.flatten().std()), rel=1e-5)
    assert measured != 1.0
    assert float(model.state_dict()["scale_factor"]) == measured

    # A model initialised from that checkpoint keeps it on its first batch.
    ckpt = tmp_path / "ldm.ckpt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    restarted = load_tiny_txt2img([f"model.params.ckpt_path={ckpt}"])
    assert restarted.restarted_from_ckpt and float(restarted.scale_factor) == measured
    restarted.on_train_batch_start(image_batch(seed=5), 0)
    assert float(restarted.scale_factor) == measured

    # A resumed run (Lightning restores the weights, then continues at its global step) keeps it too.
    resumed = load_tiny_txt2img()
    resumed.load_state_dict(model.state_dict())
    monkeypatch.setattr(LatentDiffusion, "global_step", property(lambda self: 7))
    resumed.on_train_batch_start(image_batch(seed=5), 0)
    assert float(resumed.scale_factor) == measured


def test_short_lightning_run_measures_scale_and_logs(tmp_path):
    torch.manual_seed(0)
    model = load_tiny_txt2img()
    model.learning_rate = 1e-4
    examples = [{"image": image, "caption": caption}
                for image, caption in zip(image_batch(4)["image"], image_batch(4)["caption"])]
    loader = torch.utils.data.DataLoader(examples, batch_size=2)
    trainer = pl.Trainer(max_steps=2, limit_val_batches=1, num_sanity_val_steps=0, log_every_n_steps=1,
                         logger=CSVLogger(tmp_path), enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(model, loader, loader)
    assert float(model.scale_factor) != 1.0
    assert int(model.model_ema.num_updates) == 2
    metrics = trainer.callback_metrics
    assert {"train/loss_simple_step", "val/loss_simple", "val/loss_simple_ema"} <= set(metrics)
    assert all(torch.isfinite(metrics[k]) for k in ("val/loss", "val/loss_ema"))


def test_scale_by_std_refuses_a_custom_scale_factor():
    model = load_tiny_txt2img(["model.params.scale_factor=0.5"])
    with pytest.raises(ValueError, match="scale_factor"):
        model.on_train_batch_start(image_batch(), 0)


def test_decode_first_stage_multiplies_by_reciprocal_scale(monkeypatch):
    scale = 0.18215
    model = load_tiny_txt2img(["model.params.scale_by_std=false", f"model.params.scale_factor={scale}"])
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    # The two ways of unscaling differ in the last bit for some entries; the reference multiplies.
    assert not torch.equal(z / scale, 1.0 / scale * z)
    seen = []
    decode = model.first_stage_model.decode
    monkeypatch.setattr(model.first_stage_model, "decode", lambda latent: seen.append(latent) or decode(latent))
    decoded = model.decode_first_stage(z)
    assert torch.equal(seen[0], 1.0 / scale * z)
    assert decoded.shape == (2, 3, 32, 32)
    # Encoding multiplies by scale_factor: z = scale · (a posterior sample).
    x = image_batch()["image"].permute(0, 3, 1, 2)
    torch.manual_seed(3)
    encoded = model.get_first_stage_encoding(model.encode_first_stage(x))
    torch.manual_seed(3)
    assert torch.equal(encoded, scale * model.first_stage_model.encode(x).sample())


# ------------------------------------------------------------------------------------ conditioning


def test_learned_conditioning_for_captions():
    model = load_tiny_txt2img()
    captions = ["a red square", "a blue circle"]
    with torch.no_grad():
        c = model.get_learned_conditioning(captions)
        assert c.shape == (2, 77, 32)
        torch.testing.assert_close(c, model.cond_stage_model(captions), atol=0, rtol=0)
    assert (c[0] - c[1]).abs().max() > 0
    # The encoder is trained jointly, so get_input leaves captions raw unless asked to encode them.
    z, raw = model.get_input(image_batch(), "image")
    assert z.shape == (2, 4, 8, 8) and raw == image_batch()["caption"]
    _, encoded = model.get_input(image_batch(), "image", force_c_encode=True)
    assert encoded.shape == (2, 77, 32)


def test_learned_conditioning_for_class_labels():
    model = tiny_class_conditional_ldm()
    labels = torch.tensor([3, 10])
    c = model.get_learned_conditioning(labels)
    assert c.shape == (2, 1, 32)
    assert torch.equal(c, model.cond_stage_model.embedding.weight[labels][:, None])
    batch = {"image": image_batch()["image"], "class_label": torch.tensor([1, 2])}
    _, encoded = model.get_input(batch, "image", force_c_encode=True)
    assert torch.equal(encoded, model.cond_stage_model.embedding.weight[[1, 2]][:, None])
    # Training drops labels to the null class (index 10) at the configured rate.
    model.train()
    dropped = model.prepare_batch({"image": batch["image"], "class_label": torch.full((2000,), 4)})
    assert set(dropped["class_label"].unique().tolist()) == {4, 10}


@pytest.mark.parametrize("conditioning_key", ["concat", "hybrid", "adm", "crossattn"])
def test_conditioning_keys_route_conditions_to_the_unet(conditioning_key):
    torch.manual_seed(0)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([2, 9])
    image_cond, context = torch.randn(2, 2, 8, 8), torch.randn(2, 5, 16)
    labels = torch.tensor([1, 7])
    # (U-Net, condition as the model takes it, the U-Net call that the condition should turn into)
    cases = {
        "concat": (tiny_unet(in_channels=5), image_cond,
                   lambda net: net(torch.cat([x, image_cond], 1), t)),
        "hybrid": (cross_attention_unet(in_channels=5), {"c_concat": [image_cond], "c_crossattn": [context]},
                   lambda net: net(torch.cat([x, image_cond], 1), t, context=context)),
        "adm": (tiny_unet(num_classes=10), labels, lambda net: net(x, t, y=labels)),
        "crossattn": (cross_attention_unet(), context, lambda net: net(x, t, context=context)),
    }
    unet, cond, direct_call = cases[conditioning_key]
    model = tiny_ddpm(unet_config=unet, conditioning_key=conditioning_key)
    perturb_(model.model)
    with torch.no_grad():
        expected = direct_call(model.model.diffusion_model)
        torch.testing.assert_close(model.apply_model(x, t, cond), expected, atol=0, rtol=0)
    loss, _ = model.p_losses(x, cond, t)
    loss.backward()
    assert torch.isfinite(loss)


def test_unknown_conditioning_key_is_refused():
    with pytest.raises(ValueError, match="unknown conditioning_key 'cross'.*crossattn"):
        tiny_ddpm(conditioning_key="cross")


# ------------------------------------------------------------------------------------ images


def assert_images(log: dict, keys: set) -> None:
    assert set(log) == keys
    for key, images in log.items():
        assert images.dim() == 4 and images.shape[1] == 3, key
        assert torch.isfinite(images).all() and images.min() >= -1.0 and images.max() <= 1.0, key


def test_log_images_of_latent_diffusion():
    torch.manual_seed(0)
    model = load_tiny_txt2img()
    model.eval()
    log = log_images(model, image_batch(), N=2, n_row=2)
    assert_images(log, {"inputs", "reconstruction", "conditioning", "diffusion_row", "samples", "denoise_row",
                        "samples_cfg_scale_3.00"})
    assert log["samples"].shape == (2, 3, 32, 32)
    only = log_images(model, image_batch(), N=2, sample=False, return_keys=["inputs", "diffusion_row"])
    assert set(only) == {"inputs", "diffusion_row"}


def test_log_images_of_pixel_ddpm():
    torch.manual_seed(0)
    model = tiny_ddpm(use_ema=True)
    batch = {"image": pixel_batch(2).permute(0, 2, 3, 1)}
    log = log_images(model, batch, N=2, n_row=2)
    assert_images(log, {"inputs", "diffusion_row", "samples", "denoise_row"})


# ------------------------------------------------------------------------------------ likelihood


def test_bits_per_dim_of_pixel_ddpm_uses_discretized_decoder():
    torch.manual_seed(0)
    model = tiny_ddpm(linear_start=1e-3, linear_end=0.2)
    assert model.data_is_pixels
    x = pixel_batch(2)
    torch.manual_seed(1)
    bpd = model.bits_per_dim(x)
    for key in ("total_bpd", "prior_bpd", "vb_bpd", "decoder_bpd"):
        assert bpd[key].shape == (2,) and torch.isfinite(bpd[key]).all(), key
    assert (bpd["total_bpd"] > 0).all() and (bpd["decoder_bpd"] > 0).all()
    torch.testing.assert_close(bpd["total_bpd"], bpd["prior_bpd"] + bpd["vb_bpd"] + bpd["decoder_bpd"])

    def model_fn(x_t, t):
        return model.apply_model(x_t, t)

    with torch.no_grad():
        torch.manual_seed(1)
        discrete = variational_bound(model_fn, model.schedule, x, "eps", discretized=True)
        torch.manual_seed(1)
        continuous = variational_bound(model_fn, model.schedule, x, "eps", discretized=False)
    torch.testing.assert_close(bpd["decoder_bpd"], discrete["decoder_bpd"], atol=0, rtol=0)
    assert not torch.allclose(bpd["decoder_bpd"], continuous["decoder_bpd"])


def test_latents_are_not_pixels():
    assert not load_tiny_txt2img().data_is_pixels


def test_latent_diffusion_on_identity_first_stage_is_pixel_space():
    """LatentDiffusion with IdentityFirstStage (scale 1) is a pixel model: images in, discretized L_0."""
    model = LatentDiffusion(
        first_stage_config={"target": "ldm.models.autoencoder.IdentityFirstStage"},
        cond_stage_config="__is_unconditional__", unet_config=tiny_unet(), timesteps=TIMESTEPS,
        image_size=8, channels=3, use_ema=False)
    x = pixel_batch(2)
    z, c = model.get_input({"image": x.permute(0, 2, 3, 1)}, "image")
    assert c is None and torch.equal(z, x)
    assert model.data_is_pixels
    torch.manual_seed(0)
    bpd = model.bits_per_dim(x, timesteps=[1, 5, 10])
    assert torch.isfinite(bpd["total_bpd"]).all() and (bpd["decoder_bpd"] > 0).all()


# ------------------------------------------------------------------------------------ first stage


def test_missing_first_stage_checkpoint_names_the_commands(tmp_path):
    ckpt = tmp_path / "first_stage_models" / "kl-tiny" / "model.ckpt"
    with pytest.raises(FileNotFoundError) as error:
        load_tiny_txt2img([f"model.params.first_stage_config.params.ckpt_path={ckpt}"])
    message = str(error.value)
    assert str(ckpt) in message
    assert "python main.py --base" in message and " -t" in message
    assert f"scripts/export_weights.py logs/<that run>/checkpoints/last.ckpt -o {ckpt}" in message
    # With the first stage's training config beside the missing file, the message names that recipe.
    ckpt.parent.mkdir(parents=True)
    (ckpt.parent / "config.yaml").write_text("model: {}\n")
    with pytest.raises(FileNotFoundError, match=f"main.py --base {ckpt.parent / 'config.yaml'} -t"):
        load_tiny_txt2img([f"model.params.first_stage_config.params.ckpt_path={ckpt}"])


def test_ignoring_a_checkpoints_ema_restarts_it_from_the_loaded_weights(tmp_path):
    source = load_tiny_txt2img()
    with torch.no_grad():
        for param in source.model.parameters():
            param.add_(1.0)  # the trained weights now differ from their average
    path = tmp_path / "run.ckpt"
    torch.save({"state_dict": source.state_dict()}, path)
    continued = load_tiny_txt2img([f"model.params.ckpt_path={path}"])
    assert int(continued.model_ema.num_updates) == int(source.model_ema.num_updates)
    restarted = load_tiny_txt2img([f"model.params.ckpt_path={path}", "model.params.ignore_keys=[model_ema.]"])
    assert int(restarted.model_ema.num_updates) == 0
    for model, average_is_raw in ((continued, False), (restarted, True)):
        with model.ema_scope():
            same = [torch.equal(p, source.model.get_parameter(n)) for n, p in model.model.named_parameters()]
        assert all(same) if average_is_raw else not any(same)


def test_starting_from_an_export_starts_the_ema_from_its_weights(tmp_path):
    # An export (a model directory's weights) has the EMA folded into model.* and no model_ema.* keys.
    source = load_tiny_txt2img()
    export = {k: v for k, v in source.state_dict().items() if not k.startswith("model_ema.")}
    path = tmp_path / "export.safetensors"
    save_safetensors(export, path)
    started = load_tiny_txt2img([f"model.params.ckpt_path={path}"])
    with started.ema_scope():  # the EMA weights, swapped in
        for name, param in started.model.named_parameters():
            assert torch.equal(param, export[f"model.{name}"]), name
