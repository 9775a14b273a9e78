"""PatchGAN discriminator and ActNorm (taming's layout, keys and initialisation)."""
import pytest
import torch
from torch import nn

from ldm.modules.discriminator.model import ActNorm, NLayerDiscriminator, weights_init


@pytest.mark.parametrize(
    "n_layers, size, patches",
    [
        (3, 64, 6),  # 64 -> 32 -> 16 -> 8 (stride 2) -> 7 -> 6 (stride 1)
        (3, 32, 2),  # the reference default leaves only a 2x2 map on 32x32 data
        (2, 32, 6),  # what the built-in 32x32 configs should use
        (1, 32, 14),
        (3, 256, 30),  # pix2pix's 70x70 PatchGAN on 256x256
    ],
)
def test_patch_map_shape(n_layers, size, patches):
    disc = NLayerDiscriminator(input_nc=3, ndf=8, n_layers=n_layers)
    out = disc(torch.randn(2, 3, size, size))
    assert out.shape == (2, 1, patches, patches)


def test_state_dict_keys_and_shapes_match_taming():
    disc = NLayerDiscriminator()  # input_nc=3, ndf=64, n_layers=3, BatchNorm
    shapes = {k: tuple(v.shape) for k, v in disc.state_dict().items()}

    def bn(i, c):
        return {f"main.{i}.weight": (c,), f"main.{i}.bias": (c,), f"main.{i}.running_mean": (c,),
                f"main.{i}.running_var": (c,), f"main.{i}.num_batches_tracked": ()}

    expected = {
        "main.0.weight": (64, 3, 4, 4), "main.0.bias": (64,),
        "main.2.weight": (128, 64, 4, 4), **bn(3, 128),
        "main.5.weight": (256, 128, 4, 4), **bn(6, 256),
        "main.8.weight": (512, 256, 4, 4), **bn(9, 512),
        "main.11.weight": (1, 512, 4, 4), "main.11.bias": (1,),
    }
    assert shapes == expected


def test_actnorm_variant_has_conv_biases_and_actnorm_keys():
    disc = NLayerDiscriminator(input_nc=4, ndf=16, n_layers=2, use_actnorm=True)
    keys = set(disc.state_dict())
    assert {"main.2.bias", "main.3.loc", "main.3.scale", "main.3.initialized", "main.5.bias", "main.6.loc"} <= keys
    assert not any("running_mean" in k for k in keys)
    assert disc(torch.randn(2, 4, 32, 32)).shape == (2, 1, 6, 6)


def test_weights_init():
    torch.manual_seed(0)
    disc = NLayerDiscriminator(ndf=64, n_layers=3).apply(weights_init)
    conv = disc.main[8].weight
    assert abs(conv.std().item() - 0.02) < 0.001 and abs(conv.mean().item()) < 0.001
    bn = disc.main[9]
    assert abs(bn.weight.mean().item() - 1.0) < 0.005 and abs(bn.weight.std().item() - 0.02) < 0.005
    assert torch.count_nonzero(bn.bias) == 0


def test_actnorm_initialises_from_first_training_batch():
    torch.manual_seed(0)
    norm = ActNorm(3)
    std, mean = torch.tensor([0.5, 2.0, 7.0]).view(1, 3, 1, 1), torch.tensor([1.0, -3.0, 0.2]).view(1, 3, 1, 1)
    x = torch.randn(4, 3, 5, 5) * std + mean
    y = norm(x)
    assert norm.initialized.item() == 1
    per_channel = y.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_channel.std(1), torch.ones(3), atol=1e-5, rtol=0)

    # Later batches are normalised with the stored statistics, not their own.
    loc, scale = norm.loc.detach().clone(), norm.scale.detach().clone()
    x2 = torch.randn(4, 3, 5, 5) + 10.0
    torch.testing.assert_close(norm(x2), scale * (x2 + loc))
    torch.testing.assert_close(norm.loc.detach(), loc)


def test_actnorm_does_not_initialise_in_eval_or_when_loaded():
    norm = ActNorm(2).eval()
    x = torch.randn(2, 2, 3, 3) + 5.0
    torch.testing.assert_close(norm(x), x)  # identity: loc 0, scale 1
    assert norm.initialized.item() == 0

    trained = ActNorm(2)
    trained(torch.randn(8, 2, 4, 4) * 3)
    restored = ActNorm(2)
    restored.load_state_dict(trained.state_dict())
    torch.testing.assert_close(restored(x), trained.scale.detach() * (x + trained.loc.detach()))


def test_actnorm_logdet():
    norm = ActNorm(2, logdet=True)
    with torch.no_grad():
        norm.scale.copy_(torch.tensor([2.0, -0.5]).view(1, 2, 1, 1))
    norm.initialized.fill_(1)
    h, logdet = norm(torch.randn(3, 2, 4, 5))
    assert h.shape == (3, 2, 4, 5)
    expected = 4 * 5 * (torch.log(torch.tensor(2.0)) + torch.log(torch.tensor(0.5)))
    torch.testing.assert_close(logdet, expected.expand(3))


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="ActNorm"):
        ActNorm(3)(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="n_layers"):
        NLayerDiscriminator(n_layers=0)


def test_discriminator_is_a_plain_sequential_of_torch_layers():
    # The layer types at each index are what taming's checkpoint loader and `weights_init` rely on.
    disc = NLayerDiscriminator(n_layers=2)
    kinds = [type(m) for m in disc.main]
    assert kinds == [nn.Conv2d, nn.LeakyReLU, nn.Conv2d, nn.BatchNorm2d, nn.LeakyReLU,
                     nn.Conv2d, nn.BatchNorm2d, nn.LeakyReLU, nn.Conv2d]
    assert [m.stride for m in disc.main if isinstance(m, nn.Conv2d)] == [(2, 2), (2, 2), (1, 1), (1, 1)]
