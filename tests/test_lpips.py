"""LPIPS on our own VGG16: weight discovery, key layout, and the metric itself.

VGG16 weights are random, written to tmp in torchvision's format (`features.N.*`); the linear heads
are the real ones that torchmetrics ships. Nothing here touches the network: every test runs with
TORCH_HOME in tmp, LDM_VGG16_WEIGHTS unset and `torch.hub.load_state_dict_from_url` raising.
"""
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ldm.checkpoint import CheckpointError
from ldm.modules.losses.lpips import (
    LPIPS,
    VGG16_FILENAME,
    VGG16_URL,
    VGGWeightsNotFound,
    load_vgg16_features_state_dict,
    locate_vgg16_weights,
    torchmetrics_lpips_heads_path,
    vgg16,
)
from tests.helpers import POOLS, TAPS, VGG16_CONV_CHANNELS as CONV_CHANNELS, random_vgg16_state_dict

pytestmark = pytest.mark.usefixtures("offline_hub")

def torchvision_features(state: dict[str, torch.Tensor]) -> nn.Sequential:
    """torchvision's `vgg16().features` (a flat Sequential) holding the `features.*` weights of `state`."""
    layers = []
    for i in range(31):
        if i in CONV_CHANNELS:
            layers.append(nn.Conv2d(*CONV_CHANNELS[i], kernel_size=3, padding=1))
        elif i in POOLS:
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers.append(nn.ReLU())
    features = nn.Sequential(*layers)
    features.load_state_dict({k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")})
    return features


@pytest.fixture(scope="module")
def vgg_state() -> dict[str, torch.Tensor]:
    return random_vgg16_state_dict(seed=0)


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory, vgg_state) -> Path:
    path = tmp_path_factory.mktemp("vgg") / VGG16_FILENAME
    torch.save(vgg_state, path)
    return path


@pytest.fixture(scope="module")
def metric(vgg_file) -> LPIPS:
    return LPIPS(vgg_weights_path=str(vgg_file))


def hub_cache_file(tmp_path: Path) -> Path:
    path = tmp_path / "torch_home" / "hub" / "checkpoints" / VGG16_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# --- weight discovery -------------------------------------------------------------------------------

def test_precedence_explicit_then_env_then_hub_cache(tmp_path, monkeypatch):
    explicit, from_env = tmp_path / "explicit.pth", tmp_path / "env.pth"
    cached = hub_cache_file(tmp_path)
    for path in (explicit, from_env, cached):
        path.write_bytes(b"")  # only existence matters for locating

    assert locate_vgg16_weights() == cached
    monkeypatch.setenv("LDM_VGG16_WEIGHTS", str(from_env))
    assert locate_vgg16_weights() == from_env
    assert locate_vgg16_weights(str(explicit)) == explicit
    monkeypatch.delenv("LDM_VGG16_WEIGHTS")
    assert locate_vgg16_weights(explicit) == explicit
    cached.unlink()
    assert locate_vgg16_weights() is None


def test_named_but_missing_files_are_errors_not_skipped(tmp_path, monkeypatch):
    hub_cache_file(tmp_path).write_bytes(b"")
    with pytest.raises(VGGWeightsNotFound, match="vgg_weights_path"):
        locate_vgg16_weights(tmp_path / "typo.pth")
    monkeypatch.setenv("LDM_VGG16_WEIGHTS", str(tmp_path / "typo.pth"))
    with pytest.raises(VGGWeightsNotFound, match="LDM_VGG16_WEIGHTS"):
        locate_vgg16_weights()


def test_nothing_found_and_download_failing_gives_a_clear_error(tmp_path):
    with pytest.raises(VGGWeightsNotFound) as info:
        load_vgg16_features_state_dict()
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for needle in ("vgg_weights_path", "LDM_VGG16_WEIGHTS", str(hub_cache_file(tmp_path)), VGG16_URL,
                   "downloads are disabled in tests", "perceptual_weight: 0"):
        assert needle in message


def test_download_is_the_last_resort(monkeypatch, vgg_state):
    calls = []

    def fake_download(url, **kwargs):
        calls.append((url, kwargs))
        return vgg_state

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    state, source = load_vgg16_features_state_dict()
    assert source == VGG16_URL and state is vgg_state
    assert calls[0][0] == VGG16_URL
    assert calls[0][1]["weights_only"] is True and calls[0][1]["map_location"] == "cpu"


def test_loads_from_hub_cache_env_var_and_safetensors(tmp_path, monkeypatch, vgg_file, vgg_state):
    def conv0_of(expected_source: Path) -> torch.Tensor:
        state, source = load_vgg16_features_state_dict()
        assert source == str(expected_source)
        net = vgg16()
        net.load_torchvision_weights(state, source)
        return net.slice1[0].weight

    hub_cache_file(tmp_path).symlink_to(vgg_file)
    torch.testing.assert_close(conv0_of(hub_cache_file(tmp_path)), vgg_state["features.0.weight"])

    other = random_vgg16_state_dict(seed=1)
    other_file = tmp_path / "other.safetensors"
    save_file(other, str(other_file))
    monkeypatch.setenv("LDM_VGG16_WEIGHTS", str(other_file))  # beats the hub cache
    torch.testing.assert_close(conv0_of(other_file), other["features.0.weight"])


def test_incomplete_or_wrong_weights_list_the_missing_keys(tmp_path, vgg_state):
    incomplete = {k: v for k, v in vgg_state.items() if k != "features.28.weight"}
    with pytest.raises(CheckpointError, match=r"missing keys.*features\.28\.weight"):
        vgg16().load_torchvision_weights(incomplete, source="incomplete.pth")

    vgg19_like = dict(vgg_state, **{"features.32.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"unexpected keys.*features\.32\.weight"):
        vgg16().load_torchvision_weights(vgg19_like, source="vgg19.pth")


def test_lpips_heads_from_an_explicit_file_and_errors(tmp_path, vgg_file):
    heads = torch.load(torchmetrics_lpips_heads_path(), map_location="cpu", weights_only=True)
    assert sorted(heads) == [f"lin{k}.model.1.weight" for k in range(5)]
    custom = {k: torch.full_like(v, 0.5) for k, v in heads.items()}
    torch.save(custom, tmp_path / "heads.pth")
    metric = LPIPS(vgg_weights_path=str(vgg_file), lpips_heads_path=str(tmp_path / "heads.pth"))
    assert torch.all(metric.lin3.model[1].weight == 0.5)

    with pytest.raises(FileNotFoundError, match="lpips_heads_path"):
        LPIPS(vgg_weights_path=str(vgg_file), lpips_heads_path=str(tmp_path / "nope.pth"))
    del custom["lin4.model.1.weight"]
    torch.save(custom, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"lin4\.model\.1\.weight"):
        LPIPS(vgg_weights_path=str(vgg_file), lpips_heads_path=str(tmp_path / "partial.pth"))


# --- layout and frozen state ------------------------------------------------------------------------

def test_state_dict_keys_match_taming_lpips(metric):
    keys = set(metric.state_dict())
    slices = {1: range(0, 4), 2: range(4, 9), 3: range(9, 16), 4: range(16, 23), 5: range(23, 30)}
    expected = {"scaling_layer.shift", "scaling_layer.scale"}
    expected |= {f"lin{k}.model.1.weight" for k in range(5)}
    expected |= {f"net.slice{s}.{i}.{p}" for s, idx in slices.items() for i in idx if i in CONV_CHANNELS
                 for p in ("weight", "bias")}
    assert keys == expected


def test_frozen_and_stays_in_eval(metric):
    assert not any(p.requires_grad for p in metric.parameters())
    parent = nn.Module()
    parent.perceptual_loss = metric
    parent.train()
    assert not metric.training and not metric.lin0.model[0].training


# --- the metric ---------------------------------------------------------------------------------------

def test_vgg16_slices_compute_torchvision_features(vgg_state):
    torch.manual_seed(0)
    ours = vgg16()
    ours.load_torchvision_weights(vgg_state, source="test")
    reference = torchvision_features(vgg_state)

    x = torch.randn(2, 3, 32, 32)
    taps, h = [], x
    for i, layer in enumerate(reference):
        h = layer(h)
        if i in TAPS:
            taps.append(h)
    outputs = ours(x)
    assert outputs._fields == ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
    for got, want in zip(outputs, taps):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_lpips_equals_the_formula(metric, vgg_state):
    torch.manual_seed(1)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1

    reference = torchvision_features(vgg_state)
    heads = torch.load(torchmetrics_lpips_heads_path(), map_location="cpu", weights_only=True)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(img):
        out, h = [], (img - shift) / scale
        for i, layer in enumerate(reference):
            h = layer(h)
            if i in TAPS:
                out.append(h)
        return out

    expected = torch.zeros(2)
    for k, (fx, fy) in enumerate(zip(taps(x), taps(y))):
        nx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        ny = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        w = heads[f"lin{k}.model.1.weight"].view(1, -1, 1, 1)
        expected += ((nx - ny) ** 2 * w).sum(1).mean((1, 2))

    got = metric(x, y)
    assert got.shape == (2, 1, 1, 1)
    torch.testing.assert_close(got.flatten(), expected, rtol=1e-5, atol=1e-7)


def test_lpips_is_a_distance(metric):
    torch.manual_seed(2)
    x, y = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.all(metric(x, x) == 0)
    d_xy, d_yx = metric(x, y), metric(y, x)
    torch.testing.assert_close(d_xy, d_yx)
    assert torch.all(d_xy > 1e-3)
    assert torch.all(metric(x, x + 0.01 * torch.randn_like(x)) < d_xy)


def test_lpips_passes_gradients_to_its_inputs(metric):
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    metric(x, torch.rand(1, 3, 32, 32)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in metric.parameters())


def test_lpips_rejects_mismatched_inputs(metric):
    with pytest.raises(ValueError, match="equal shape"):
        metric(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="RGB"):
        metric(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32))

