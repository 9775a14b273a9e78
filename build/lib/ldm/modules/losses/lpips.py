"""LPIPS perceptual distance (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a
Perceptual Metric") on an own VGG16 backbone.

This is taming-transformers' `taming/modules/losses/lpips.py` without torchvision: the module names are
the same (`net.slice1..5` holding torchvision's `features.N` layers under their indices N,
`lin0..4.model.1`, `scaling_layer.shift/scale`), so the `loss.perceptual_loss.*` keys of a reference
first-stage checkpoint load unchanged.

Two weight files are needed:
- the VGG16 ImageNet backbone in torchvision's format (`features.{idx}.weight/bias`), found by
  `load_vgg16_features_state_dict` (explicit path, `$LDM_VGG16_WEIGHTS`, torch hub cache, download);
- the five linear heads (`lin{k}.model.1.weight`) of LPIPS v0.1, which torchmetrics ships as
  `functional/image/lpips_models/vgg.pth` (the same file taming downloads as `vgg.pth`).
"""
from __future__ import annotations

import http.client
import importlib.util
import os
from collections import OrderedDict, namedtuple
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ldm.checkpoint import load_state_dict, load_weights

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
VGG16_FILENAME = "vgg16-397923af.pth"
VGG16_WEIGHTS_ENV = "LDM_VGG16_WEIGHTS"

# torchvision's VGG16 ("configuration D"): output channels of each 3x3 conv (each followed by a ReLU),
# "M" = 2x2 max-pool. Enumerating it gives torchvision's `features.N` indices.
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
# taming's cut of `features` into five slices ending after relu1_2, relu2_2, relu3_3, relu4_3 and
# relu5_3 ([start, stop) indices); the final max-pool (index 30) is not used.
_SLICE_BOUNDS = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
_VGG16_CHANNELS = (64, 128, 256, 512, 512)

PathLike = Union[str, os.PathLike]


class VGGWeightsNotFound(FileNotFoundError):
    """No VGG16 weights for the LPIPS perceptual loss could be found or downloaded."""


def hub_cache_vgg16_path() -> Path:
    """Where torchvision (and `torch.hub`) keep the VGG16 weights: `$TORCH_HOME/hub/checkpoints/`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILENAME


def _how_to_provide() -> str:
    return (
        f"Provide torchvision's ImageNet VGG16 weights ({VGG16_FILENAME}, from {VGG16_URL}) in one of "
        f"these ways: set `vgg_weights_path: /path/to/{VGG16_FILENAME}` in the loss config params; "
        f"export {VGG16_WEIGHTS_ENV}=/path/to/{VGG16_FILENAME}; or copy the file to "
        f"{hub_cache_vgg16_path()}. A .safetensors copy with the same keys works too. "
        "Or train without the perceptual term: set `perceptual_weight: 0` in the loss config "
        "(the built-in configs do)."
    )


def _requested_file(path: PathLike, where: str) -> Path:
    """A weights file the user named explicitly; a wrong name is an error, never silently skipped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise VGGWeightsNotFound(
            f"VGG16 weights file {path} (given by {where}) does not exist. {_how_to_provide()}"
        )
    return path


def locate_vgg16_weights(vgg_weights_path: Optional[PathLike] = None) -> Optional[Path]:
    """The local VGG16 weights file to use, by precedence: `vgg_weights_path`, then `$LDM_VGG16_WEIGHTS`,
    then the torch hub cache. None when there is none (the caller may then download).

    An explicit path or env var that names a missing file raises `VGGWeightsNotFound` instead of
    falling through, so a typo never loads other weights than the ones asked for.
    """
    if vgg_weights_path is not None:
        return _requested_file(vgg_weights_path, "the `vgg_weights_path` argument")
    env_path = os.environ.get(VGG16_WEIGHTS_ENV)
    if env_path:
        return _requested_file(env_path, f"${VGG16_WEIGHTS_ENV}")
    cached = hub_cache_vgg16_path()
    return cached if cached.is_file() else None


def load_vgg16_features_state_dict(
    vgg_weights_path: Optional[PathLike] = None,
) -> tuple[dict[str, torch.Tensor], str]:
    """torchvision-format VGG16 weights and a description of where they came from.

    Looks, in order, at `vgg_weights_path`, `$LDM_VGG16_WEIGHTS`, the torch hub cache, and finally
    downloads torchvision's file into the hub cache; raises `VGGWeightsNotFound` if all fail.
    """
    path = locate_vgg16_weights(vgg_weights_path)
    if path is not None:
        return load_state_dict(path), str(path)
    try:
        state = torch.hub.load_state_dict_from_url(
            VGG16_URL, map_location="cpu", progress=False, check_hash=True, weights_only=True
        )
    # Offline: URLError/socket errors are OSErrors; a truncated reply is an HTTPException; a corrupt
    # download fails torch.hub's hash check with a RuntimeError.
    except (OSError, RuntimeError, http.client.HTTPException) as error:
        raise VGGWeightsNotFound(
            "No VGG16 weights for the LPIPS perceptual loss were found. Looked at: "
            "the `vgg_weights_path` argument (not given); "
            f"${VGG16_WEIGHTS_ENV} (not set); "
            f"the torch hub cache {hub_cache_vgg16_path()} (no such file); "
            f"a download from {VGG16_URL} (failed: {error.__class__.__name__}: {error}). "
            + _how_to_provide()
        ) from error
    return state, VGG16_URL


def torchmetrics_lpips_heads_path() -> Path:
    """The LPIPS v0.1 VGG linear heads that the torchmetrics package ships."""
    # find_spec locates the package without importing it (importing torchmetrics takes seconds).
    spec = importlib.util.find_spec("torchmetrics")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the LPIPS linear heads (vgg.pth) are taken from the torchmetrics package, which is not "
            "installed; install torchmetrics or pass `lpips_heads_path`"
        )
    package_dir = Path(list(spec.submodule_search_locations)[0])
    return package_dir / "functional" / "image" / "lpips_models" / "vgg.pth"


def normalize_tensor(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Unit-normalise each feature vector along channels (LPIPS eq. 1, the hat-y of each layer)."""
    norm_factor = torch.sqrt(torch.sum(x**2, dim=1, keepdim=True))
    return x / (norm_factor + eps)


def spatial_average(x: torch.Tensor, keepdim: bool = True) -> torch.Tensor:
    """Mean over H and W (LPIPS eq. 1, the 1/(H_l W_l) sum)."""
    return x.mean([2, 3], keepdim=keepdim)


def _torchvision_vgg16_layers() -> list[nn.Module]:
    """The layers of torchvision's `vgg16().features`, in order (list index = torchvision index)."""
    layers: list[nn.Module] = []
    in_channels = 3
    for item in _VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channels, item, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_channels = item
    return layers


VggOutputs = namedtuple("VggOutputs", ["relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3"])


class vgg16(nn.Module):  # noqa: N801 - taming's name, kept so code importing it keeps working
    """VGG16 features cut into five slices; returns the activations LPIPS compares."""

    def __init__(self, requires_grad: bool = False) -> None:
        super().__init__()
        layers = _torchvision_vgg16_layers()
        self.N_slices = len(_SLICE_BOUNDS)
        for number, (start, stop) in enumerate(_SLICE_BOUNDS, start=1):
            # Layers keep their torchvision index as name: `slice2.5.weight` is `features.5.weight`.
            sequence = nn.Sequential(OrderedDict((str(i), layers[i]) for i in range(start, stop)))
            setattr(self, f"slice{number}", sequence)
        if not requires_grad:
            for param in self.parameters():
                param.requires_grad = False

    @property
    def slices(self) -> list[nn.Sequential]:
        return [getattr(self, f"slice{n}") for n in range(1, self.N_slices + 1)]

    def load_torchvision_weights(self, state_dict: dict[str, torch.Tensor], source: str) -> None:
        """Load torchvision's `features.{idx}.weight/bias` keys (`classifier.*` is ignored).

        Missing, unexpected or mis-shaped keys raise `ldm.checkpoint.CheckpointError` listing them under
        their torchvision names.
        """
        # A throwaway parent that shows the slice layers under torchvision's names; it shares the layer
        # objects, so loading into it loads into the slices.
        torchvision_view = nn.Module()
        torchvision_view.features = nn.Sequential(
            OrderedDict((name, layer) for sequence in self.slices for name, layer in sequence.named_children())
        )
        load_weights(torchvision_view, state_dict, strict=True, ignore_prefixes=("classifier.",),
                     source=f"{source} (expected torchvision's VGG16 weights)")

    def forward(self, X: torch.Tensor) -> VggOutputs:
        outputs = []
        h = X
        for sequence in self.slices:
            h = sequence(h)
            outputs.append(h)
        return VggOutputs(*outputs)


class ScalingLayer(nn.Module):
    """Maps [-1, 1] images to the ImageNet-normalised input VGG16 was trained on (LPIPS's constants)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        return (inp - self.shift) / self.scale


class NetLinLayer(nn.Module):
    """A 1x1 conv weighting the channels of one layer's squared feature difference (LPIPS's w_l)."""

    def __init__(self, chn_in: int, chn_out: int = 1, use_dropout: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Dropout()] if use_dropout else []
        layers += [nn.Conv2d(chn_in, chn_out, 1, stride=1, padding=0, bias=False)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """Frozen LPIPS distance between two image batches in [-1, 1]; returns shape (B, 1, 1, 1).

    d(x, x0) = sum_l 1/(H_l W_l) sum_hw || w_l * (hat-y_l - hat-y0_l) ||^2   (Zhang et al. 2018, eq. 1)

    The module never leaves eval mode: taming calls `.eval()` once, which a parent's `.train()` undoes,
    so there the heads' dropout fires during training; here the frozen metric is deterministic (the same
    value in expectation). The dropout layers are kept so the heads sit at `lin{k}.model.1` as in the
    published weights.
    """

    def __init__(self, vgg_weights_path: Optional[str] = None, lpips_heads_path: Optional[str] = None) -> None:
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.chns = list(_VGG16_CHANNELS)
        self.net = vgg16(requires_grad=False)
        self.net.load_torchvision_weights(*load_vgg16_features_state_dict(vgg_weights_path))
        for k, channels in enumerate(self.chns):
            setattr(self, f"lin{k}", NetLinLayer(channels, use_dropout=True))
        self._load_heads(Path(lpips_heads_path) if lpips_heads_path is not None else torchmetrics_lpips_heads_path())
        for param in self.parameters():
            param.requires_grad = False
        self.eval()

    @property
    def lins(self) -> list[NetLinLayer]:
        return [getattr(self, f"lin{k}") for k in range(len(self.chns))]

    def _load_heads(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(
                f"LPIPS linear heads file {path} does not exist; pass `lpips_heads_path` pointing to the "
                "LPIPS v0.1 vgg.pth (keys lin0.model.1.weight ... lin4.model.1.weight)"
            )
        heads_view = nn.Module()  # only the heads, so the file is checked for exactly their keys
        for k, lin in enumerate(self.lins):
            setattr(heads_view, f"lin{k}", lin)
        load_weights(heads_view, load_state_dict(path), strict=True, source=f"{path} (expected LPIPS vgg heads)")

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if input.shape != target.shape or input.dim() != 4 or input.shape[1] != 3:
            raise ValueError(
                f"LPIPS compares two RGB batches of equal shape (B, 3, H, W); got {tuple(input.shape)} "
                f"and {tuple(target.shape)}"
            )
        feats_input = self.net(self.scaling_layer(input))
        feats_target = self.net(self.scaling_layer(target))
        val = 0
        for lin, f_in, f_tg in zip(self.lins, feats_input, feats_target):
            diff = (normalize_tensor(f_in) - normalize_tensor(f_tg)) ** 2
            val = val + spatial_average(lin(diff), keepdim=True)
        return val
