"""Super-resolution, semantic synthesis, layout-to-image and `adm` class conditioning: their data, configs (a
short `main.py -t` run each), API functions, scripts and metrics."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.data.layout import (CELL_TOKEN_OFFSET, GRID, LAYOUT_LENGTH, LAYOUT_VOCAB_SIZE, ShapesLayout, layout_tokens,
                             read_layout_file, scene_layout, tokens_to_layout)
from ldm.data.semantic import NUM_SEMANTIC_CLASSES, SemanticFolder, ShapesSemantic, semantic_label_map
from ldm.data.shapes import COLOURS, SHAPES, ShapesValidation
from ldm.data.superres import SuperResolutionPairs, bicubic_downsample, bicubic_upsample, degrade
from ldm.evaluation.attribute_classifier import load_attribute_classifier
from ldm.evaluation.conditioning import image_quality, object_agreement
from ldm.inference import layout_to_image, load_model, semantic_to_image, super_resolve
from ldm.models.diffusion.ddpm import DiffusionWrapper
from tests.helpers import load_script
from tests.test_main import REPO, load_ckpt, only_run, run_main
from tests.tiny_models import write_model_dir

CONFIGS = {
    "superres": "configs/latent-diffusion/sr_shapes.yaml",
    "semantic2img": "configs/latent-diffusion/semantic2img_shapes.yaml",
    "layout2img": "configs/latent-diffusion/layout2img_shapes.yaml",
}
SHAPES_TRAIN = {"target": "ldm.data.shapes.ShapesTrain", "params": {"size": 32, "num_samples": 8}}


# ---------------------------------------------------------------------------------------------------- data


def test_superres_pairs_are_deterministic_degradations_at_a_quarter_size():
    for degradation in ("bicubic", "bsr_light"):
        data = SuperResolutionPairs(SHAPES_TRAIN, factor=4, degradation=degradation)
        item, again = data[3], data[3]
        assert item["LR_image"].shape == (8, 8, 3) and item["image"].shape == (32, 32, 3)
        assert np.array_equal(item["LR_image"], again["LR_image"])  # the same in every epoch and worker
        assert -1 <= item["LR_image"].min() and item["LR_image"].max() <= 1
    image = data[0]["image"]
    bicubic = bicubic_downsample(image, 4)
    # The blind degradation differs per image and from plain bicubic; bicubic keeps the mean colour.
    blind = [degrade(image, 4, "bsr_light", np.random.default_rng([0, i])) for i in range(2)]
    assert not np.allclose(blind[0], blind[1]) and not np.allclose(blind[0], bicubic)
    assert abs(bicubic.mean() - image.mean()) < 0.02
    with pytest.raises(ValueError, match="multiples of 4"):
        bicubic_downsample(image[:30], 4)
    with pytest.raises(ValueError, match="unknown degradation 'blur'"):
        SuperResolutionPairs(SHAPES_TRAIN, degradation="blur")


def test_semantic_maps_mark_each_object_with_its_class():
    data = ShapesSemantic(split="validation", size=32, num_samples=16)
    for index in range(16):
        item, scene = data[index], data.scene(index)
        labels = item["label_map"]
        assert item["segmentation"].shape == (32, 32, NUM_SEMANTIC_CLASSES)
        assert np.array_equal(item["segmentation"].argmax(-1), labels)
        expected = {0} | {1 + obj.shape * len(COLOURS) + obj.colour for obj in scene.objects}
        assert set(np.unique(labels)) == expected
        # Object pixels are the saturated object colour, background pixels are not.
        for obj in scene.objects:
            region = labels == 1 + obj.shape * len(COLOURS) + obj.colour
            colour = (item["image"][region].mean(0) + 1) / 2
            assert np.abs(colour - np.asarray(obj.rgb)).max() < 0.1
    # The map is drawn from the scene, so it is as sharp as the size asked for: the same objects at 64 pixels.
    assert set(np.unique(semantic_label_map(data.scene(0), 64))) == set(np.unique(data[0]["label_map"]))


def test_semantic_folder_reads_label_pngs_and_names_problems(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    label = np.zeros((16, 16), np.uint8)
    label[4:8, 4:8] = 2
    Image.fromarray(label, mode="L").save(tmp_path / "labels" / "a.png")
    item = SemanticFolder(tmp_path, num_classes=3, size=8)[0]
    assert item["segmentation"].shape == (8, 8, 3) and item["label_map"][2:4, 2:4].tolist() == [[2, 2], [2, 2]]
    with pytest.raises(ValueError, match="0..1.*num_classes"):
        SemanticFolder(tmp_path, num_classes=2, size=8)[0]
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "images" / "b.png")
    with pytest.raises(FileNotFoundError, match="no label PNG .* for b.png"):
        SemanticFolder(tmp_path, num_classes=3)


def test_layout_tokens_encode_class_and_box_corners(tmp_path):
    data = ShapesLayout(split="validation", size=32, num_samples=8)
    for index in range(8):
        item, scene = data[index], data.scene(index)
        tokens = item["objects_bbox"]
        assert tokens.shape == (LAYOUT_LENGTH,) and 0 <= tokens.min() and tokens.max() < LAYOUT_VOCAB_SIZE
        decoded = tokens_to_layout(tokens)
        assert [label for label, _ in decoded] == [label for label, _ in scene_layout(scene)]
        for (_, box), (_, truth) in zip(decoded, scene_layout(scene)):
            assert np.abs(np.asarray(box) - np.asarray(truth)).max() <= 1 / GRID  # one grid cell
    assert layout_tokens([]).tolist() == [0] * LAYOUT_LENGTH
    assert layout_tokens([(0, (0.0, 0.0, 1.0, 1.0))])[1:3].tolist() == [CELL_TOKEN_OFFSET, CELL_TOKEN_OFFSET + GRID ** 2 - 1]

    # A JSON layout comes back in slot order: the upper object of a stacked pair first.
    path = tmp_path / "layout.json"
    path.write_text(json.dumps([{"shape": "star", "colour": "green", "box": [0.4, 0.6, 0.6, 0.9]},
                                {"shape": "circle", "colour": "red", "box": [0.4, 0.1, 0.6, 0.4]}]))
    assert [label for label, _ in read_layout_file(path)] == [SHAPES.index("circle") * 6, SHAPES.index("star") * 6 + 3]
    for bad, message in (([{"shape": "blob", "colour": "red", "box": [0, 0, 1, 1]}], "unknown shape"),
                         ([{"shape": "star", "colour": "red", "box": [0.5, 0, 0.2, 1]}], "0 <= x0 < x1"),
                         ({"shape": "star"}, "non-empty JSON list")):
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=message):
            read_layout_file(path)


# ------------------------------------------------------------------------------------------------- metrics


def test_object_agreement_and_image_quality_tell_right_from_wrong():
    classifier = load_attribute_classifier()
    data = ShapesValidation(size=32, num_samples=64)
    images = torch.stack([torch.as_tensor(data[i]["image"]) for i in range(64)]).permute(0, 3, 1, 2)
    scenes = [data.scene(i) for i in range(64)]
    right = object_agreement(classifier, images, scenes)
    wrong = object_agreement(classifier, images.roll(1, dims=0), scenes)  # each image against another's scene
    assert right["objects"] > 0.9 and wrong["objects"] < 0.3
    assert set(right) == {"shape", "colour", "position", "objects"}
    blurred = bicubic_upsample(torch.nn.functional.avg_pool2d(images, 4), 4)
    quality = image_quality(blurred, images)
    assert 10 < quality["psnr"] < 30 and 0 < quality["ssim"] < 1
    assert image_quality(images, images)["ssim"] == pytest.approx(1.0, abs=1e-4)


# ------------------------------------------------------------------------------------ configs and training


def fast_overrides(name: str) -> list[str]:
    data = "data.params.{}.params.dataset.params" if name == "superres" else "data.params.{}.params"
    # The layout model starts from the shipped text model's weights, noise schedule (1,000 steps) included.
    timesteps = [] if name == "layout2img" else ["model.params.timesteps=50"]
    return [f"{data.format('train')}.num_samples=16", f"{data.format('validation')}.num_samples=4",
            "data.params.batch_size=4", *timesteps,
            "lightning.callbacks.image_logger.params.batch_frequency=2",
            "lightning.callbacks.image_logger.params.max_images=2", "--limit_val_batches", "1",
            "--val_check_interval", "2", "--log_every_n_steps", "1", "--enable_model_summary", "false"]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_task_config_trains_and_logs_its_condition(name, tmp_path):
    proc = run_main(["--base", CONFIGS[name], "-t", "--no-test", "--max_steps", "2", *fast_overrides(name)], tmp_path)
    logdir = only_run(tmp_path)
    assert load_ckpt(logdir / "checkpoints" / "last.ckpt")["global_step"] == 2
    grids = {p.name.split("_gs-")[0] for p in (logdir / "images" / "train").glob("*.png")}
    assert {"inputs", "conditioning", "samples"} <= grids, grids
    condition = np.asarray(Image.open(next((logdir / "images" / "train").glob("conditioning_*.png"))))
    assert condition.std() > 5  # the low-resolution input, the coloured map or the boxes: not a blank image
    if name == "layout2img":
        assert "samples_cfg_scale_3.00" in grids  # trained with dropped layouts: guidance against the empty one
        assert "Restored from models/ldm/txt2img-shapes/model.safetensors" in proc.stdout
        assert "scale_by_std: latent std" not in proc.stdout  # the text model's latent scale is kept


def test_adm_class_conditioning_trains(tmp_path):
    run_main(["--base", "configs/latent-diffusion/class2img.yaml", "configs/latent-diffusion/class2img_adm.yaml",
              "-t", "--no-test", "--max_steps", "2", *fast_overrides("class2img")], tmp_path)
    state = load_ckpt(only_run(tmp_path) / "checkpoints" / "last.ckpt")["state_dict"]
    assert state["model.diffusion_model.label_emb.0.0.weight"].shape == (128, 64)  # the class vector's MLP


def test_adm_wrapper_gives_the_class_vector_to_the_unet():
    unet = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
            "params": dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1,
                           attention_resolutions=[], channel_mult=[1], num_head_channels=32,
                           num_classes="sequential", adm_in_channels=16)}
    wrapper = DiffusionWrapper(unet, "adm")
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    vector = torch.randn(2, 1, 16)  # a ClassEmbedder's output
    out = wrapper(x, t, c_crossattn=[vector])
    assert torch.equal(out, wrapper.diffusion_model(x, t, y=vector[:, 0]))
    with pytest.raises(ValueError, match="a vector of 16 per sample"):
        wrapper.diffusion_model(x, t, y=torch.zeros(2, 8))
    with pytest.raises(ValueError, match="adm_in_channels"):
        DiffusionWrapper({**unet, "params": {**unet["params"], "adm_in_channels": None}}, "adm")


# ---------------------------------------------------------------------------------- models, API and scripts


def random_model_dir(name: str, tmp_path_factory) -> str:
    """A model directory of the task's config with random weights (random first stage, 16 timesteps)."""
    config = OmegaConf.to_container(OmegaConf.load(REPO / CONFIGS[name]), resolve=True)
    params = config["model"]["params"]
    params["first_stage_config"]["params"].pop("ckpt_path")
    for init in ("ckpt_path", "ignore_keys"):  # the layout model's start from the text model: random here
        params.pop(init, None)
    params.update(timesteps=16, scale_by_std=False, use_ema=False, cache_latents=False)
    return str(write_model_dir(tmp_path_factory.mktemp(name), copy.deepcopy(config)))


@pytest.fixture(scope="module")
def task_models(tmp_path_factory) -> dict[str, str]:
    return {name: random_model_dir(name, tmp_path_factory) for name in CONFIGS}


def test_api_sizes_follow_the_condition_and_models_are_checked(task_models):
    superres = load_model(task_models["superres"])
    out = super_resolve(superres, torch.rand(2, 3, 12, 16) * 2 - 1, steps=2, seed=[0, 1], progress=False)
    assert out.shape == (2, 3, 48, 64)  # x4, any size: larger than the 8x8 of training
    semantic = load_model(task_models["semantic2img"])
    labels = torch.zeros(1, 48, 48, dtype=torch.long)
    labels[:, 8:24, 8:24] = 5
    assert semantic_to_image(semantic, labels, steps=2, progress=False).shape == (1, 3, 48, 48)
    with pytest.raises(ValueError, match="0..36"):
        semantic_to_image(semantic, labels + 40, steps=2, progress=False)
    layout = load_model(task_models["layout2img"])
    images = layout_to_image(layout, [[(0, (0.1, 0.1, 0.5, 0.5))], [(3, (0.5, 0.2, 0.9, 0.6)), (7, (0.1, 0.2, 0.4, 0.6))]],
                             steps=2, progress=False)
    assert images.shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="conditioned on 'LR_image'.*sr_shapes.yaml.*'segmentation'"):
        super_resolve(semantic, torch.zeros(1, 3, 8, 8), steps=2, progress=False)


def test_scripts_write_samples_and_a_grid_with_the_condition(task_models, tmp_path):
    low = tmp_path / "low.png"
    Image.fromarray((np.random.default_rng(0).random((8, 12, 3)) * 255).astype(np.uint8)).save(low)
    load_script("superres").main(["--input", str(low), "--config", task_models["superres"], "--steps", "2",
                                  "--n_samples", "2", "--bicubic", "--outdir", str(tmp_path / "sr")])
    assert Image.open(tmp_path / "sr" / "samples" / "00001.png").size == (48, 32)
    assert (tmp_path / "sr" / "bicubic" / "00000.png").is_file()
    assert Image.open(tmp_path / "sr" / "grid-0000.png").size == (4 * 48 + 5 * 2, 32 + 2 * 2)  # input, bicubic, 2

    script = load_script("semantic2img")
    script.main(["--write-example", "3", "--outdir", str(tmp_path / "sem")])
    script.main(["--label", str(tmp_path / "sem" / "label-3.png"), "--config", task_models["semantic2img"],
                 "--steps", "2", "--n_samples", "1", "--outdir", str(tmp_path / "sem")])
    sample = Image.open(tmp_path / "sem" / "samples" / "00000.png")
    assert sample.size == (32, 32) and sample.text["prompt"] == "semantic map label-3.png"
    with pytest.raises(SystemExit):
        script.main(["--label", str(low), "--config", task_models["semantic2img"], "--outdir", str(tmp_path / "x")])

    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps([{"shape": "circle", "colour": "red", "box": [0.1, 0.3, 0.4, 0.7]}]))
    load_script("layout2img").main(["--layout", str(layout), "--config", task_models["layout2img"], "--steps", "2",
                                    "--n_samples", "2", "--outdir", str(tmp_path / "lay")])
    assert Image.open(tmp_path / "lay" / "grid-0000.png").size == (3 * 32 + 4 * 2, 32 + 2 * 2)
    layout.write_text("[{\"shape\": \"circle\"}]")
    with pytest.raises(SystemExit):
        load_script("layout2img").main(["--layout", str(layout), "--config", task_models["layout2img"],
                                        "--outdir", str(tmp_path / "lay")])


@pytest.mark.parametrize("task", ["superres", "semantic2img"])
def test_folder_variant_trains_on_your_own_images(task, tmp_path):
    rng = np.random.default_rng(0)
    images = tmp_path / "data" / ("images" if task == "semantic2img" else "")
    images.mkdir(parents=True, exist_ok=True)
    (tmp_path / "data" / "labels").mkdir()
    for i in range(4):
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(images / f"{i}.png")
        Image.fromarray(rng.integers(0, 37, (40, 40)).astype(np.uint8), mode="L").save(tmp_path / "data" / "labels" /
                                                                                       f"{i}.png")
    if task == "superres":
        roots = [f"data.params.{split}.params.dataset.params.root={images}" for split in ("train", "validation")]
        base = ["configs/latent-diffusion/sr_shapes.yaml", "configs/latent-diffusion/sr_folder.yaml"]
    else:
        roots = [f"data.params.{split}.params.root={tmp_path / 'data'}" for split in ("train", "validation")]
        base = ["configs/latent-diffusion/semantic2img_shapes.yaml", "configs/latent-diffusion/semantic2img_folder.yaml"]
    run_main(["--base", *base, "-t", "--no-test", "--max_steps", "2", *roots, "data.params.batch_size=2",
              "model.params.timesteps=50", "lightning.callbacks.image_logger.params.batch_frequency=2",
              "--limit_val_batches", "1", "--val_check_interval", "2", "--enable_model_summary", "false"], tmp_path)
    assert load_ckpt(only_run(tmp_path) / "checkpoints" / "last.ckpt")["global_step"] == 2
