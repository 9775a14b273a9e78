"""First-stage autoencoders against the CompVis reference: fixture outputs and released key lists."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ldm.checkpoint import CheckpointError, load_weights, save_safetensors
from ldm.models.autoencoder import AutoencoderKL, VQModel, VQModelInterface
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

IDENTITY_LOSS = {"target": "torch.nn.Identity"}


@pytest.fixture(autouse=True)
def _one_thread():
    # Two threads on a shared 2-core machine contend badly (100x slower); these models are tiny anyway.
    torch.set_num_threads(1)


def load_fixture(reference_dir, name):
    path = reference_dir / f"{name}.safetensors"
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["config"])
    weights = {k[len("weights."):]: v for k, v in tensors.items() if k.startswith("weights.")}
    data = {k: v for k, v in tensors.items() if not k.startswith("weights.")}
    return config, weights, data


@pytest.fixture(scope="module")
def kl_fixture(reference_dir):
    config, weights, data = load_fixture(reference_dir, "autoencoder_kl_small")
    model = AutoencoderKL(lossconfig=IDENTITY_LOSS, **config).eval()
    load_weights(model, weights, strict=True)
    return model, data


@pytest.fixture(scope="module")
def vq_fixture(reference_dir):
    config, weights, data = load_fixture(reference_dir, "vq_small")
    model = VQModel(lossconfig=IDENTITY_LOSS, **config).eval()
    load_weights(model, weights, strict=True)
    return model, data


@torch.no_grad()
def test_kl_small_posterior_and_decode_match_reference(kl_fixture):
    model, ref = kl_fixture
    moments = model.quant_conv(model.encoder(ref["image"]))
    torch.testing.assert_close(moments, ref["moments"], atol=2e-4, rtol=0)
    posterior = model.encode(ref["image"])
    torch.testing.assert_close(posterior.mean, ref["mean"], atol=1e-4, rtol=0)
    torch.testing.assert_close(posterior.logvar, ref["logvar"], atol=2e-4, rtol=0)
    torch.testing.assert_close(posterior.std, ref["std"], rtol=2e-5, atol=0)
    # The fixture pushes logvar past both clamp limits; the clamp must be exercised, not just pass.
    assert (posterior.logvar == 20.0).sum() > 0 and (posterior.logvar == -30.0).sum() > 0
    torch.testing.assert_close(model.decode(posterior.mode()), ref["decoded"], atol=1e-4, rtol=0)
    reconstruction, _ = model(ref["image"], sample_posterior=False)
    torch.testing.assert_close(reconstruction, ref["decoded"], atol=1e-4, rtol=0)


@torch.no_grad()
def test_vq_small_codes_and_decode_match_reference(vq_fixture):
    model, ref = vq_fixture
    prequant = model.encode_to_prequant(ref["image"])
    torch.testing.assert_close(prequant, ref["prequant"], atol=1e-4, rtol=0)
    quantized, emb_loss, (perplexity, min_encodings, indices) = model.encode(ref["image"])
    assert perplexity is None and min_encodings is None  # the reference's return convention
    assert indices.shape == (2 * 16 * 16,)  # flat, (b, h, w) order
    assert torch.equal(indices.reshape(2, 16, 16), ref["indices"])
    torch.testing.assert_close(quantized, ref["quantized"], atol=1e-5, rtol=0)
    torch.testing.assert_close(emb_loss, ref["emb_loss"], atol=1e-6, rtol=0)
    torch.testing.assert_close(model.decode(quantized), ref["decoded"], atol=1e-4, rtol=0)
    decoded, diff = model(ref["image"])
    torch.testing.assert_close(decoded, ref["decoded"], atol=1e-4, rtol=0)
    # The code path (fixed here; broken upstream) decodes the same image from the indices alone.
    torch.testing.assert_close(model.decode_code(ref["indices"]), ref["decoded"], atol=1e-4, rtol=0)


@torch.no_grad()
def test_vq_interface_encodes_prequant_and_quantizes_in_decode(reference_dir):
    config, weights, ref = load_fixture(reference_dir, "vq_small")
    model = VQModelInterface(lossconfig=IDENTITY_LOSS, **config).eval()
    load_weights(model, weights, strict=True)
    h = model.encode(ref["image"])
    torch.testing.assert_close(h, ref["prequant"], atol=1e-4, rtol=0)
    torch.testing.assert_close(model.decode(h), ref["decoded"], atol=1e-4, rtol=0)
    torch.testing.assert_close(model.decode(ref["quantized"], force_not_quantize=True), ref["decoded"],
                               atol=1e-4, rtol=0)
    assert not torch.allclose(model.decode(h, force_not_quantize=True), ref["decoded"], atol=1e-3)


def test_init_from_ckpt_loads_strictly_and_skips_training_state(reference_dir, tmp_path):
    config, weights, ref = load_fixture(reference_dir, "autoencoder_kl_small")
    # A training checkpoint also holds loss weights (LPIPS, discriminator) that an Identity loss lacks.
    path = save_safetensors({**weights, "loss.logvar": torch.zeros(()),
                             "loss.discriminator.main.0.weight": torch.zeros(1)}, tmp_path / "kl.safetensors")
    model = AutoencoderKL(lossconfig=IDENTITY_LOSS, ckpt_path=str(path), ema_decay=0.999, **config)
    for key, value in weights.items():
        assert torch.equal(model.state_dict()[key], value), key
    # Without EMA weights in the checkpoint, the EMA starts at the loaded weights, not the random init.
    assert torch.equal(model.model_ema.encoderconv_inweight, weights["encoder.conv_in.weight"])

    del weights["decoder.conv_out.bias"]
    save_safetensors(weights, path)
    with pytest.raises(CheckpointError, match="decoder.conv_out.bias"):
        AutoencoderKL(lossconfig=IDENTITY_LOSS, ckpt_path=str(path), **config)
    model = AutoencoderKL(lossconfig=IDENTITY_LOSS, ckpt_path=str(path), ignore_keys=["decoder.conv_out"], **config)
    assert torch.equal(model.encoder.conv_in.weight, weights["encoder.conv_in.weight"])


def test_gaussian_kl_nll_closed_forms():
    torch.manual_seed(0)
    params = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    dist = DiagonalGaussianDistribution(params)
    mean, logvar = params[:, :2], params[:, 2:]
    expected_kl = 0.5 * (mean ** 2 + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3))
    torch.testing.assert_close(dist.kl(), expected_kl)
    # KL against itself is zero; against N(0, I) given explicitly equals the default.
    torch.testing.assert_close(dist.kl(dist), torch.zeros(3, dtype=torch.float64))
    standard = DiagonalGaussianDistribution(torch.zeros_like(params))
    torch.testing.assert_close(dist.kl(standard), expected_kl)
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    expected_nll = -torch.distributions.Normal(mean, (0.5 * logvar).exp()).log_prob(x).sum(dim=(1, 2, 3))
    torch.testing.assert_close(dist.nll(x), expected_nll)
    assert dist.sample().dtype == torch.float64
    deterministic = DiagonalGaussianDistribution(params, deterministic=True)
    assert torch.equal(deterministic.sample(), mean)
    assert torch.equal(deterministic.kl(), torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="double_z"):
        DiagonalGaussianDistribution(torch.zeros(1, 3, 2, 2))


KL_F8 = dict(embed_dim=4, ddconfig=dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                                        ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0))
VQ_F4 = dict(embed_dim=3, n_embed=8192, ddconfig=dict(double_z=False, z_channels=3, resolution=256, in_channels=3,
                                                      out_ch=3, ch=128, ch_mult=[1, 2, 4], num_res_blocks=2,
                                                      attn_resolutions=[], dropout=0.0))


@pytest.mark.parametrize("cls, config, key_file", [(AutoencoderKL, KL_F8, "first_stage_kl_f8.keys.json"),
                                                   (VQModel, VQ_F4, "first_stage_vq_f4.keys.json")])
def test_released_configs_have_reference_keys_and_shapes(reference_dir, cls, config, key_file):
    expected = [(k, list(shape)) for k, shape in json.loads((reference_dir / key_file).read_text())]
    with torch.device("meta"):
        model = cls(lossconfig=IDENTITY_LOSS, **config)
    actual = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert actual == expected
    # A state dict with exactly those keys and shapes loads strictly (on a real device, so values copy).
    model = model.to_empty(device="cpu")
    state = {k: torch.randn(shape) for k, shape in expected}
    load_weights(model, state, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
