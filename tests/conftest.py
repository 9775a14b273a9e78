import os
import urllib.error
from pathlib import Path

import pytest
import torch

from tests.unet_fixtures import unet_small  # noqa: F401  (a fixture, shared by several test files)

REPO = Path(__file__).resolve().parents[1]

# The weights-hash cache (ldm.model_loading.hash_cache_file) of the tests and the scripts they run: one of this
# process's own, never the user's ~/.cache.
if "LDM_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["LDM_CACHE_DIR"] = tempfile.mkdtemp(prefix="ldm-test-cache-")
    atexit.register(shutil.rmtree, os.environ["LDM_CACHE_DIR"], ignore_errors=True)


def _find_reference() -> Path:
    """`shared/reference` beside the checkout (CI and developer machines), or LDM_REFERENCE_DIR."""
    if "LDM_REFERENCE_DIR" in os.environ:
        return Path(os.environ["LDM_REFERENCE_DIR"])
    for base in (REPO.parent, REPO):
        if (base / "shared" / "reference").is_dir():
            return base / "shared" / "reference"
    raise FileNotFoundError(
        "reference fixtures not found: expected ../shared/reference beside the checkout, "
        "or set LDM_REFERENCE_DIR"
    )


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return _find_reference()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # A fixed thread count keeps float32 results repeatable; one thread avoids oversubscribing the
    # 2-core CI machine when a test also runs subprocesses or DataLoader workers.
    torch.set_num_threads(1)
    yield


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """No downloads, an empty torch hub cache, no LDM_VGG16_WEIGHTS: what a fresh offline machine has."""
    def no_download(*args, **kwargs):
        raise urllib.error.URLError("downloads are disabled in tests")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("LDM_VGG16_WEIGHTS", raising=False)


@pytest.fixture(scope="session")
def random_vgg16_file(tmp_path_factory) -> Path:
    """torchvision-format VGG16 weights with random values (the real file is not shipped)."""
    from tests.helpers import random_vgg16_state_dict

    path = tmp_path_factory.mktemp("vgg") / "vgg16-random.pth"
    torch.save(random_vgg16_state_dict(seed=0), path)
    return path


@pytest.fixture(scope="session")
def tiny_txt2img_model(tmp_path_factory) -> Path:
    """A directory with config.yaml + model.safetensors of a tiny random text-to-image model (16 steps)."""
    from tests.tiny_models import txt2img_config, write_model_dir

    return write_model_dir(tmp_path_factory.mktemp("tiny_txt2img"), txt2img_config())


@pytest.fixture(scope="session")
def tiny_class_model(tmp_path_factory) -> Path:
    """A tiny random class-conditional model directory (6 classes + null class)."""
    from tests.tiny_models import class_config, write_model_dir

    return write_model_dir(tmp_path_factory.mktemp("tiny_class"), class_config())


@pytest.fixture(scope="session")
def tiny_inpainting_model(tmp_path_factory) -> Path:
    """A tiny random inpainting model directory (LatentInpaintDiffusion, concat conditioning)."""
    from tests.tiny_models import inpainting_config, write_model_dir

    return write_model_dir(tmp_path_factory.mktemp("tiny_inpainting"), inpainting_config())
