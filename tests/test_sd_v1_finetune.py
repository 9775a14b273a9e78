"""Fine-tuning Stable Diffusion v1 (configs/stable-diffusion/v1-finetune-lora.yaml, v1-finetune.yaml): a released
weights file named alone (`init_from` + `init_config`), LoRA files in kohya's key format with the names published
SD v1 LoRAs carry, full fine-tuning with CLIP frozen. A reduced model in SD v1's exact layout (tests/
test_stable_diffusion.py: v1-inference.yaml with small channels, CLIP built from a local config) trains on the CPU;
the full-size model is built on the meta device, so nothing downloads and nothing of its size is allocated."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file, save_file

from ldm.config import ConfigError, load_configs
from ldm.finetune import apply_init_from
from ldm.inference import load_model
from ldm.lora import LoraSettings, add_lora, read_lora, trained_adapter, write_lora
from ldm.lora_formats import LoraWeights, ecosystem_names, to_state_dict
from ldm.util import instantiate_from_config
from tests.test_main import only_run, run_main
from tests.test_released_configs import read_key_list
from tests.test_stable_diffusion import REDUCED, V1_INFERENCE, VIT_L14_TEXT, write_clip_dir

V1_LORA = V1_INFERENCE.with_name("v1-finetune-lora.yaml")
V1_FULL = V1_INFERENCE.with_name("v1-finetune.yaml")
# SD v1-4's unet/config.json on the Hub, the diffusers model kohya's scripts name their modules after.
SD_V1_DIFFUSERS_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                            block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
                            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def kohya_unet_names(unet: torch.nn.Module) -> set[str]:
    """The U-Net modules kohya's sd-scripts (networks/lora.py) put a LoRA on, named as it names them: every Linear
    and 1x1 Conv2d inside a diffusers `Transformer2DModel`, ``lora_unet_`` + its module path with ``_`` for ``.``."""
    names = set()
    for path, module in unet.named_modules():
        if type(module).__name__ == "Transformer2DModel":
            for child_path, child in module.named_modules():
                if isinstance(child, torch.nn.Linear) or (isinstance(child, torch.nn.Conv2d)
                                                          and child.kernel_size == (1, 1)):
                    names.add(f"lora_unet.{path}.{child_path}".replace(".", "_"))
    return names


def kohya_text_encoder_names(layers: int) -> set[str]:
    """kohya's names of CLIP's attention and MLP Linears (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``)."""
    return {f"lora_te_text_model_encoder_layers_{i}_{part}" for i in range(layers)
            for part in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj",
                         "mlp_fc1", "mlp_fc2")}


def lora_settings(**changes) -> LoraSettings:
    """The LoRA settings of v1-finetune-lora.yaml."""
    return LoraSettings.from_config({**OmegaConf.to_container(OmegaConf.load(V1_LORA).model.params.lora_config),
                                     **changes})


def denoiser_output(model: torch.nn.Module) -> torch.Tensor:
    """The network's output on fixed latents, timesteps and captions (words of the reduced CLIP's vocabulary)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, model.channels, model.image_size, model.image_size, generator=generator)
    with torch.no_grad():
        return model.apply_model(x, torch.tensor([3, 11]),
                                 model.get_learned_conditioning(["a red circle", "the blue square above a red circle"]))


def module_stems(state) -> set[str]:
    return {k.split(".")[0] for k in state}


def test_full_size_sd_v1_lora_names_are_those_kohya_publishes(tmp_path, reference_dir):
    from diffusers import UNet2DConditionModel

    clip = write_clip_dir(tmp_path / "clip-vit-large-patch14", **VIT_L14_TEXT)
    config = OmegaConf.load(V1_INFERENCE)
    config.model.params.cond_stage_config.params.version = str(clip)
    with torch.device("meta"):
        model = instantiate_from_config(config.model)
        sizes = {part: sum(p.numel() for p in model.get_submodule(part).parameters())
                 for part in ("model.diffusion_model", "cond_stage_model", "first_stage_model")}
        both_lora = add_lora(model, lora_settings(text_encoder=True))
        reference = UNet2DConditionModel(**SD_V1_DIFFUSERS_UNET)
    unet_lora = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n.startswith("model."))
    names = module_stems(to_state_dict(trained_adapter(model), ecosystem_names(model), "kohya"))
    unet_names = {n for n in names if n.startswith("lora_unet_")}
    assert unet_names == kohya_unet_names(reference) and len(unet_names) == 192  # kohya: "U-Net: 192 modules"
    assert names - unet_names == kohya_text_encoder_names(12)  # kohya: "Text Encoder: 72 modules"
    assert {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
            "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj",
            "lora_unet_up_blocks_3_attentions_2_proj_out",
            "lora_te_text_model_encoder_layers_11_mlp_fc2"} <= names
    # The same count from the reference's SD v1 key list: 16 transformer blocks (6 down, 1 middle, 9 up), each with
    # 12 adapted modules; the attention projections alone are 16 x 2 attentions x 4 = 128.
    keys = list(read_key_list(reference_dir, "sd_v1_unet"))
    targets = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
               "attn2.to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
    adapted = {k.rsplit(".", 1)[0] for k in keys if k.startswith("model.diffusion_model.") and k.endswith(".weight")
               and k.rsplit(".", 1)[0].endswith(targets)}
    assert len({k for k in keys if k.endswith("transformer_blocks.0.norm1.weight")}) == 16
    assert len(adapted) == 192 and len([m for m in adapted if ".attn" in m]) == 128
    # The figures docs/training.md quotes for the memory estimate.
    assert sizes == {"model.diffusion_model": 859_520_964, "cond_stage_model": 123_060_480,
                     "first_stage_model": 83_653_863}
    assert (unet_lora, both_lora) == (3_391_488, 4_718_592)


@pytest.fixture(scope="module")
def reduced_sd(tmp_path_factory) -> dict[str, Path]:
    """A reduced SD v1 model's config (v1-inference.yaml with small channels, CLIP from a local directory) and its
    random weights as released SD files hold them: a bare .ckpt in the CompVis layout and the same as .safetensors."""
    root = tmp_path_factory.mktemp("reduced_sd")
    clip = write_clip_dir(root / "clip")
    config = OmegaConf.merge(OmegaConf.load(V1_INFERENCE), OmegaConf.from_dotlist(
        [*REDUCED, f"model.params.cond_stage_config.params.version={clip}"]))
    OmegaConf.save(config, root / "v1-reduced.yaml")
    torch.manual_seed(0)
    model = instantiate_from_config(config.model)
    generator = torch.Generator().manual_seed(1)
    weights = {name for name, _ in model.named_parameters()}
    state = {k: (0.05 * torch.randn(v.shape, generator=generator) if k in weights and "norm" not in k
                 else v.clone()) for k, v in model.state_dict().items()}
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    torch.save({"state_dict": state, "global_step": 470000, "epoch": 17}, root / "sd-v1-reduced.ckpt")
    save_file(state, root / "sd-v1-reduced.safetensors")
    return {"config": root / "v1-reduced.yaml", "ckpt": root / "sd-v1-reduced.ckpt",
            "safetensors": root / "sd-v1-reduced.safetensors", "state": state}


def finetune_model(config_file: Path, reduced_sd, weights: str = "ckpt", *overrides: str) -> torch.nn.Module:
    """The model main.py builds from a fine-tuning config that starts from the reduced SD weights file."""
    config = load_configs([config_file], overrides=[f"model.params.init_from={reduced_sd[weights]}",
                                                    f"model.params.init_config={reduced_sd['config']}", *overrides])
    apply_init_from(config)
    return instantiate_from_config(config.model)


def test_a_kohya_lora_of_the_sd_layout_loads_back_onto_the_released_model(reduced_sd, tmp_path):
    model = finetune_model(V1_LORA, reduced_sd, "safetensors", "model.params.lora_config.text_encoder=true").eval()
    released = load_model(reduced_sd["config"], reduced_sd["ckpt"], device="cpu")
    assert torch.equal(denoiser_output(model), denoiser_output(released))  # the base, exactly: up starts at zero
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0.0, 0.2)
    path = write_lora(trained_adapter(model), model, tmp_path / "kohya.safetensors", "kohya")
    state = load_file(path)
    # 4 transformer blocks here (down 0, middle, up 1 twice) x 12 modules, and CLIP's 2 layers x 6.
    assert len(module_stems(state)) == 60 and len(state) == 3 * 60
    assert {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
            "lora_unet_up_blocks_1_attentions_1_proj_in.lora_up.weight",
            "lora_te_text_model_encoder_layers_1_self_attn_out_proj.alpha"} <= set(state)
    assert state["lora_unet_up_blocks_1_attentions_1_proj_in.lora_down.weight"].shape == (8, 32, 1, 1)  # a 1x1 conv
    back = read_lora(path, released)
    for module, weights in trained_adapter(model).items():
        torch.testing.assert_close(update(back[module]), update(weights), rtol=0, atol=1e-6)
    merged = load_model(reduced_sd["config"], reduced_sd["ckpt"], device="cpu", lora=[path])
    out = denoiser_output(merged)
    assert (out - denoiser_output(released)).abs().max() > 1e-2
    torch.testing.assert_close(out, denoiser_output(model), rtol=0, atol=1e-5)  # = the training model's peft layers


def update(weights: LoraWeights) -> torch.Tensor:
    """ΔW of one module, flattened to (out, in) for a 1x1 convolution."""
    return weights.up.flatten(1) @ weights.down.flatten(1) * (weights.alpha / weights.rank)


def one_step(model: torch.nn.Module, images: torch.Tensor) -> torch.optim.Optimizer:
    """One optimizer step of `model` on a batch: its loss (`shared_step`, what `training_step` minimises) and its
    own optimizer."""
    model.learning_rate = 1e-3
    optimizer, _ = model.configure_optimizers()
    optimizer = optimizer[0]
    loss, _ = model.shared_step({"image": images, "caption": ["a red circle", "the blue square"]})
    loss.backward()
    optimizer.step()
    return optimizer


def test_full_fine_tuning_trains_the_unet_with_clip_frozen_and_the_optimizer_state_measured(reduced_sd):
    full = finetune_model(V1_FULL, reduced_sd)
    assert all(torch.equal(v, reduced_sd["state"][k]) for k, v in full.state_dict().items())
    unet = full.model.diffusion_model
    assert all(p.requires_grad for p in unet.parameters())
    assert not any(p.requires_grad for p in full.cond_stage_model.parameters())
    assert {id(p) for p in full.trainable_parameters()} == {id(p) for p in full.model.parameters()}
    images = torch.rand(2, 16, 16, 3) * 2 - 1
    optimizer = one_step(full.train(), images)
    after = full.state_dict()
    assert all(torch.equal(after[k], reduced_sd["state"][k]) for k in after if k.startswith("cond_stage_model."))
    last = "model.diffusion_model.out.2.weight"
    assert not torch.equal(after[last], reduced_sd["state"][last])

    lora = finetune_model(V1_LORA, reduced_sd)
    lora_optimizer = one_step(lora.train(), images)
    # AdamW keeps two float32 moments per trained weight: 8 bytes a parameter, as docs/training.md counts.
    for model, opt in ((full, optimizer), (lora, lora_optimizer)):
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        moments = sum(v.numel() * v.element_size() for state in opt.state.values() for k, v in state.items()
                      if k in ("exp_avg", "exp_avg_sq"))
        assert moments == 8 * trained
    lora_size = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert lora_size < 0.1 * sum(p.numel() for p in unet.parameters())


def test_a_weights_file_named_alone_needs_its_config_and_a_missing_one_says_where_to_get_it(reduced_sd, tmp_path):
    config = OmegaConf.create({"model": {"params": {"init_from": str(reduced_sd["ckpt"])}}})
    with pytest.raises(ConfigError) as error:
        apply_init_from(config)
    assert "is a weights file with no config of its own" in str(error.value)
    assert "model.params.init_config=CONFIG.yaml" in str(error.value) and "\n" not in str(error.value)
    config = load_configs([V1_LORA])
    with pytest.raises(FileNotFoundError) as error:
        apply_init_from(config)
    message = str(error.value)
    assert "init_from sd-v1-4.ckpt: no checkpoint at sd-v1-4.ckpt" in message and "\n" not in message
    assert "hf download CompVis/stable-diffusion-v-1-4-original sd-v1-4.ckpt" in message
    assert "model.params.init_from=sd-v1-4.ckpt" in message


def image_folder(root: Path, size: int) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("validation", 2)):
        (root / split).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / split / f"{i}.png")
            (root / split / f"{i}.txt").write_text("a red circle" if i % 2 else "the blue square")
    return root


def test_the_lora_config_trains_the_sd_layout_through_main_and_writes_a_kohya_file(reduced_sd, tmp_path):
    data = image_folder(tmp_path / "images", 16)
    run_main(["--base", str(V1_LORA), "-t", "--no-test", "--max_steps", "2",
              f"model.params.init_from={reduced_sd['ckpt']}", f"model.params.init_config={reduced_sd['config']}",
              "model.params.lora_config.text_encoder=true",
              f"data.params.train.params.root={data / 'train'}",
              f"data.params.validation.params.root={data / 'validation'}",
              "data.params.train.params.size=16", "data.params.validation.params.size=16",
              "lightning.callbacks.image_logger.params.batch_frequency=2",
              "lightning.callbacks.image_logger.params.max_images=1", "--limit_val_batches", "1",
              "--val_check_interval", "2", "--enable_model_summary", "false"], tmp_path)
    logdir = only_run(tmp_path)
    assert list((logdir / "images" / "train").glob("samples_*.png"))
    saved = OmegaConf.load(sorted((logdir / "configs").glob("*-project.yaml"))[-1]).model.params
    assert saved.init_config == str(reduced_sd["config"])  # what -r needs to read the base again
    adapter = logdir / "checkpoints" / "last.safetensors"
    state = load_file(adapter)
    assert all(re.fullmatch(r"lora_(unet|te)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)", k) for k in state)
    assert len(module_stems(state)) == 60
    assert any(v.abs().max() > 0 for k, v in state.items() if k.endswith("lora_up.weight"))  # it trained
    from safetensors import safe_open

    with safe_open(str(adapter), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "kohya" and metadata["base_model"] == str(reduced_sd["ckpt"])
    assert json.loads(metadata["lora_config"])["rank"] == 8
    read_lora(adapter, load_model(reduced_sd["config"], reduced_sd["ckpt"], device="cpu"))
