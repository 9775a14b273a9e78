"""First-stage losses: GAN pieces, the KL loss (LPIPSWithDiscriminator) and the VQ loss, against values
computed by hand on small tensors."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.losses import LPIPSWithDiscriminator, VQLPIPSWithDiscriminator
from ldm.modules.losses.adversarial import adaptive_generator_weight, adopt_weight, hinge_d_loss, vanilla_d_loss
from ldm.modules.losses.lpips import LPIPS, VGGWeightsNotFound, vgg16
from ldm.modules.losses.vqperceptual import DummyLoss, measure_perplexity
from ldm.util import instantiate_from_config


pytestmark = pytest.mark.usefixtures("offline_hub")


class TinyDecoder(nn.Module):
    """A 1x1-conv "decoder" from a 2-channel latent to RGB; its weight is the adaptive weight's last layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_out = nn.Conv2d(2, 3, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(z)


def posterior_and_images(seed: int = 0):
    """A known posterior over a (2, 2, 16, 16) latent and a (2, 3, 16, 16) image batch in [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(2, 2, 16, 16, generator=gen)
    logvar = 0.3 * torch.randn(2, 2, 16, 16, generator=gen)
    posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    inputs = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    return posterior, inputs, mean, logvar


def kl_loss_module(**kwargs) -> LPIPSWithDiscriminator:
    params = dict(disc_start=10, perceptual_weight=0.0, disc_num_layers=2)
    params.update(kwargs)
    return LPIPSWithDiscriminator(**params)


# --- GAN pieces ---------------------------------------------------------------------------------------

LOGITS_REAL = torch.tensor([0.5, 2.0, -1.0])
LOGITS_FAKE = torch.tensor([-2.0, 0.0, 1.5])


def test_hinge_d_loss_by_hand():
    # real: relu(1 - r) = [0.5, 0, 2] -> 5/6; fake: relu(1 + f) = [0, 1, 2.5] -> 7/6; 0.5 * (5/6 + 7/6) = 1
    torch.testing.assert_close(hinge_d_loss(LOGITS_REAL, LOGITS_FAKE), torch.tensor(1.0))


def test_vanilla_d_loss_by_hand():
    def softplus(v: float) -> float:
        return math.log1p(math.exp(v))

    real = sum(softplus(-r) for r in (0.5, 2.0, -1.0)) / 3
    fake = sum(softplus(f) for f in (-2.0, 0.0, 1.5)) / 3
    torch.testing.assert_close(vanilla_d_loss(LOGITS_REAL, LOGITS_FAKE), torch.tensor(0.5 * (real + fake)))


def test_adopt_weight():
    assert adopt_weight(0.7, global_step=4, threshold=5) == 0.0
    assert adopt_weight(0.7, global_step=5, threshold=5) == 0.7
    assert adopt_weight(0.7, global_step=0, threshold=5, value=0.1) == 0.1


def test_adaptive_weight_is_the_gradient_norm_ratio():
    # Linear decoder y = W z, rec = sum (x - y)^2, D(y) = v . y, g = -mean_n D(y_n). By hand:
    # dRec/dW = -2 sum_n (x_n - W z_n) z_n^T,  dG/dW = -v mean_n(z_n)^T.
    torch.manual_seed(0)
    W = torch.randn(3, 2, requires_grad=True)
    z, x, v = torch.randn(5, 2), torch.randn(5, 3), torch.randn(3)
    y = z @ W.T
    rec = ((x - y) ** 2).sum()
    g = -(y @ v).mean()
    grad_rec = -2 * (x - z @ W.detach().T).T @ z
    grad_g = -torch.outer(v, z.mean(0))
    expected = grad_rec.norm() / (grad_g.norm() + 1e-4)

    weight = adaptive_generator_weight(rec, g, W)
    torch.testing.assert_close(weight, expected)
    assert not weight.requires_grad

    tiny_gan = 1e-9 * g  # a vanishing GAN gradient hits the clamp
    assert adaptive_generator_weight(rec, tiny_gan, W).item() == pytest.approx(1e4)


# --- KL loss ------------------------------------------------------------------------------------------

def test_kl_loss_normalisation_by_hand():
    posterior, inputs, mean, logvar = posterior_and_images()
    recs = inputs + 0.1 * torch.randn_like(inputs)
    loss_fn = kl_loss_module(logvar_init=0.5, kl_weight=1e-2)
    loss, log = loss_fn(inputs, recs, posterior, optimizer_idx=0, global_step=0)

    rec = (inputs - recs).abs()
    nll = (rec / math.exp(0.5) + 0.5).sum() / 2  # summed over C, H, W; averaged over the batch of 2
    kl = (0.5 * (mean**2 + logvar.exp() - 1 - logvar)).sum() / 2
    torch.testing.assert_close(loss, nll + 1e-2 * kl)
    torch.testing.assert_close(log["train/nll_loss"], nll)
    torch.testing.assert_close(log["train/kl_loss"], kl)
    torch.testing.assert_close(log["train/nll_loss_per_element"], nll / (3 * 16 * 16))
    torch.testing.assert_close(log["train/kl_loss_per_element"], kl / (2 * 16 * 16))
    torch.testing.assert_close(log["train/rec_loss"], rec.mean())
    torch.testing.assert_close(log["train/total_loss"], loss.detach())
    assert log["train/logvar"].item() == pytest.approx(0.5)


def test_kl_loss_elementwise_weights_and_pixel_weight():
    posterior, inputs, _, _ = posterior_and_images()
    recs = torch.zeros_like(inputs)
    weights = torch.rand(2, 1, 16, 16)
    loss, log = kl_loss_module(kl_weight=0.0, pixelloss_weight=2.0)(
        inputs, recs, posterior, optimizer_idx=0, global_step=0, weights=weights
    )
    nll = 2.0 * inputs.abs()  # logvar 0
    torch.testing.assert_close(loss, (weights * nll).sum() / 2)
    torch.testing.assert_close(log["train/nll_loss"], nll.sum() / 2)


def test_logvar_gets_the_nll_gradient():
    posterior, inputs, _, _ = posterior_and_images()
    recs = torch.zeros_like(inputs)
    loss_fn = kl_loss_module(logvar_init=0.2)
    loss, _ = loss_fn(inputs, recs, posterior, optimizer_idx=0, global_step=0)
    loss.backward()
    # d/dlogvar sum(rec * e^-logvar + logvar) / B
    expected = (-inputs.abs() * math.exp(-0.2) + 1).sum() / 2
    torch.testing.assert_close(loss_fn.logvar.grad, expected)


def count_discriminator_calls(loss_fn) -> list:
    calls = []
    loss_fn.discriminator.register_forward_hook(lambda *args: calls.append(1))
    return calls


def test_discriminator_is_gated_before_disc_start():
    posterior, inputs, _, _ = posterior_and_images()
    decoder = TinyDecoder()
    recs = decoder(posterior.mean)
    loss_fn = kl_loss_module(disc_start=10)
    calls = count_discriminator_calls(loss_fn)

    assert not loss_fn.discriminator_active(9) and loss_fn.discriminator_active(10)
    assert not kl_loss_module(disc_start=0, disc_factor=0.0).discriminator_active(100)

    loss, log = loss_fn(inputs, recs, posterior, 0, global_step=9, last_layer=decoder.conv_out.weight)
    assert calls == [] and log["train/disc_factor"] == 0 and log["train/d_weight"] == 0
    torch.testing.assert_close(loss, log["train/nll_loss"] + log["train/kl_loss"])
    d_loss, _ = loss_fn(inputs, recs, posterior, 1, global_step=9)
    assert d_loss.item() == 0


def test_generator_term_after_disc_start():
    posterior, inputs, _, _ = posterior_and_images()
    decoder = TinyDecoder()
    recs = decoder(posterior.mean)
    loss_fn = kl_loss_module(disc_start=10, disc_weight=0.5, kl_weight=1e-3)
    last = decoder.conv_out.weight
    loss, log = loss_fn(inputs, recs, posterior, 0, global_step=10, last_layer=last)

    nll = ((inputs - recs).abs()).sum() / 2  # logvar 0
    g_loss = -loss_fn.discriminator(recs).mean()
    grad_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
    grad_g = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
    d_weight = 0.5 * grad_nll.norm() / (grad_g.norm() + 1e-4)
    assert log["train/disc_factor"] == 1
    torch.testing.assert_close(log["train/d_weight"], d_weight)
    torch.testing.assert_close(log["train/g_loss"], g_loss.detach())
    torch.testing.assert_close(loss, nll + 1e-3 * log["train/kl_loss"] + d_weight * g_loss)

    loss.backward()
    assert decoder.conv_out.weight.grad is not None


def test_validation_falls_back_to_zero_adaptive_weight():
    posterior, inputs, _, _ = posterior_and_images()
    recs = TinyDecoder()(posterior.mean).detach()
    loss_fn = kl_loss_module(disc_start=0).eval()
    with torch.no_grad():
        loss, log = loss_fn(inputs, recs, posterior, 0, global_step=100, split="val")
        d_loss, d_log = loss_fn(inputs, recs, posterior, 1, global_step=100, split="val")
    assert log["val/d_weight"] == 0 and log["val/disc_factor"] == 1
    torch.testing.assert_close(loss, log["val/nll_loss"] + log["val/kl_loss"])
    assert set(d_log) == {"val/disc_loss", "val/logits_real", "val/logits_fake"}
    torch.testing.assert_close(d_loss, hinge_d_loss(loss_fn.discriminator(inputs), loss_fn.discriminator(recs)))


def test_training_needs_last_layer_once_active():
    posterior, inputs, _, _ = posterior_and_images()
    recs = TinyDecoder()(posterior.mean)
    with pytest.raises(ValueError, match="last_layer"):
        kl_loss_module(disc_start=0)(inputs, recs, posterior, 0, global_step=0)


@pytest.mark.parametrize("disc_loss, d_fn", [("hinge", hinge_d_loss), ("vanilla", vanilla_d_loss)])
def test_discriminator_step(disc_loss, d_fn):
    posterior, inputs, _, _ = posterior_and_images()
    decoder = TinyDecoder()
    recs = decoder(posterior.mean)
    loss_fn = kl_loss_module(disc_start=3, disc_factor=0.8, disc_loss=disc_loss).eval()  # eval: fixed BN stats
    d_loss, log = loss_fn(inputs, recs, posterior, 1, global_step=3)
    real, fake = loss_fn.discriminator(inputs), loss_fn.discriminator(recs)
    torch.testing.assert_close(d_loss, 0.8 * d_fn(real, fake))
    torch.testing.assert_close(log["train/logits_real"], real.mean().detach())
    torch.testing.assert_close(log["train/logits_fake"], fake.mean().detach())
    d_loss.backward()
    assert decoder.conv_out.weight.grad is None  # the images are detached for the discriminator update
    assert loss_fn.discriminator.main[0].weight.grad is not None


def test_conditional_discriminator():
    posterior, inputs, _, _ = posterior_and_images()
    cond = torch.randn(2, 1, 16, 16)
    loss_fn = kl_loss_module(disc_start=0, disc_in_channels=4, disc_conditional=True)
    d_loss, _ = loss_fn(inputs, inputs.flip(0), posterior, 1, global_step=0, cond=cond)
    assert d_loss.ndim == 0
    with pytest.raises(ValueError, match="conditional"):
        loss_fn(inputs, inputs, posterior, 1, global_step=0)
    with pytest.raises(ValueError, match="conditional"):
        kl_loss_module(disc_start=0)(inputs, inputs, posterior, 1, global_step=0, cond=cond)


def test_bad_arguments():
    posterior, inputs, _, _ = posterior_and_images()
    with pytest.raises(ValueError, match="optimizer_idx"):
        kl_loss_module()(inputs, inputs, posterior, 2, global_step=0)
    with pytest.raises(ValueError, match="disc_loss"):
        kl_loss_module(disc_loss="wasserstein")
    with pytest.raises(ValueError, match="shape"):
        kl_loss_module()(inputs, inputs[:, :, :4], posterior, 0, global_step=0)


def test_state_dict_keys_without_perceptual_loss():
    keys = set(kl_loss_module(disc_num_layers=3).state_dict())
    assert "logvar" in keys and "discriminator.main.11.weight" in keys
    assert not any(k.startswith("perceptual_loss") for k in keys)


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    # Our own randomly initialised VGG16, written under torchvision's key names.
    state = {f"features.{k.split('.', 1)[1]}": v for k, v in vgg16().state_dict().items()}
    path = tmp_path_factory.mktemp("vgg") / "vgg16.pth"
    torch.save(state, path)
    return path


def test_perceptual_term(vgg_file):
    posterior, _, _, _ = posterior_and_images()
    torch.manual_seed(3)
    inputs, recs = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    loss_fn = kl_loss_module(perceptual_weight=0.7, vgg_weights_path=str(vgg_file))
    assert {"perceptual_loss.net.slice1.0.weight", "perceptual_loss.lin0.model.1.weight",
            "perceptual_loss.scaling_layer.shift"} <= set(loss_fn.state_dict())
    _, log = loss_fn(inputs, recs, posterior, 0, global_step=0)
    p_loss = LPIPS(vgg_weights_path=str(vgg_file))(inputs, recs)
    torch.testing.assert_close(log["train/rec_loss"], ((inputs - recs).abs() + 0.7 * p_loss).mean())


def test_missing_vgg_weights_fail_at_construction():
    with pytest.raises(VGGWeightsNotFound, match="perceptual_weight: 0"):
        LPIPSWithDiscriminator(disc_start=0, perceptual_weight=1.0)
    LPIPSWithDiscriminator(disc_start=0, perceptual_weight=0.0)  # no LPIPS, no weights needed


def test_reference_config_values_instantiate():
    kl = instantiate_from_config({
        "target": "ldm.modules.losses.LPIPSWithDiscriminator",
        "params": {"disc_start": 50001, "kl_weight": 1.0e-6, "disc_weight": 0.5, "perceptual_weight": 0},
    })
    assert kl.kl_weight == 1e-6 and kl.discriminator_iter_start == 50001
    vq = instantiate_from_config({
        "target": "ldm.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
        "params": {"disc_conditional": False, "disc_in_channels": 3, "disc_start": 0, "disc_weight": 0.75,
                   "codebook_weight": 1.0, "perceptual_weight": 0, "n_classes": 64, "disc_num_layers": 2},
    })
    assert vq.n_classes == 64


# --- VQ loss ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pixel_loss", ["l1", "l2"])
def test_vq_loss_by_hand(pixel_loss):
    torch.manual_seed(0)
    inputs, recs = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    codebook_loss = torch.tensor(0.3)
    loss_fn = VQLPIPSWithDiscriminator(disc_start=5, codebook_weight=2.0, perceptual_weight=0,
                                       pixel_loss=pixel_loss, disc_num_layers=1)
    loss, log = loss_fn(codebook_loss, inputs, recs, 0, global_step=0)
    diff = inputs - recs
    rec = diff.abs() if pixel_loss == "l1" else diff**2
    torch.testing.assert_close(loss, rec.mean() + 2.0 * 0.3)  # a plain mean, unlike the KL loss
    torch.testing.assert_close(log["train/nll_loss"], rec.mean())
    torch.testing.assert_close(log["train/quant_loss"], codebook_loss)
    assert log["train/p_loss"] == 0 and "train/perplexity" not in log

    loss_none, _ = loss_fn(None, inputs, recs, 0, global_step=0)
    torch.testing.assert_close(loss_none, rec.mean())


def test_vq_generator_and_discriminator_steps():
    torch.manual_seed(0)
    decoder = TinyDecoder()
    inputs = torch.rand(2, 3, 16, 16) * 2 - 1
    recs = decoder(torch.randn(2, 2, 16, 16))
    loss_fn = VQLPIPSWithDiscriminator(disc_start=0, perceptual_weight=0, disc_num_layers=1, disc_ndf=16,
                                       disc_weight=0.75, disc_loss="vanilla")
    assert loss_fn.discriminator.main[0].out_channels == 16
    last = decoder.conv_out.weight
    loss, log = loss_fn(torch.tensor(0.0), inputs, recs, 0, global_step=0, last_layer=last)
    nll = (inputs - recs).abs().mean()
    g_loss = -loss_fn.discriminator(recs).mean()
    d_weight = 0.75 * adaptive_generator_weight(nll, g_loss, last)
    torch.testing.assert_close(log["train/d_weight"], d_weight)
    torch.testing.assert_close(loss, nll + d_weight * g_loss)

    loss_fn.eval()
    d_loss, _ = loss_fn(None, inputs, recs, 1, global_step=0)
    torch.testing.assert_close(
        d_loss, vanilla_d_loss(loss_fn.discriminator(inputs), loss_fn.discriminator(recs))
    )


def test_perplexity_and_usage():
    perplexity, usage = measure_perplexity(torch.tensor([[0, 0], [1, 1]]), n_embed=4)
    assert perplexity.item() == pytest.approx(2.0) and usage.item() == 2
    perplexity, usage = measure_perplexity(torch.arange(8).repeat(3), n_embed=8)
    assert perplexity.item() == pytest.approx(8.0, rel=1e-5) and usage.item() == 8
    perplexity, usage = measure_perplexity(torch.full((5,), 3), n_embed=8)
    assert perplexity.item() == pytest.approx(1.0) and usage.item() == 1
    # p = [1/2, 1/4, 1/4]: H = 1.5 ln 2, perplexity 2^1.5
    perplexity, _ = measure_perplexity(torch.tensor([0, 0, 1, 2]), n_embed=3)
    assert perplexity.item() == pytest.approx(2**1.5, rel=1e-5)
    # Same as counting one-hot encodings explicitly.
    indices = torch.randint(0, 16, (2, 4, 4), generator=torch.Generator().manual_seed(0))
    probs = F.one_hot(indices, 16).float().reshape(-1, 16).mean(0)
    torch.testing.assert_close(measure_perplexity(indices, 16)[0], (-(probs * torch.log(probs + 1e-10)).sum()).exp())
    with pytest.raises(ValueError, match="n_classes"):
        measure_perplexity(torch.tensor([0, 4]), n_embed=4)


def test_vq_logs_perplexity_from_predicted_indices():
    inputs = torch.rand(1, 3, 8, 8)
    loss_fn = VQLPIPSWithDiscriminator(disc_start=5, perceptual_weight=0, n_classes=4, disc_num_layers=1)
    _, log = loss_fn(None, inputs, inputs, 0, global_step=0, split="val", predicted_indices=torch.tensor([0, 1, 2, 3]))
    assert log["val/perplexity"].item() == pytest.approx(4.0) and log["val/codebook_usage"].item() == 4
    with pytest.raises(ValueError, match="n_classes"):
        VQLPIPSWithDiscriminator(disc_start=5, perceptual_weight=0)(
            None, inputs, inputs, 0, global_step=0, predicted_indices=torch.tensor([0]))


def test_vq_bad_arguments_and_dummy_loss():
    with pytest.raises(ValueError, match="perceptual_loss"):
        VQLPIPSWithDiscriminator(disc_start=0, perceptual_loss="dists")
    with pytest.raises(ValueError, match="pixel_loss"):
        VQLPIPSWithDiscriminator(disc_start=0, perceptual_weight=0, pixel_loss="huber")
    with pytest.raises(RuntimeError, match="inference-only"):
        DummyLoss()(torch.zeros(1))
