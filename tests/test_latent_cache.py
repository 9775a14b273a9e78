"""`cache_latents`: first-stage posteriors cached per dataset item (ldm/models/diffusion/latent_cache.py)."""
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.data.datamodule import DataModuleFromConfig
from ldm.data.folder import ImageFolderDataset
from ldm.data.shapes import ShapesTrain
from ldm.image_logs import log_images
from ldm.models.diffusion.ddpm import DDPM
from ldm.models.diffusion.latent_cache import LatentCache
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config

TINY_TXT2IMG = Path(__file__).resolve().parent / "configs" / "ldm_tiny_txt2img.yaml"
SHAPES_TRAIN = {"target": "ldm.data.shapes.ShapesTrain", "params": {"size": 32, "num_samples": 8}}


def tiny_txt2img(cache_latents=True):
    config = OmegaConf.load(TINY_TXT2IMG)
    config.model.params.cache_latents = cache_latents
    torch.manual_seed(0)
    model = instantiate_from_config(config.model)
    model.learning_rate = 1e-4
    return model


def shapes_batch(indices):
    dataset = ShapesTrain(size=32, num_samples=64)
    return torch.utils.data.default_collate([dataset[i] for i in indices])


def test_encodes_only_the_items_not_cached_yet():
    encoded = []

    def encoder(images):
        encoded.append(images.shape[0])
        return DiagonalGaussianDistribution(torch.cat([images, images.new_full(images.shape, -2.0)], dim=1))

    cache = LatentCache()
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 2, 2, 2)
    first = cache.encode(torch.tensor([10, 11, 12, 13]), images, encoder)
    second = cache.encode([12, 13, 14, 10], images[[2, 3, 0, 0]] + torch.tensor([0.0, 0.0, 7.0, 0.0]).view(4, 1, 1, 1),
                          encoder)
    assert encoded == [4, 1]  # only item 14 was new
    assert (cache.hits, cache.misses, len(cache)) == (3, 5, 5)
    torch.testing.assert_close(second.mean[[0, 1, 3]], first.mean[[2, 3, 0]], atol=0, rtol=0)
    assert float(second.mean[2].mean()) == 7.0
    torch.testing.assert_close(second.std, torch.full_like(second.std, float(np.exp(-1.0))))


def test_cached_latents_match_encoding_on_miss_and_on_hit():
    model = tiny_txt2img()
    model.train()
    batch = shapes_batch([3, 1, 4, 5])
    for visit in range(2):  # the first visit encodes (miss), the second reads the cache (hit)
        torch.manual_seed(visit)
        z_cached, _ = model.get_input(batch, "image")
        model.latent_cache, cache = None, model.latent_cache
        torch.manual_seed(visit)
        z_plain, _ = model.get_input(batch, "image")
        model.latent_cache = cache
        # Same posterior, same ε: the very same sample z = scale_factor · (mean + std·ε).
        assert torch.equal(z_cached, z_plain)
    assert (cache.misses, cache.hits) == (4, 4)
    assert not torch.equal(model.get_input(batch, "image")[0], z_cached)  # each visit draws a new ε


def test_validation_and_image_logging_never_read_the_cache():
    model = tiny_txt2img()
    model.eval()
    model.get_input(shapes_batch([0, 1]), "image")
    log_images(model, shapes_batch([0, 1]), N=2, sample=False)
    assert (model.latent_cache.hits, model.latent_cache.misses) == (0, 0)


def test_disk_cache_is_reused_and_invalidated_by_first_stage_weights_and_data_config(tmp_path):
    model = tiny_txt2img({"dir": str(tmp_path)})
    dataset = ShapesTrain(size=32, num_samples=8)
    model.latent_cache.open(model.first_stage_model, dataset, SHAPES_TRAIN)
    model.train()
    batch = shapes_batch([0, 1, 2])
    model.get_input(batch, "image")
    saved = model.latent_cache.save()
    assert saved.is_file() and model.latent_cache.save() is None  # nothing new to write the second time

    reopened = LatentCache(dir=tmp_path)
    reopened.open(model.first_stage_model, dataset, SHAPES_TRAIN)
    assert len(reopened) == 3 and reopened.path == saved
    expected = model.encode_first_stage(DDPM.get_input(model, batch, "image"))
    got = reopened.encode(batch["index"], torch.zeros(3, 3, 32, 32), lambda x: pytest.fail("should not encode"))
    assert torch.equal(got.mean, expected.mean) and torch.equal(got.std, expected.std)

    other_data = {"target": "ldm.data.shapes.ShapesTrain", "params": {"size": 32, "num_samples": 8, "seed": 1}}
    reopened.open(model.first_stage_model, dataset, other_data)
    assert len(reopened) == 0 and reopened.path != saved
    with torch.no_grad():
        next(model.first_stage_model.parameters()).add_(1e-3)
    reopened.open(model.first_stage_model, dataset, SHAPES_TRAIN)
    assert len(reopened) == 0 and reopened.path != saved  # changed weights: the old file is never read


def test_datasets_give_a_stable_index_per_item(tmp_path):
    shapes = ShapesTrain(size=32, num_samples=16)
    assert [shapes[i]["index"] for i in (0, 7, 15)] == [0, 7, 15]
    for name in ("a", "b", "c"):
        Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(tmp_path / f"{name}.png")
    (tmp_path / "b.png").write_bytes(b"not a png")
    folder = ImageFolderDataset(str(tmp_path), size=8, flip_p=0.0)
    assert not folder.random_augmentation
    assert [folder[i]["index"] for i in range(3)] == [0, 2, 2]  # item 1 is unreadable: it falls through to c.png
    assert ImageFolderDataset(str(tmp_path), size=8).random_augmentation  # flips by default


def test_what_the_cache_refuses(tmp_path):
    cache = LatentCache(max_items=4)
    first_stage = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="augments at random"):
        cache.open(first_stage, ImageFolderDataset(str(_one_image(tmp_path)), size=8, crop="random"), None)
    with pytest.raises(ValueError, match="max_items=4 .* has 8 items; lower its num_samples"):
        cache.open(first_stage, ShapesTrain(size=32, num_samples=8), SHAPES_TRAIN)
    with pytest.raises(ValueError, match="names its file after the train data's config"):
        LatentCache(dir=tmp_path).open(first_stage, ShapesTrain(size=32, num_samples=4), None)
    with pytest.raises(KeyError, match="needs an 'index' entry"):
        cache.encode(None, torch.zeros(1, 3, 8, 8), lambda x: x)
    with pytest.raises(ValueError, match="unknown key.*'size'"):
        LatentCache.from_option({"size": 3})
    assert LatentCache.from_option(False) is None and LatentCache.from_option(True).dir is None


def _one_image(root: Path) -> Path:
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(root / "x.png")
    return root


def test_training_run_fills_the_cache_once_and_keeps_scale_by_std(tmp_path):
    model = tiny_txt2img({"dir": str(tmp_path / "latents")})
    data = DataModuleFromConfig(batch_size=4, num_workers=0, train=SHAPES_TRAIN,
                                validation={"target": "ldm.data.shapes.ShapesValidation",
                                            "params": {"size": 32, "num_samples": 4}})
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, val_check_interval=2,
                         limit_val_batches=1, num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    trainer.fit(model, data)
    cache = model.latent_cache
    # 6 steps of 4 over a pool of 8: the first epoch encodes all 8 items, the next two read them.
    assert (cache.misses, cache.hits, len(cache)) == (8, 16, 8)
    assert float(model.scale_factor) != 1.0  # scale_by_std measured on the first batch
    assert len(list((tmp_path / "latents").glob("latents-*.safetensors"))) == 1
