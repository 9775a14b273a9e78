"""The speed options and the training optimizer keep the reference numerics."""
import pytest
import torch

from ldm.checkpoint import load_weights
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.diffusionmodules.speed import SPEED_OPTIONS, apply_speed_options
from ldm.optim import adamw
from tests.unet_fixtures import randomize_


def _fixture_model(unet_small, options=()):
    config, weights, data = unet_small
    model = UNetModel(**config).eval()
    load_weights(model, weights, strict=True)
    return apply_speed_options(model, options), data


@pytest.mark.parametrize("options", [(), ("channels_last",), ("compile",), ("channels_last", "compile")])
@torch.no_grad()
def test_speed_options_keep_the_reference_unet_output(unet_small, options):
    model, data = _fixture_model(unet_small, options)
    x = data["x"].contiguous(memory_format=torch.channels_last) if "channels_last" in options else data["x"]
    out = model(x, data["t"], context=data["context"])
    torch.testing.assert_close(out, data["out"], atol=1e-4, rtol=0)


@torch.no_grad()
def test_bf16_autocast_stays_close_to_the_reference(unet_small):
    model, data = _fixture_model(unet_small)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(data["x"], data["t"], context=data["context"])
    assert out.dtype == torch.bfloat16
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 per operation); through the whole U-Net the
    # error measured against the float32 reference is about 1 % of the output's scale.
    error = (out.float() - data["out"]).abs().max() / data["out"].abs().max()
    assert 0 < error < 0.05


def test_channels_last_training_gives_the_same_gradients(unet_small):
    config = dict(unet_small[0], use_checkpoint=True)
    reference = randomize_(UNetModel(**config))
    fast = apply_speed_options(UNetModel(**config), ("channels_last",))
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(2, config["in_channels"], config["image_size"], config["image_size"])
    t = torch.tensor([3, 700])
    context = torch.randn(2, 5, config["context_dim"])
    grads = []
    for model in (reference, fast):
        model(x, t, context=context).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_adamw_matches_the_plain_pytorch_update():
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Linear(16, 1))
    ours = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Linear(16, 1))
    ours.load_state_dict(reference.state_dict())
    optimizers = [torch.optim.AdamW(reference.parameters(), lr=1e-2, foreach=False), adamw(ours.parameters(), lr=1e-2)]
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    for _ in range(5):
        for model, opt in zip((reference, ours), optimizers):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    for a, b in zip(reference.parameters(), ours.parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_unknown_speed_option_is_named():
    with pytest.raises(ValueError, match="fast_mode.*channels_last"):
        apply_speed_options(torch.nn.Linear(2, 2), ["fast_mode"])


def test_every_option_is_tested():
    assert set(SPEED_OPTIONS) == {"channels_last", "compile"}
