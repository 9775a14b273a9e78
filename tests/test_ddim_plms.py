"""DDIM and PLMS samplers: the reference's trajectories (`ddim_small`, `plms_small`), spacing, guidance,
eta noise, inpainting masks, other parameterizations, img2img and device handling, on the small
reference LatentDiffusion (16x16 latents, ~0.03 s per guided step)."""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ldm.checkpoint import load_weights
from ldm.models.diffusion.ddim import DDIMSampler, dynamic_threshold_x0
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.models.diffusion.plms import PLMSSampler
from ldm.models.diffusion.spacing import ddim_alphas, make_ddim_timesteps
from ldm.modules.diffusionmodules.denoiser import make_prediction

SHAPE = (4, 16, 16)


def load_fixture(reference_dir, name):
    path = reference_dir / f"{name}.safetensors"
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    weights = {k[len("weights."):]: v for k, v in tensors.items() if k.startswith("weights.")}
    data = {k: v for k, v in tensors.items() if not k.startswith("weights.")}
    return json.loads(metadata["config"]), weights, data


@pytest.fixture(scope="module")
def model(reference_dir):
    """The reference's fixture model: unet_small + autoencoder_kl_small, linear schedule, crossattn."""
    torch.set_num_threads(1)
    unet_config, unet_weights, _ = load_fixture(reference_dir, "unet_small")
    kl_config, kl_weights, _ = load_fixture(reference_dir, "autoencoder_kl_small")
    ldm = LatentDiffusion(
        first_stage_config={"target": "ldm.models.autoencoder.AutoencoderKL",
                            "params": {**kl_config, "lossconfig": {"target": "torch.nn.Identity"}}},
        # Any cond stage keeps conditioning_key (only '__is_unconditional__' would drop it).
        cond_stage_config={"target": "torch.nn.Identity"}, conditioning_key="crossattn", scale_factor=0.18215,
        unet_config={"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet_config},
        timesteps=1000, beta_schedule="linear", linear_start=0.00085, linear_end=0.012, use_ema=False,
        monitor=None, image_size=16, channels=4).eval()
    load_weights(ldm.model.diffusion_model, unet_weights, strict=True)
    load_weights(ldm.first_stage_model, kl_weights, strict=True)
    return ldm


@pytest.fixture(scope="module")
def inputs(reference_dir):
    _, _, data = load_fixture(reference_dir, "ddim_small")
    return {k: data[k] for k in ("x_T", "context", "uc")}


class Reparameterized:
    """The eps model seen as an x0- or v-model: its output converted exactly (a stand-in for such a model)."""

    def __init__(self, eps_model, parameterization):
        self.eps_model, self.prediction = eps_model, make_prediction(parameterization)
        self.schedule, self.num_timesteps = eps_model.schedule, eps_model.num_timesteps

    def apply_model(self, x, t, cond):
        eps = self.eps_model.apply_model(x, t, cond)
        coefficients = self.schedule.coefficients(t)
        return self.prediction.output_from_x0(make_prediction("eps").x0(eps, x, *coefficients), x, *coefficients)


def run(sampler, inputs, S=10, scale=3.0, **kwargs):
    kwargs.setdefault("x_T", inputs["x_T"])
    return sampler.sample(S=S, batch_size=2, shape=SHAPE, conditioning=inputs["context"],
                          unconditional_guidance_scale=scale, unconditional_conditioning=inputs["uc"],
                          verbose=False, **kwargs)


# ---------------------------------------------------------------------------------------- spacing


def test_uniform_spacing_can_give_more_steps_than_asked():
    np.testing.assert_array_equal(make_ddim_timesteps("uniform", 10, 1000), np.arange(1, 1000, 100))
    assert make_ddim_timesteps("uniform", 7, 1000).tolist() == [1 + 142 * i for i in range(8)]
    assert len(make_ddim_timesteps("uniform", 6, 1000)) == 7
    assert make_ddim_timesteps("uniform", 500, 1000).tolist() == list(range(1, 1000, 2))
    # S=3 would give 4 steps, the last at t=1000: past the schedule (the reference's IndexError).
    with pytest.raises(ValueError, match=r"visit t=1000, past the last timestep 999; .* e\.g\. 2"):
        make_ddim_timesteps("uniform", 3, 1000)
    with pytest.raises(ValueError, match="e.g. 500"):
        make_ddim_timesteps("uniform", 1000, 1000)


def test_quad_spacing_and_bad_input():
    expected = (np.linspace(0, np.sqrt(800), 10) ** 2).astype(int) + 1
    np.testing.assert_array_equal(make_ddim_timesteps("quad", 10, 1000), expected)
    assert expected[0] == 1 and expected[-1] == 801
    with pytest.raises(ValueError, match="ddim_discretize"):
        make_ddim_timesteps("cubic", 10, 1000)
    with pytest.raises(ValueError, match="1..1000"):
        make_ddim_timesteps("uniform", 1001, 1000)
    with pytest.raises(TypeError, match="int"):
        make_ddim_timesteps("uniform", 10.0, 1000)


def test_ddim_alphas_and_sigma_formula(model):
    ac = model.schedule.alphas_cumprod
    steps = make_ddim_timesteps("uniform", 4, 1000)  # 1, 251, 501, 751
    sigmas, alphas, alphas_prev = ddim_alphas(ac, steps, eta=0.7)
    torch.testing.assert_close(alphas, ac[[1, 251, 501, 751]], rtol=0, atol=0)
    torch.testing.assert_close(alphas_prev, ac[[0, 1, 251, 501]], rtol=0, atol=0)
    expected = 0.7 * torch.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    torch.testing.assert_close(sigmas, expected)
    # eta = 1 between consecutive DDPM steps is DDPM's posterior variance (DDIM eq. 16).
    sampler = DDIMSampler(model)
    sampler.make_schedule(10, ddim_eta=1.0, verbose=False)
    torch.testing.assert_close(sampler.ddim_sigmas_for_original_num_steps[1:] ** 2,
                               model.schedule.posterior_variance[1:], rtol=1e-4, atol=1e-9)
    with pytest.raises(ValueError, match="eta"):
        ddim_alphas(ac, steps, eta=-0.1)


# ---------------------------------------------------------------------------------------- reference runs


@pytest.mark.parametrize("sampler_cls, name", [(DDIMSampler, "ddim_small"), (PLMSSampler, "plms_small")])
def test_reproduces_reference_trajectory(model, reference_dir, sampler_cls, name):
    _, _, ref = load_fixture(reference_dir, name)
    sampler = sampler_cls(model)
    seen_t, callbacks = [], []
    apply_model = model.apply_model

    def spy(x, t, cond):
        seen_t.append(t)
        return apply_model(x, t, cond)

    model.apply_model = spy
    try:
        samples, inter = run(sampler, ref, log_every_t=1, callback=lambda i: callbacks.append(("step", i)),
                             img_callback=lambda x0, i: callbacks.append((x0, i)))
    finally:
        del model.apply_model
    assert torch.equal(torch.from_numpy(sampler.ddim_timesteps[::-1].copy()), ref["timesteps"])
    for key in ("ddim_alphas", "ddim_alphas_prev", "ddim_sigmas"):
        torch.testing.assert_close(getattr(sampler, key), ref[key], rtol=1e-6, atol=0)
    # One guided batch per model call: t is the shifted step, twice (uncond half, cond half), as int64.
    assert seen_t[0].dtype == torch.int64 and seen_t[0].tolist() == [901] * 4 and seen_t[-1].tolist() == [1] * 4
    assert len(seen_t) == (10 if name == "ddim_small" else 11)  # PLMS's first step makes two calls
    assert torch.equal(inter["x_inter"][0], ref["x_T"]) and len(inter["x_inter"]) == 11
    torch.testing.assert_close(torch.stack(inter["x_inter"][1:]), ref["x_steps"], atol=1e-3, rtol=0)
    torch.testing.assert_close(torch.stack(inter["pred_x0"][1:]), ref["pred_x0_steps"], atol=1e-3, rtol=0)
    torch.testing.assert_close(samples, ref["x_0"], atol=1e-3, rtol=0)
    torch.testing.assert_close(model.decode_first_stage(samples), ref["x_0_decoded"], atol=1e-4, rtol=0)
    assert [c[1] for c in callbacks] == [i for i in range(10) for _ in (0, 1)]
    assert all(c[0] is inter["pred_x0"][1 + c[1]] for c in callbacks if c[0] != "step")


def test_log_every_t_keeps_first_and_every_kth_step(model, inputs):
    _, inter = run(DDIMSampler(model), inputs, S=10, log_every_t=4)
    # x_T, then step indices 9 (the first), 8, 4 and 0 counted down.
    assert len(inter["x_inter"]) == len(inter["pred_x0"]) == 5


# ---------------------------------------------------------------------------------------- guidance, eta


def test_guidance_scale_one_is_the_plain_conditional_run(model, inputs):
    sampler = DDIMSampler(model)
    plain, _ = run(sampler, {**inputs, "uc": None}, S=4)
    scale_one, _ = run(sampler, inputs, S=4, scale=1.0)
    guided, _ = run(sampler, inputs, S=4, scale=3.0)
    assert torch.equal(plain, scale_one)
    assert (plain - guided).abs().max() > 0.1


def test_eta_adds_noise_with_the_ddim_sigma(model, inputs):
    sampler = DDIMSampler(model)
    torch.manual_seed(0)
    _, inter = run(sampler, inputs, S=2, eta=0.8, log_every_t=1)  # steps 501 then 1
    ac = model.schedule.alphas_cumprod
    a_t, a_prev = ac[501], ac[1]
    sigma = 0.8 * torch.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    torch.testing.assert_close(sampler.ddim_sigmas[1], sigma)
    x_t, x_prev, pred_x0 = inputs["x_T"], inter["x_inter"][1], inter["pred_x0"][1]
    eps = (x_t - a_t.sqrt() * pred_x0) / (1 - a_t).sqrt()
    residual = x_prev - a_prev.sqrt() * pred_x0 - (1 - a_prev - sigma ** 2).sqrt() * eps
    assert abs(residual.std() / sigma - 1) < 0.08 and abs(residual.mean()) < 0.1 * sigma
    # Temperature 0 removes the noise and leaves the deterministic part.
    _, inter0 = run(sampler, inputs, S=2, eta=0.8, temperature=0.0, log_every_t=1)
    expected = a_prev.sqrt() * inter0["pred_x0"][1] + (1 - a_prev - sigma ** 2).sqrt() * eps
    torch.testing.assert_close(inter0["x_inter"][1], expected, atol=1e-4, rtol=0)


def test_plms_refuses_eta_and_unsupported_options_raise(model, inputs):
    with pytest.raises(ValueError, match="eta must be 0"):
        run(PLMSSampler(model), inputs, S=4, eta=0.5)
    sampler = DDIMSampler(model)
    for option in ({"quantize_x0": True}, {"score_corrector": object()}, {"corrector_kwargs": {}},
                   {"normals_sequence": [torch.zeros(1)]}):
        with pytest.raises(ValueError, match=f"{next(iter(option))} is not supported"):
            run(sampler, inputs, S=4, **option)
    with pytest.raises(ValueError, match="needs both mask"):
        run(sampler, inputs, S=4, x0=inputs["x_T"])
    with pytest.raises(ValueError, match="x_T has shape"):
        run(sampler, inputs, S=4, x_T=inputs["x_T"][:1])
    with pytest.raises(ValueError, match="conditionings for batch_size"):
        sampler.sample(S=4, batch_size=3, shape=SHAPE, conditioning=inputs["context"], verbose=False)
    with pytest.raises(TypeError, match="quantize_denoised"):
        run(sampler, inputs, S=4, quantize_denoised=True)


# ---------------------------------------------------------------------------------------- inpainting


def test_mask_marks_the_known_region(model, inputs):
    sampler = DDIMSampler(model)
    known = torch.full((2, *SHAPE), 2.0)
    mask = torch.zeros(2, 1, 16, 16)
    mask[..., :8] = 1.0  # left half known
    seen = []
    apply_model = model.apply_model
    model.apply_model = lambda x, t, cond: seen.append(x.clone()) or apply_model(x, t, cond)
    try:
        torch.manual_seed(1)
        exact, _ = run(sampler, inputs, S=5, mask=mask, x0=known)
    finally:
        del model.apply_model
    torch.manual_seed(1)
    approximate, _ = run(sampler, inputs, S=5, mask=mask, x0=known, keep_known_exact=False)
    assert torch.equal(exact[..., :8], known[..., :8])
    assert not torch.equal(approximate[..., :8], known[..., :8])
    assert torch.equal(exact[..., 8:], approximate[..., 8:])
    # Before the step at t the model sees q_sample(x0, t) in the known region: √ᾱ_t·x0 + √(1−ᾱ_t)·noise.
    for t, model_input in zip(sampler.ddim_timesteps[::-1], seen):
        a_t = model.schedule.alphas_cumprod[int(t)]
        residual = model_input[2:] - a_t.sqrt() * known  # the conditional half of the guided batch
        assert abs(residual[..., :8].mean()) < 0.1 * (1 - a_t).sqrt()
        assert abs(residual[..., :8].std() / (1 - a_t).sqrt() - 1) < 0.1
    assert (residual[..., 8:].abs().mean()) > 10 * (1 - a_t).sqrt()


# ---------------------------------------------------------------------------------------- parameterizations


@pytest.mark.parametrize("sampler_cls", [DDIMSampler, PLMSSampler])
@pytest.mark.parametrize("parameterization", ["x0", "v"])
def test_x0_and_v_models_follow_the_eps_trajectory(model, inputs, sampler_cls, parameterization):
    eps_samples, eps_inter = run(sampler_cls(model), inputs, S=5, log_every_t=1)
    samples, inter = run(sampler_cls(Reparameterized(model, parameterization)), inputs, S=5, log_every_t=1)
    for ours, theirs in zip(inter["x_inter"], eps_inter["x_inter"]):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(samples, eps_samples, atol=1e-4, rtol=1e-5)


def test_clipping_and_dynamic_thresholding(model, inputs):
    sampler = DDIMSampler(model)
    plain, plain_inter = run(sampler, inputs, S=4, log_every_t=1)
    for options in ({"clip_denoised": True}, {"dynamic_threshold": 0.9}):
        samples, inter = run(sampler, inputs, S=4, log_every_t=1, **options)
        assert all(x0.abs().max() <= 1.0 for x0 in inter["pred_x0"][1:])
        assert (samples - plain).abs().max() > 0.1
    assert max(x0.abs().max() for x0 in plain_inter["pred_x0"][1:]) > 1.0
    # ε̂ is re-derived from the clipped x̂0, so the pair still reconstructs x_t (DDIM eq. 12 at η = 0).
    _, inter = run(sampler, inputs, S=2, log_every_t=1, clip_denoised=True)  # first step: 501 -> 1
    a_t, a_prev = model.schedule.alphas_cumprod[501], model.schedule.alphas_cumprod[1]
    x0 = inter["pred_x0"][1]
    eps = (inputs["x_T"] - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    torch.testing.assert_close(inter["x_inter"][1], a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps)
    values = torch.tensor([[0.5, -0.2, 0.1, 0.3], [4.0, -2.0, 1.0, 0.5]])
    # Row 0 is within [-1, 1]: s = 1, unchanged. Row 1: s = the 0.75 quantile of |x0| = 2.5.
    torch.testing.assert_close(dynamic_threshold_x0(values, 0.75),
                               torch.tensor([[0.5, -0.2, 0.1, 0.3], [1.0, -0.8, 0.4, 0.2]]))
    with pytest.raises(ValueError, match="quantile"):
        dynamic_threshold_x0(values, 99.5)


# ---------------------------------------------------------------------------------------- img2img, devices


def test_stochastic_encode_and_decode(model, inputs):
    sampler = DDIMSampler(model)
    with pytest.raises(RuntimeError, match="make_schedule"):
        sampler.stochastic_encode(inputs["x_T"], torch.tensor([3, 3]))
    reference, _ = run(sampler, inputs, S=10)
    # Decoding x_T through all steps is the sampling run itself.
    full = sampler.decode(inputs["x_T"], inputs["context"], t_start=10, unconditional_guidance_scale=3.0,
                          unconditional_conditioning=inputs["uc"])
    assert torch.equal(full, reference)
    x0, noise = torch.randn(2, *SHAPE), torch.randn(2, *SHAPE)
    encoded = sampler.stochastic_encode(x0, torch.tensor([4, 4]), noise=noise)
    a = sampler.ddim_alphas[4]
    torch.testing.assert_close(encoded, a.sqrt() * x0 + (1 - a).sqrt() * noise)
    original = sampler.stochastic_encode(x0, torch.tensor([250, 250]), use_original_steps=True, noise=noise)
    torch.testing.assert_close(original, model.schedule.q_sample(x0, torch.tensor([250, 250]), noise))
    decoded = sampler.decode(encoded, inputs["context"], t_start=4, unconditional_guidance_scale=3.0,
                             unconditional_conditioning=inputs["uc"])
    assert decoded.shape == x0.shape and torch.isfinite(decoded).all()
    assert torch.equal(sampler.decode(encoded, inputs["context"], t_start=0), encoded)
    with pytest.raises(ValueError, match="t_start"):
        sampler.decode(encoded, inputs["context"], t_start=11)


def test_nothing_needs_cuda(model, inputs, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for sampler in (DDIMSampler(model), PLMSSampler(model)):
        samples, _ = sampler.sample(S=2, batch_size=2, shape=SHAPE, conditioning=inputs["context"], verbose=False)
        tensors = [v for v in vars(sampler).values() if isinstance(v, torch.Tensor)]
        assert len(tensors) >= 5 and all(v.device.type == "cpu" for v in tensors)
        assert samples.device.type == "cpu" and samples.shape == (2, *SHAPE)
