import contextlib
"""The config system: loading with provenance, instantiation, and readable errors."""
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.config import ConfigError, load_configs, merge_onto
from ldm.finetune import apply_init_from
from ldm.model_files import WEIGHTS_SUFFIXES
from ldm.new_words import prepare_new_words
from ldm.util import instantiate_from_config

REPO = Path(__file__).resolve().parents[1]


class Widget:
    def __init__(self, width: int, scale: float = 1.0, name: str = "w", tags: list[str] | None = None,
                 sub: dict | None = None) -> None:
        self.width, self.scale, self.name, self.tags = width, scale, name, tags
        self.sub = instantiate_from_config(sub) if sub is not None else None


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_instantiate_plain_dict_and_sentinels():
    obj = instantiate_from_config({"target": "torch.nn.Linear", "params": {"in_features": 2, "out_features": 3}})
    assert isinstance(obj, torch.nn.Linear) and obj.weight.shape == (3, 2)
    assert instantiate_from_config({"target": "torch.nn.Identity"}).__class__ is torch.nn.Identity
    assert instantiate_from_config("__is_first_stage__") is None
    assert instantiate_from_config("__is_unconditional__") is None


def test_merge_left_to_right_and_overrides(tmp_path):
    a = _write(tmp_path, "a.yaml", "model:\n  target: tests.test_config.Widget\n  params:\n    width: 2\n    scale: 1\n")
    b = _write(tmp_path, "b.yaml", "model:\n  params:\n    width: 5\n")
    cfg = load_configs([a, b], overrides=["model.params.scale=0.5"])
    w = instantiate_from_config(cfg.model)
    assert (w.width, w.scale) == (5, 0.5)


def test_unknown_target_names_key_and_file(tmp_path):
    a = _write(tmp_path, "a.yaml", "model:\n  target: tests.test_config.Wigdet\n")
    cfg = load_configs([a])
    with pytest.raises(ConfigError) as e:
        instantiate_from_config(cfg.model)
    msg = str(e.value)
    assert "'model.target'" in msg and str(a) in msg and "Wigdet" in msg


def test_missing_required_param_names_key_and_file(tmp_path):
    a = _write(tmp_path, "a.yaml", "model:\n  target: tests.test_config.Widget\n  params:\n    scale: 2.0\n")
    cfg = load_configs([a])
    with pytest.raises(ConfigError) as e:
        instantiate_from_config(cfg.model)
    msg = str(e.value)
    assert "model.params.width" in msg and "missing required parameter 'width'" in msg and str(a) in msg


def test_wrong_type_names_key_and_file(tmp_path):
    a = _write(tmp_path, "a.yaml", "model:\n  target: tests.test_config.Widget\n  params:\n    width: 2\n")
    b = _write(tmp_path, "b.yaml", "model:\n  params:\n    scale: fast\n")
    cfg = load_configs([a, b])
    with pytest.raises(ConfigError) as e:
        instantiate_from_config(cfg.model)
    msg = str(e.value)
    assert "model.params.scale" in msg and str(b) in msg and "expected float" in msg and "'fast'" in msg


def test_unknown_param_lists_accepted(tmp_path):
    a = _write(tmp_path, "a.yaml", "model:\n  target: tests.test_config.Widget\n  params:\n    width: 2\n    widht: 3\n")
    with pytest.raises(ConfigError) as e:
        instantiate_from_config(load_configs([a]).model)
    assert "model.params.widht" in str(e.value) and "width" in str(e.value).split("accepts:")[1]


def test_nested_error_keeps_path_through_constructor(tmp_path):
    a = _write(tmp_path, "a.yaml", "model:\n  target: tests.test_config.Widget\n  params:\n    width: 2\n"
                                   "    sub:\n      target: tests.test_config.Widget\n      params:\n        width: x\n")
    with pytest.raises(ConfigError) as e:
        instantiate_from_config(load_configs([a]).model)
    assert "model.params.sub.params.width" in str(e.value) and str(a) in str(e.value)


def test_override_is_reported_as_command_line(tmp_path):
    a = _write(tmp_path, "a.yaml", "model:\n  target: tests.test_config.Widget\n  params:\n    width: 2\n")
    with pytest.raises(ConfigError) as e:
        instantiate_from_config(load_configs([a], overrides=["model.params.width=wide"]).model)
    assert "command line" in str(e.value)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_configs([tmp_path / "nope.yaml"])
    bad = _write(tmp_path, "bad.yaml", "model: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_configs([bad])


def _targets(node, path=""):
    if isinstance(node, dict):
        if "target" in node and isinstance(node["target"], str):
            yield path, node
        for k, v in node.items():
            yield from _targets(v, f"{path}.{k}" if path else k)


SHIPPED = sorted(p for p in (REPO / "configs").rglob("*.yaml")) + sorted((REPO / "models").rglob("config.yaml"))
@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split in ("train", "validation"):
        for i in range(4):  # in class sub-folders, which configs without class labels also read
            (root / split / f"class_{i % 2}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / split / f"class_{i % 2}" / f"{i}.png")
    return root


# Configs that are overlays: they go on top of a shipped config (`--base base.yaml overlay.yaml`), as their
# headers say.
OVERLAY_BASES = {"class2img_adm.yaml": "class2img.yaml", "sr_folder.yaml": "sr_shapes.yaml",
                 "semantic2img_folder.yaml": "semantic2img_shapes.yaml"}


@pytest.fixture(scope="module")
def semantic_folder(tmp_path_factory) -> Path:
    """images/ and labels/ PNGs (37 labels) for SemanticFolder configs."""
    root = tmp_path_factory.mktemp("semantic")
    rng = np.random.default_rng(0)
    for folder in ("images", "labels"):
        (root / folder).mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        Image.fromarray(rng.integers(0, 37, (40, 40), dtype=np.uint8), mode="L").save(root / "labels" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def shard_folder(image_folder, tmp_path_factory) -> Path:
    """The image folder's splits as WebDataset shards (<root>/<split>/<split>-000000.tar), for the shard configs."""
    from ldm.data.shard_writer import FolderSource, prepare_shards

    root = tmp_path_factory.mktemp("shards")
    for split in ("train", "validation"):
        prepare_shards(FolderSource(str(image_folder / split), class_from_subfolders=True), root / split, 3, split)
    return root


def _dataset_urls(node, path=""):
    """(key path of the `urls:` param, the split folder it names) of every shard dataset in a config."""
    if isinstance(node, dict):
        if node.get("target") == "ldm.data.shards.ShardDataset":
            yield f"{path}.params.urls", Path(node["params"]["urls"]).parent.name
        for k, v in node.items():
            yield from _dataset_urls(v, f"{path}.{k}" if path else k)


def _dataset_roots(node, path=""):
    """(key path of the `root:` param, its value, the dataset class name) of every folder dataset in a config."""
    if isinstance(node, dict):
        if node.get("target") in ("ldm.data.folder.ImageFolderDataset", "ldm.data.semantic.SemanticFolder",
                                  "ldm.data.mix.FolderMixDataset"):
            yield f"{path}.params.root", node["params"]["root"], node["target"].rpartition(".")[2]
        for k, v in node.items():
            yield from _dataset_roots(v, f"{path}.{k}" if path else k)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_target_in_shipped_configs_imports_and_builds(path, monkeypatch, random_vgg16_file, image_folder,
                                                             semantic_folder, shard_folder, tmp_path):
    """Every `target` resolves and the model, data and callbacks build as main.py builds them.

    Real-data configs point at `data/images/...`; they are built on a small folder made here, and LPIPS
    on a random-weights VGG16 file, since the real weights are not shipped.
    """
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("LDM_VGG16_WEIGHTS", str(random_vgg16_file))
    paths = [path.parent / OVERLAY_BASES[path.name], path] if path.name in OVERLAY_BASES else [path]
    raw = OmegaConf.to_container(load_configs(paths))
    overrides = [f"{key}={semantic_folder if kind == 'SemanticFolder' else image_folder / Path(root).name}"
                 for key, root, kind in _dataset_roots(raw)]
    overrides += [f"{key}={shard_folder / split / split}-{{000000..000001}}.tar" for key, split in _dataset_urls(raw)]
    cfg = load_configs(paths, overrides=overrides)
    init_from = Path(str(OmegaConf.select(cfg, "model.params.init_from") or ""))
    if init_from.suffix in WEIGHTS_SUFFIXES and not init_from.is_file():
        # Released weights (Stable Diffusion's) are not here: the architecture `init_config` names, without them.
        cfg.model = merge_onto(load_configs([cfg.model.params.init_config]).model, cfg.model)
        for key in ("init_from", "init_config"):
            cfg.model.params.pop(key)
    apply_init_from(cfg)  # a fine-tuning config: the base model's architecture under its own settings
    prepare_new_words(cfg, tmp_path / "run")  # and the words it adds to the base's vocabulary, as main.py does
    from ldm.config import get_obj_from_str
    found = list(_targets(OmegaConf.to_container(cfg)))
    assert found, f"{path} has no target"
    for key, node in found:
        get_obj_from_str(node["target"])
    if str(OmegaConf.select(cfg, "model.params.cond_stage_config.target")).endswith("FrozenCLIPEmbedder"):
        # Stable Diffusion's CLIP comes from the Hub; here from a local copy of its config and a small tokenizer.
        from tests.test_stable_diffusion import VIT_L14_TEXT, write_clip_dir

        clip = write_clip_dir(tmp_path / "clip", **VIT_L14_TEXT)
        cfg.model.params.cond_stage_config.params.version = str(clip)
    first_stage_ckpt = OmegaConf.select(cfg, "model.params.first_stage_config.params.ckpt_path")
    if first_stage_ckpt is not None and not Path(first_stage_ckpt).is_file():
        # The user's own first stage (made first, as the config's header says): build without its weights.
        cfg.model.params.first_stage_config.params.ckpt_path = None
    # Models of the released sizes (up to 1.5 B parameters) are built without memory on the meta device.
    large = (OmegaConf.select(cfg, "model.params.unet_config.params.model_channels") or 0) >= 128
    with torch.device("meta") if large else contextlib.nullcontext():
        model = instantiate_from_config(cfg.model)
    assert isinstance(model, torch.nn.Module)
    if "data" in cfg:
        data = instantiate_from_config(cfg.data)
        data.setup("fit")
        batch = next(iter(data.train_dataloader()))
        assert batch["image"].ndim == 4
    lightning = OmegaConf.to_container(cfg.lightning) if "lightning" in cfg else {}
    for key, node in lightning.get("callbacks", {}).items():
        instantiate_from_config(node)


def test_an_overlay_that_changes_a_target_replaces_that_nodes_params(tmp_path):
    # A user's data block dropped onto a shipped config (README, "your own images"): the folder dataset must not
    # inherit the built-in dataset's `num_samples` ("unknown parameter 'num_samples' for ImageFolderDataset").
    overlay = tmp_path / "my_data.yaml"
    overlay.write_text("data:\n  params:\n    batch_size: 8\n    train:\n      target: ldm.data.folder.ImageFolderDataset\n"
                       "      params: {root: my_images, size: 32}\n")
    config = load_configs([REPO / "configs/autoencoder/autoencoder_kl_shapes_f4.yaml", overlay])
    assert OmegaConf.to_container(config.data.params.train) == {
        "target": "ldm.data.folder.ImageFolderDataset", "params": {"root": "my_images", "size": 32}}
    assert config.data.params.batch_size == 8 and config.data.params.validation.target == "ldm.data.shapes.ShapesValidation"
    # The same target merges as before: only the given params change.
    same = tmp_path / "same.yaml"
    same.write_text("data:\n  params:\n    train:\n      target: ldm.data.shapes.ShapesTrain\n      params: {size: 64}\n")
    merged = load_configs([REPO / "configs/autoencoder/autoencoder_kl_shapes_f4.yaml", same])
    assert merged.data.params.train.params.size == 64 and "num_samples" in merged.data.params.train.params
