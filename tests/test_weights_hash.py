"""The weights hash written into every image's metadata is read from a cache after the first time, so a model's
start-up reads its weights once (issue 28), and is recomputed whenever the file changes."""
import hashlib
import json
import os
from pathlib import Path

import pytest

from ldm import model_loading
from ldm.model_loading import file_sha256, hash_cache_file


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def reads(monkeypatch) -> list:
    """The paths `ldm.model_loading` opens to hash."""
    opened = []
    real_open = open

    def counting_open(file, *args, **kwargs):
        opened.append(Path(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(model_loading, "open", counting_open, raising=False)
    return opened


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_file_is_read_to_hash_once_then_its_digest_comes_from_the_cache(tmp_path, cache_dir, reads):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(os.urandom(3 << 20))
    assert file_sha256(weights) == sha256(weights)
    assert file_sha256(weights) == sha256(weights) and reads == [weights.resolve()]
    entry = json.loads(hash_cache_file().read_text())[str(weights.resolve())]
    assert entry == {"size": 3 << 20, "mtime_ns": weights.stat().st_mtime_ns, "sha256": sha256(weights)}
    assert hash_cache_file().parent == cache_dir and not list(cache_dir.glob(".hashes-*"))


def test_a_changed_file_is_hashed_again(tmp_path, cache_dir, reads):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"first")
    first = file_sha256(weights)
    weights.write_bytes(b"second, longer")
    assert file_sha256(weights) == sha256(weights) != first
    stat = weights.stat()
    weights.write_bytes(b"third, longer!")  # the same size: the modification time tells
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert file_sha256(weights) == sha256(weights) and len(reads) == 3


def test_deleted_files_leave_the_cache_and_a_broken_cache_is_replaced(tmp_path, cache_dir):
    gone, kept = tmp_path / "gone.ckpt", tmp_path / "kept.ckpt"
    gone.write_bytes(b"a")
    kept.write_bytes(b"b")
    file_sha256(gone)
    gone.unlink()
    file_sha256(kept)
    assert list(json.loads(hash_cache_file().read_text())) == [str(kept.resolve())]
    hash_cache_file().write_text("{not json")
    assert file_sha256(kept) == sha256(kept)
    assert list(json.loads(hash_cache_file().read_text())) == [str(kept.resolve())]


def test_an_unwritable_cache_still_gives_the_digest(tmp_path, monkeypatch):
    blocker = tmp_path / "a file, not a folder"
    blocker.write_text("")
    monkeypatch.setenv("LDM_CACHE_DIR", str(blocker / "cache"))
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"weights")
    assert file_sha256(weights) == sha256(weights) == file_sha256(weights)
