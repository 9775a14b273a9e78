import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


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
