"""The CompVis U-Net <-> diffusers UNet2DConditionModel conversion: same outputs, exact round trips, errors.

Models are tiny and every parameter is random (zero-initialised output layers would hide mapping errors).
Outputs must agree to 1e-4 times the output scale (max |output|, at least 1): the two models run the same
float32 operations in slightly different orders.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from ldm.inference import load_model
from ldm.diffusers_bridge.unet import (
    LDM_UNET_PREFIX,
    NO_EFFECT_PARAMS,
    diffusers_unet_config,
    from_diffusers,
    from_diffusers_state_dict,
    to_diffusers,
    to_diffusers_state_dict,
    unet_params,
    unet_params_from_diffusers,
)
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.util import instantiate_from_config
from tests.unet_fixtures import randomize_

import diffusers  # noqa: E402  (the test extra installs it)
from tests.helpers import load_script
UNet2DConditionModel = diffusers.UNet2DConditionModel

REPO = Path(__file__).resolve().parents[1]
TXT2IMG = OmegaConf.to_container(OmegaConf.load(REPO / "configs/latent-diffusion/txt2img.yaml"))
BASE = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1,
            use_spatial_transformer=True, context_dim=16, legacy=False)
CONFIGS = {
    # The shipped text-to-image U-Net: head width 32, attention at every level.
    "txt2img": TXT2IMG["model"]["params"]["unet_config"]["params"],
    # A fixed head count (diffusers' attention_head_dim as an int).
    "fixed_heads": dict(BASE, channel_mult=[1, 2], attention_resolutions=[1, 2], num_heads=4),
    # Class labels and adaptive group norm, two ResBlocks per level, activation checkpointing, dropout.
    "class_scale_shift": dict(BASE, channel_mult=[1, 2], attention_resolutions=[2], num_head_channels=16,
                              num_classes=5, use_scale_shift_norm=True, num_res_blocks=2, use_checkpoint=True,
                              dropout=0.1),
    # Two transformer blocks per attention layer, attention skipping the middle level, other channel counts.
    "depth2_skip_level": dict(BASE, image_size=16, in_channels=3, out_channels=5, channel_mult=[1, 2, 2],
                              attention_resolutions=[1, 4], num_head_channels=32, transformer_depth=2),
}


def random_unet(params: dict, seed: int = 0) -> UNetModel:
    torch.manual_seed(seed)
    return randomize_(UNetModel(**params), seed).eval()


def inputs(unet: UNetModel, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    batch = {"x": torch.randn(2, unet.in_channels, unet.image_size, unet.image_size, generator=gen),
             "timesteps": torch.tensor([3.0, 517.5]),
             "context": torch.randn(2, 7, unet.context_dim, generator=gen)}
    if unet.num_classes is not None:
        batch["y"] = torch.tensor([0, unet.num_classes - 1])
    return batch


def assert_same_outputs(unet: UNetModel, model: UNet2DConditionModel) -> None:
    batch = inputs(unet)
    with torch.no_grad():
        ours = unet(**batch)
        theirs = model(batch["x"], batch["timesteps"], encoder_hidden_states=batch["context"],
                       class_labels=batch.get("y")).sample
    assert theirs.shape == ours.shape
    assert (ours - theirs).abs().max() <= 1e-4 * max(1.0, ours.abs().max().item())


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def diffusers_config(model: UNet2DConditionModel) -> dict:
    """A diffusers model's config as its config.json holds it (tuples as lists), without `_` entries."""
    return {k: v for k, v in json.loads(model.to_json_string()).items() if not k.startswith("_")}


@pytest.mark.parametrize("name", CONFIGS)
def test_same_outputs_and_exact_round_trip_from_ours(name):
    unet = random_unet(CONFIGS[name])
    model = to_diffusers(unet)
    assert model.training is False and model.dtype == torch.float32
    assert model.is_gradient_checkpointing == unet.use_checkpoint
    assert_same_outputs(unet, model)
    back = from_diffusers(model)
    assert unet_params(back) == unet_params(unet)
    assert_same_state(back.state_dict(), unet.state_dict())


@pytest.mark.parametrize("name", CONFIGS)
def test_mapping_is_the_one_diffusers_uses_for_compvis_checkpoints(name):
    """Our renaming equals diffusers' own converter of CompVis checkpoints on a whole LatentDiffusion dict."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    params = CONFIGS[name]
    state = random_unet(params).state_dict()
    config = diffusers_unet_config(params)
    theirs = convert_ldm_unet_checkpoint({LDM_UNET_PREFIX + k: v for k, v in state.items()}, config)
    ours = to_diffusers_state_dict(state, params)
    assert sorted(ours) == sorted(theirs)
    assert all(ours[k] is theirs[k] for k in ours)


def test_heads_follow_num_head_channels_where_diffusers_own_config_says_8():
    """diffusers' create_unet_diffusers_config_from_ldm leaves attention_head_dim at 8 heads here."""
    config = diffusers_unet_config(CONFIGS["depth2_skip_level"])
    assert config["attention_head_dim"] == [1, 2, 2]  # 32, 64, 64 channels / 32 per head
    assert config["down_block_types"] == ["CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"]
    assert config["up_block_types"] == ["CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"]
    assert config["transformer_layers_per_block"] == 2 and config["out_channels"] == 5
    assert diffusers_unet_config(CONFIGS["fixed_heads"])["attention_head_dim"] == 4


def test_config_sets_every_diffusers_argument_and_fixed_values_are_the_defaults():
    """Every UNet2DConditionModel argument is decided, and a key missing from a config means our value."""
    from ldm.diffusers_bridge.unet import _FIXED_CONFIG

    signature = inspect.signature(UNet2DConditionModel.__init__).parameters
    config = diffusers_unet_config(CONFIGS["txt2img"])
    assert set(config) == set(signature) - {"self"}
    assert {k: signature[k].default for k in _FIXED_CONFIG} == _FIXED_CONFIG


def sd_like_diffusers_model() -> UNet2DConditionModel:
    """A diffusers-native U-Net laid out as Stable Diffusion v1 (no attention at the last level, int heads)."""
    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2, num_class_embeds=3,
    )
    return randomize_(model).eval()


def test_exact_round_trip_from_diffusers():
    model = sd_like_diffusers_model()
    unet = from_diffusers(model)
    assert unet.num_heads == 2 and unet.num_head_channels == -1 and unet.attention_resolutions == (1,)
    assert_same_outputs(unet, model)
    again = to_diffusers(unet)
    assert diffusers_config(again) == diffusers_config(model)
    assert_same_state(again.state_dict(), model.state_dict())


def test_head_width_lists_come_back_as_num_head_channels():
    config = diffusers_unet_config(CONFIGS["depth2_skip_level"])
    params = unet_params_from_diffusers(config)
    assert (params["num_heads"], params["num_head_channels"]) == (-1, 32)
    assert unet_params_from_diffusers(json.loads(json.dumps(config))) == params  # as read from config.json


def test_params_with_no_diffusers_place_come_back_canonical_with_the_same_network():
    params = dict(CONFIGS["fixed_heads"], legacy=True, use_new_attention_order=True, num_heads_upsample=2,
                  attention_resolutions=[8, 2, 1])
    unet = random_unet(params)
    back = from_diffusers(to_diffusers(unet))
    expected = dict(unet_params(unet), **NO_EFFECT_PARAMS, attention_resolutions=[1, 2])
    assert unet_params(back) == expected
    assert_same_state(back.state_dict(), unet.state_dict())


def test_conversion_keeps_dtype_and_train_mode():
    unet = random_unet(CONFIGS["fixed_heads"]).to(torch.bfloat16).train()
    model = to_diffusers(unet)
    assert model.dtype == torch.bfloat16 and model.training
    back = from_diffusers(model)
    assert back.training and next(back.parameters()).dtype == torch.bfloat16
    assert_same_state(back.state_dict(), unet.state_dict())


@pytest.mark.parametrize("change, param", [
    (dict(use_spatial_transformer=False, context_dim=None, num_heads=4), "use_spatial_transformer"),
    (dict(resblock_updown=True), "resblock_updown"),
    (dict(conv_resample=False), "conv_resample"),
    (dict(dims=3), "dims"),
    (dict(n_embed=16), "n_embed"),
    (dict(channel_mult=[2, 4]), "channel_mult"),
    (dict(use_fp16=True), "use_fp16"),
    (dict(num_blocks=2), "num_blocks"),
])
def test_unsupported_compvis_configs_name_the_param(change, param):
    with pytest.raises(ValueError, match=param):
        diffusers_unet_config(dict(CONFIGS["fixed_heads"], **change))


@pytest.mark.parametrize("change, key", [
    (dict(use_linear_projection=True), "use_linear_projection"),
    (dict(addition_embed_type="text"), "addition_embed_type"),
    (dict(class_embed_type="timestep"), "class_embed_type"),
    (dict(act_fn="gelu"), "act_fn"),
    (dict(cross_attention_dim=None), "cross_attention_dim"),
    (dict(flip_sin_to_cos=False), "flip_sin_to_cos"),
    (dict(time_embedding_type="fourier"), "time_embedding_type"),
    (dict(norm_eps=1e-6), "norm_eps"),
    (dict(resnet_time_scale_shift="ada_group"), "resnet_time_scale_shift"),
    (dict(down_block_types=["AttnDownBlock2D", "CrossAttnDownBlock2D"]), "down_block_types"),
    (dict(up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"]), "up_block_types"),
    (dict(block_out_channels=[32, 48]), "block_out_channels"),
    (dict(attention_head_dim=[1, 4]), "attention_head_dim"),  # head widths 32 and 16, counts 1 and 4
    (dict(layers_per_block=[1, 2]), "layers_per_block"),
    (dict(mystery_option=1), "mystery_option"),
])
def test_diffusers_configs_without_compvis_equivalent_name_the_key(change, key):
    config = dict(diffusers_unet_config(CONFIGS["fixed_heads"]), **change)
    with pytest.raises(ValueError, match=key):
        unet_params_from_diffusers(config)


def test_missing_extra_and_misshapen_keys_are_named():
    params = CONFIGS["fixed_heads"]
    state = random_unet(params).state_dict()
    with pytest.raises(ValueError, match=r"missing keys \(1\): middle_block\.1\.norm\.bias"):
        to_diffusers_state_dict({k: v for k, v in state.items() if k != "middle_block.1.norm.bias"}, params)
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): label_emb\.weight"):
        to_diffusers_state_dict(dict(state, **{"label_emb.weight": torch.zeros(3, 128)}), params)
    with pytest.raises(ValueError, match=r"out\.2\.bias: \(5,\) vs \(4,\)"):
        to_diffusers_state_dict(dict(state, **{"out.2.bias": torch.zeros(5)}), params)
    with pytest.raises(ValueError, match="whole LatentDiffusion state dict"):
        to_diffusers_state_dict({LDM_UNET_PREFIX + k: v for k, v in state.items()}, params)

    config = diffusers_unet_config(params)
    theirs = to_diffusers_state_dict(state, params)
    with pytest.raises(ValueError, match=r"missing keys \(1\): conv_in\.weight"):
        from_diffusers_state_dict({k: v for k, v in theirs.items() if k != "conv_in.weight"}, config)
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): add_embedding\.linear_1\.weight"):
        from_diffusers_state_dict(dict(theirs, **{"add_embedding.linear_1.weight": torch.zeros(1)}), config)
    assert_same_state(from_diffusers_state_dict(theirs, config), state)


# ------------------------------------------------------------------------------------------------- script



def test_script_converts_a_model_dir_to_diffusers_and_back(tmp_path, tiny_txt2img_model, capsys):
    script = load_script("convert_diffusers")
    original = load_model(tiny_txt2img_model).model.diffusion_model
    script.main(["--to-diffusers", str(tiny_txt2img_model), "--unet-only", "--outdir", str(tmp_path / "diffusers")])
    assert sorted(p.name for p in (tmp_path / "diffusers").iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors"]
    model = UNet2DConditionModel.from_pretrained(tmp_path / "diffusers", low_cpu_mem_usage=False)
    assert_same_outputs(original, model)

    script.main(["--from-diffusers", str(tmp_path / "diffusers"), "--outdir", str(tmp_path / "ldm")])
    config = OmegaConf.load(tmp_path / "ldm" / "unet.yaml")
    unet = instantiate_from_config(config)
    unet.load_state_dict(load_file(tmp_path / "ldm" / "unet.safetensors"))
    assert unet_params(unet) == unet_params(original)
    assert_same_state(unet.state_dict(), original.state_dict())

    # The U-Net folder converts again (weights default to unet.safetensors beside unet.yaml).
    script.main(["--to-diffusers", "--config", str(tmp_path / "ldm" / "unet.yaml"),
                 "--outdir", str(tmp_path / "again")])
    assert (json.loads((tmp_path / "again" / "config.json").read_text())
            == json.loads((tmp_path / "diffusers" / "config.json").read_text()))
    assert_same_state(load_file(tmp_path / "again" / "diffusion_pytorch_model.safetensors"),
                      load_file(tmp_path / "diffusers" / "diffusion_pytorch_model.safetensors"))
    assert "wrote" in capsys.readouterr().out


def test_script_errors(tmp_path, capsys):
    script = load_script("convert_diffusers")
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--from-diffusers", str(tmp_path), "--outdir", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "no model_index.json or config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--to-diffusers", "--outdir", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "needs a model" in capsys.readouterr().err

    # A self-attention U-Net (as the inpainting model's) has no diffusers UNet2DConditionModel equivalent.
    params = dict(CONFIGS["fixed_heads"], use_spatial_transformer=False, context_dim=None)
    OmegaConf.save(OmegaConf.create({"target": script.UNET_TARGET, "params": params}), tmp_path / "unet.yaml")
    torch.save(UNetModel(**params).state_dict(), tmp_path / "w.pt")
    with pytest.raises(SystemExit, match="use_spatial_transformer"):
        script.main(["--to-diffusers", str(tmp_path / "unet.yaml"), "--ckpt", str(tmp_path / "w.pt"),
                     "--outdir", str(tmp_path / "out")])
