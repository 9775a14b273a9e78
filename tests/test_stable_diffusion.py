"""Stable Diffusion v1: FrozenCLIPEmbedder and configs/stable-diffusion/v1-inference.yaml load SD v1's checkpoint
layout strictly and sample. CLIP's tokenizer and config are made here (a few words of BPE), so nothing downloads."""
import json
import warnings

import pytest
import torch
from omegaconf import OmegaConf
from transformers import CLIPTextConfig, CLIPTokenizer

from ldm.checkpoint import CheckpointError, load_weights
from ldm.inference import load_model, text_to_image
from ldm.model_files import ModelNotFound
from ldm.modules.encoders.clip import CLIPNotFound, FrozenCLIPEmbedder
from ldm.modules.encoders.tokenization import PromptWarning
from ldm.util import instantiate_from_config
from tests.helpers import REPO
from tests.test_released_configs import read_key_list, shapes

V1_INFERENCE = REPO / "configs" / "stable-diffusion" / "v1-inference.yaml"
WORDS = ("a", "red", "blue", "circle", "square", "above", "the")
# CLIP ViT-L/14's text transformer, as SD v1 uses it.
VIT_L14_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)


def write_clip_dir(directory, **config):
    """A CLIP directory as the Hub's: config.json, vocab.json and merges.txt (a byte-pair vocabulary of WORDS)."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = {}, []
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        for part in parts:
            vocab.setdefault(part, len(vocab))
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab.setdefault(parts[0], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt")).save_pretrained(str(directory))
    settings = {"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 2, "max_position_embeddings": 77, **config,
                "bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"],
                "pad_token_id": vocab["<|endoftext|>"]}
    if config.get("vocab_size"):
        settings["vocab_size"] = config["vocab_size"]
    CLIPTextConfig(**settings).save_pretrained(str(directory))
    return directory


def released_clip_keys(layers: int) -> list[str]:
    """SD v1's CLIP keys as its checkpoints name them (cond_stage_model.transformer.text_model.*)."""
    root = "cond_stage_model.transformer.text_model."
    keys = [root + "embeddings.token_embedding.weight", root + "embeddings.position_embedding.weight"]
    for i in range(layers):
        layer = f"{root}encoder.layers.{i}."
        for part in ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "layer_norm1",
                     "mlp.fc1", "mlp.fc2", "layer_norm2"):
            keys += [f"{layer}{part}.weight", f"{layer}{part}.bias"]
    return keys + [root + "final_layer_norm.weight", root + "final_layer_norm.bias"]


def test_the_v1_model_has_sd_v1s_exact_keys(tmp_path, reference_dir):
    clip = write_clip_dir(tmp_path / "clip-vit-large-patch14", **VIT_L14_TEXT)
    config = OmegaConf.load(V1_INFERENCE)
    config.model.params.cond_stage_config.params.version = str(clip)
    with torch.device("meta"):
        model = instantiate_from_config(config.model)
    state = model.state_dict()
    # U-Net, first stage and schedule buffers: the reference's key list of SD v1, shapes included.
    assert shapes({k: v for k, v in state.items() if not k.startswith("cond_stage_model.")}) == \
        read_key_list(reference_dir, "sd_v1_unet")
    assert sorted(k for k in state if k.startswith("cond_stage_model.")) == sorted(released_clip_keys(12))
    assert state["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"].shape == (49408, 768)
    # The full released layout (with the position_ids buffer SD v1 files carry) loads strictly.
    released = {**state, "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.empty(1, 77, device="meta")}
    load_weights(model, released, strict=True)
    with pytest.raises(CheckpointError, match="missing keys.*final_layer_norm"):
        load_weights(model, {k: v for k, v in released.items() if "final_layer_norm.bias" not in k}, strict=True)


REDUCED = [
    "model.params.unet_config.params.model_channels=32", "model.params.unet_config.params.channel_mult=[1,2]",
    "model.params.unet_config.params.attention_resolutions=[1]", "model.params.unet_config.params.num_res_blocks=1",
    "model.params.unet_config.params.num_heads=2", "model.params.unet_config.params.context_dim=32",
    "model.params.unet_config.params.use_checkpoint=false",
    "model.params.first_stage_config.params.ddconfig.ch=32", "model.params.first_stage_config.params.ddconfig.ch_mult=[1,2]",
    "model.params.first_stage_config.params.ddconfig.num_res_blocks=1", "model.params.image_size=8",
]


def test_a_reduced_sd_v1_checkpoint_loads_strictly_and_samples(tmp_path):
    clip = write_clip_dir(tmp_path / "clip")
    config = OmegaConf.merge(OmegaConf.load(V1_INFERENCE), OmegaConf.from_dotlist(
        [*REDUCED, f"model.params.cond_stage_config.params.version={clip}"]))
    config_path = tmp_path / "v1-reduced.yaml"
    OmegaConf.save(config, config_path)
    torch.manual_seed(0)
    model = instantiate_from_config(config.model)
    generator = torch.Generator().manual_seed(1)
    weights = {name for name, _ in model.named_parameters()}  # the schedule buffers stay as they are
    state = {k: (0.05 * torch.randn(v.shape, generator=generator) if k in weights and "norm" not in k
                 else v.clone()) for k, v in model.state_dict().items()}
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    torch.save({"state_dict": state, "global_step": 470000, "epoch": 17}, tmp_path / "sd-v1-reduced.ckpt")

    loaded = load_model(config_path, tmp_path / "sd-v1-reduced.ckpt")
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key
    images = text_to_image(loaded, ["a red circle above the blue square"], steps=4, seed=0, progress=False,
                           height=16, width=16)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


def test_prompts_are_padded_to_77_with_no_attention_mask(tmp_path):
    encoder = FrozenCLIPEmbedder(version=str(write_clip_dir(tmp_path / "clip")), pretrained=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # CLIP's end token is also its unknown token: known words are no warning
        features = encoder(["a red circle", "the blue square above a red circle"])
    with pytest.warns(PromptWarning, match=r"1 word .* unknown: 'green'"):
        encoder(["a green circle"])
    assert features.shape == (2, 77, 32)
    tokens = encoder.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt")
    assert (tokens["input_ids"][0, 4:] == encoder.tokenizer.eos_token_id).all()  # padded with the end token
    unmasked = encoder.transformer.text_model(input_ids=tokens["input_ids"]).last_hidden_state
    assert torch.allclose(features[:1], unmasked)
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.train().training


def test_a_missing_clip_says_where_to_get_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CLIPNotFound, match="hf download not-a-user/no-such-clip"):
        FrozenCLIPEmbedder(version="not-a-user/no-such-clip")


def test_the_sd_config_without_weights_says_where_they_come_from():
    with pytest.raises(ModelNotFound) as error:
        load_model(REPO / "configs/stable-diffusion/v1-inference.yaml")
    assert "hf download CompVis/stable-diffusion-v-1-4-original sd-v1-4.ckpt" in str(error.value)
    assert "--ckpt sd-v1-4.ckpt" in str(error.value) and "export_weights" not in str(error.value)
