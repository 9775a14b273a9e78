"""Sharded data: `ldm-prepare-data` (ldm/cli/prepare_data.py, ldm/data/shard_writer.py) and the shard streams
(ldm/data/shards.py): counts, resume, the split across ranks and workers, URLs, damaged shards."""
from __future__ import annotations

import json
import logging
import os
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_lightning import Callback
from torch.utils.data import DataLoader

from ldm.cli import prepare_data
from ldm.config import ConfigError
from ldm.data.folder import ImageFolderDataset
from ldm.data.shard_format import FORMAT, INDEX_FILE, shard_name
from ldm.data.shard_writer import BuiltinSource, FolderSource, prepare_shards, write_shard
from ldm.data.shards import ShardDataset, segments
from ldm.modules.encoders.caption_vocabulary import dataset_captions
from tests.test_main import only_run, run_main
from tests.tiny_models import TXT2IMG_CONFIG as TINY_TXT2IMG

UNEQUAL = (5, 9, 3, 8, 1, 7, 3)  # 7 shards, 36 items: 4 readers (2 ranks x 2 workers) divide it


def write_unequal_shards(root: Path, counts=UNEQUAL, size: int = 8) -> str:
    """Built-in items in shards of `counts` items with their index; returns the brace pattern."""
    source = BuiltinSource("txt2img", "train", sum(counts), size=size)
    root.mkdir(parents=True, exist_ok=True)
    shards, start = [], 0
    for k, count in enumerate(counts):
        meta = write_shard(source, root / shard_name("train", k), start, start + count)
        shards.append({"name": shard_name("train", k), "count": meta["count"]})
        start += count
    (root / INDEX_FILE).write_text(json.dumps({"format": FORMAT, "shards": shards, "classes": []}))
    return str(root / f"train-{{000000..{len(counts) - 1:06d}}}.tar")


def read_as(dataset: ShardDataset, ranks: int, workers: int, batch_size: int = 4) -> list[list[int]]:
    """The item indices each simulated rank reads in one epoch (a DataLoader of `workers` processes per rank)."""
    seen = []
    for rank in range(ranks):
        dataset.set_distributed(rank, ranks)
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
        seen.append([int(i) for batch in loader for i in batch["index"]])
    return seen


def test_prepare_builtin_counts_resume_and_refuses_other_options(tmp_path):
    out = tmp_path / "shards"
    index = prepare_shards(BuiltinSource("txt2img", "train", 20, size=8), out, 6, "train")
    assert index["complete"] and index["total"] == 20
    assert [(s["name"], s["count"], s["first_key"], s["last_key"]) for s in index["shards"]] == [
        ("train-000000.tar", 6, "000000000", "000000005"), ("train-000001.tar", 6, "000000006", "000000011"),
        ("train-000002.tar", 6, "000000012", "000000017"), ("train-000003.tar", 2, "000000018", "000000019")]
    assert index["source"]["kind"] == "builtin" and index["options"] == {"shard_size": 6, "prefix": "train"}
    assert json.loads((out / INDEX_FILE).read_text()) == index

    # An interrupted run: shard 2 missing, shard 3 half-written under its temporary name.
    kept = (out / "train-000000.tar").stat().st_mtime_ns
    original = (out / "train-000002.tar").read_bytes()
    (out / "train-000002.tar").unlink()
    (out / "train-000003.tar").rename(out / ".train-000003.tar.tmp-99")
    done = []
    again = prepare_shards(BuiltinSource("txt2img", "train", 20, size=8), out, 6, "train", workers=2,
                           progress=done.append)
    assert again == index and sum(done) == 20
    assert (out / "train-000000.tar").stat().st_mtime_ns == kept  # finished shards are kept
    assert (out / "train-000002.tar").read_bytes() == original  # and a shard is the same bytes when written again
    assert not list(out.glob(".*tmp*"))
    with pytest.raises(ValueError, match="another source or options"):
        prepare_shards(BuiltinSource("txt2img", "train", 20, size=8), out, 5, "train")


def make_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for i, name in enumerate(["cat/a", "cat/b", "dog/c", "dog/d", "dog/e"]):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(root / f"{name}.png")
        (root / f"{name}.txt").write_text(f"caption {i}\n")
    return root


def test_cli_prepares_a_folder_and_its_stream_equals_the_folder_dataset(tmp_path, capsys):
    folder = make_folder(tmp_path / "train")
    (folder / "dog" / "broken.png").write_bytes(b"not an image")
    (folder / "dog" / "broken.txt").write_text("never read\n")
    prepare_data.main(["--input", str(folder), "--output", str(tmp_path / "out"), "--shard-size", "2",
                       "--class-from-subfolders", "--workers", "1"])
    printed = capsys.readouterr().out
    assert "left out 1 unreadable image(s)" in printed and "dog/broken.png" in printed
    assert f"urls: {tmp_path / 'out'}/train-{{000000..000002}}.tar" in printed
    index = json.loads((tmp_path / "out" / INDEX_FILE).read_text())
    assert index["total"] == 5 and [s["count"] for s in index["shards"]] == [2, 1, 2]  # broken.png left out
    assert index["classes"] == ["cat", "dog"] and index["source"]["caption_source"] == "txt"

    stream = ShardDataset(f"{tmp_path / 'out'}/train-{{000000..000002}}.tar", size=8, flip_p=0.0, shuffle=False)
    reference = ImageFolderDataset(str(folder), size=8, flip_p=0.0, class_from_subfolders=True)
    items = list(stream)
    assert [item["index"] for item in items] == [0, 1, 3, 4, 5]  # 2 is broken.png
    for item in items:
        expected = reference[item["index"]]
        np.testing.assert_array_equal(item["image"], expected["image"])  # the folder dataset's pixels
        assert {k: item[k] for k in ("caption", "class_label", "human_label")} == {
            k: expected[k] for k in ("caption", "class_label", "human_label")}
    assert stream.classes == ["cat", "dog"]
    assert list(dataset_captions(stream)) == [f"caption {i}" for i in range(5)]


@pytest.mark.parametrize("caption_source", ["jsonl", "csv"])
def test_metadata_captions_are_read(caption_source, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "x.png")
    if caption_source == "jsonl":
        (folder / "metadata.jsonl").write_text('{"file_name": "x.png", "text": "from jsonl"}\n')
    else:
        (folder / "metadata.csv").write_text("file_name,text\nx.png,from csv\n")
    prepare_shards(FolderSource(str(folder)), tmp_path / "out", 4, "train")
    assert [item["caption"] for item in ShardDataset(str(tmp_path / "out" / "train-000000.tar"), size=8)] == [
        f"from {caption_source}"]


def test_segments_wrap_around_and_pass_over_empty_shards():
    assert list(segments([3, 0, 2], 2, 5)) == [(0, 2, 1), (2, 0, 2), (0, 0, 2)]


@pytest.mark.parametrize("counts", [UNEQUAL, (5, 9, 3, 8, 1, 7, 4)], ids=["36 items", "37 items"])
def test_two_ranks_of_two_workers_read_every_item_once_per_epoch(counts, tmp_path):
    urls = write_unequal_shards(tmp_path, counts)
    total = sum(counts)
    dataset = ShardDataset(urls, size=8, shuffle_buffer=5, seed=3)
    first = read_as(dataset, ranks=2, workers=2)
    per_slot = -(-total // 4)
    assert [len(keys) for keys in first] == [2 * per_slot] * 2  # the same number of items, so of batches, per rank
    seen = Counter(first[0] + first[1])
    assert set(seen) == set(range(total))  # every item ...
    assert sum(seen.values()) - total == 4 * per_slot - total  # ... once, but for the padding of fewer than 4 items
    # The next epoch (set here: each worker's copy of a persistent loader counts its own): another shard order and
    # buffer, the same guarantees.
    dataset.set_epoch(1)
    second = read_as(dataset, ranks=2, workers=2)
    assert second != first and set(second[0] + second[1]) == set(range(total))


def test_brace_list_and_pipe_urls_read_the_same_items(tmp_path):
    pattern = write_unequal_shards(tmp_path, (3, 2))
    names = [str(tmp_path / shard_name("train", k)) for k in range(2)]
    expected = [0, 1, 2, 3, 4]

    def indices(urls, **kwargs):
        return [item["index"] for item in ShardDataset(urls, size=8, shuffle=False, **kwargs)]

    assert indices(pattern) == indices(names) == indices("::".join(names)) == expected
    pipes = [f"pipe:cat {name}" for name in names]
    assert indices(pipes, index=str(tmp_path / INDEX_FILE)) == expected
    with pytest.raises(ValueError, match="set 'index'"):
        ShardDataset(pipes)


def test_a_damaged_shard_is_skipped_with_one_line_naming_it_and_the_epoch_goes_on(tmp_path, caplog):
    urls = write_unequal_shards(tmp_path)
    damaged, cut_short = tmp_path / shard_name("train", 1), tmp_path / shard_name("train", 5)
    with tarfile.open(damaged) as tar:
        members = tar.getmembers()
    damaged.write_bytes(damaged.read_bytes()[:members[8].offset_data + 100])  # inside member 8: the third item's .png
    with tarfile.open(cut_short) as tar:
        members = tar.getmembers()
    cut_short.write_bytes(cut_short.read_bytes()[:members[4].offset])  # at a header: only the index tells
    bad_image = tmp_path / shard_name("train", 3)
    data = bad_image.read_bytes()
    bad_image.write_bytes(data.replace(b"\x89PNG", b"\x89PNX", 1))  # an image that does not decode
    dataset = ShardDataset(urls, size=8, shuffle=False)
    dataset.set_distributed(0, 1)
    with caplog.at_level(logging.WARNING, logger="ldm.data.shards"):
        items = list(dataset)
    assert len(items) == sum(UNEQUAL)  # the slot read on past its part to make up what was lost
    warnings = [r.getMessage() for r in caplog.records]
    assert any(f"shard {damaged}, member 000000007.png: ReadError" in w for w in warnings), warnings
    assert any(f"shard {cut_short}, member after 000000026: the shard ends after 1 of the 7 items" in w
               for w in warnings), warnings
    assert 5 in [item["index"] for item in items] and 6 in [item["index"] for item in items]  # before the damage
    assert any(f"shard {bad_image}, member 000000017.png" in w for w in warnings), warnings
    assert all("\n" not in w for w in warnings) and dataset.skipped_count() == len(warnings)


def test_user_errors_name_the_problem(tmp_path, monkeypatch):
    urls = write_unequal_shards(tmp_path / "shards", (2,))
    with pytest.raises(FileNotFoundError, match="cannot read the shard index .*ldm-prepare-data"):
        ShardDataset(urls, index=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="not listed in the index"):
        ShardDataset(str(tmp_path / "shards" / "other-000000.tar"), index=str(tmp_path / "shards" / INDEX_FILE))
    with pytest.raises(SystemExit, match="--input .*no such folder"):
        monkeypatch.setattr(sys, "argv", ["ldm-prepare-data", "--input", str(tmp_path / "nothing"), "--output",
                                          str(tmp_path / "out")])
        prepare_data.cli()
    images = tmp_path / "images"
    images.mkdir()
    for output in (images, images / "shards"):
        with pytest.raises(SystemExit, match="--output .* is inside --input .*; write the shards to a folder outside"):
            monkeypatch.setattr(sys, "argv", ["ldm-prepare-data", "--input", str(images), "--output", str(output)])
            prepare_data.cli()
    assert sorted(images.iterdir()) == []  # nothing written
    monkeypatch.setitem(sys.modules, "webdataset", None)  # not installed
    with pytest.raises(ConfigError, match=r'pip install "ldm\[shards\]"'):
        ShardDataset(urls)


def test_the_data_module_tells_a_stream_its_rank(tmp_path):
    from ldm.data.datamodule import DataModuleFromConfig

    urls = write_unequal_shards(tmp_path)
    data = DataModuleFromConfig(batch_size=4, num_workers=0, train={
        "target": "ldm.data.shards.ShardDataset", "params": {"urls": urls, "size": 8}})

    class Trainer:  # what the data module reads of Lightning's trainer
        global_rank, world_size, current_epoch = 1, 2, 0

    data.trainer = Trainer()
    data.setup("fit")
    batches = list(data.train_dataloader())
    assert sum(len(b["index"]) for b in batches) == sum(UNEQUAL) // 2
    assert batches[0]["image"].shape == (4, 8, 8, 3) and isinstance(batches[0]["caption"][0], str)
    assert batches[0]["attributes"].dtype == torch.int64  # the built-in item's fields, as ShapesDataset's
    assert os.environ.get("RANK") is None


class KeyRecorder(Callback):
    """Appends each training batch's item indices, with the rank and epoch, to ``<path>.<rank>``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        with open(f"{self.path}.{trainer.global_rank}", "a") as f:
            f.write(json.dumps({"epoch": trainer.current_epoch, "keys": batch["index"].tolist()}) + "\n")


def train_on_shards(tmp_path: Path, steps: int, *args: str) -> dict[int, list[list[int]]]:
    """main.py on configs/latent-diffusion/txt2img_shards.yaml with the tiny test model over 7 unequal shards of
    32x32 built-in items; returns the item indices each epoch's batches held, per rank."""
    urls = write_unequal_shards(tmp_path / "shards", size=32)
    record = tmp_path / "keys"
    run_main(["--base", "configs/latent-diffusion/txt2img_shards.yaml", str(TINY_TXT2IMG), "-t", "--no-test",
              "--max_steps", str(steps), f"data.params.train.params.urls={urls}",
              f"data.params.validation.params.urls={urls}", "data.params.train.params.size=32",
              "data.params.validation.params.size=32", "data.params.batch_size=3", "data.params.num_workers=2",
              "model.params.first_stage_config.params.ckpt_path=null", "model.params.unet_config.params.use_checkpoint=false",
              "model.params.cond_stage_config.vocabulary.min_count=1", "lightning.callbacks.image_logger.params.disabled=true",
              f"lightning.callbacks.keys.target={__name__}.KeyRecorder", f"lightning.callbacks.keys.params.path={record}",
              "--limit_val_batches", "1", "--val_check_interval", "4", "--enable_model_summary", "false", *args],
             tmp_path, timeout=400)
    epochs: dict[int, list[list[int]]] = {}
    for path in sorted(tmp_path.glob("keys.*")):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            epochs.setdefault(entry["epoch"], [[] for _ in range(2)])[int(path.suffix[1:])].extend(entry["keys"])
    return epochs


@pytest.mark.slow
def test_main_trains_on_the_shards_config_one_epoch_of_every_item(tmp_path):
    # 36 items, 2 workers x 6 batches of 3: an epoch is 12 steps, so 15 steps are a whole epoch and part of the next.
    epochs = train_on_shards(tmp_path, 15)
    assert sorted(epochs[0][0]) == list(range(sum(UNEQUAL))) and len(epochs[1][0]) == 3 * 3
    assert (only_run(tmp_path) / "vocab.txt").is_file()  # built from the shards' captions


@pytest.mark.slow
def test_two_ddp_processes_see_every_item_once_per_epoch(tmp_path):
    # Per rank 18 items: 2 workers x 3 batches of 3; 12 steps are two epochs.
    epochs = train_on_shards(tmp_path, 12, "--accelerator", "cpu", "--devices", "2",
                             "--strategy", "ddp_find_unused_parameters_true")  # the tiny text model leaves some unused
    assert sorted(epochs) == [0, 1]
    for ranks in epochs.values():
        assert len(ranks[0]) == len(ranks[1]) == 18
        assert sorted(ranks[0] + ranks[1]) == list(range(sum(UNEQUAL)))  # every item exactly once
    assert epochs[0] != epochs[1]  # a new shard order each epoch
