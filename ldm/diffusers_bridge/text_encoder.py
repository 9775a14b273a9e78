"""Conversion between the reference's BERT-style text encoder (`BERTEmbedder`) and diffusers' `LDMBertModel`,
both ways.

`LDMBertModel` (diffusers/pipelines/latent_diffusion/pipeline_latent_diffusion.py) was written to hold
the CompVis LDM-KL-8-G text encoder: token + learned absolute position embeddings, pre-LayerNorm blocks of
bias-free q/k/v self-attention with a biased output projection and a GELU MLP of 4x width, a final
LayerNorm and the vocabulary head (Rombach et al. 2022, sec. 4.3.1). Every weight maps one to one.

One difference in use, not in weights: `LDMTextToImagePipeline` pads every prompt to 77 tokens (its
tokenizer call has ``max_length=77``), and neither model masks padding. A model trained with
``max_seq_len: 77`` (the reference's) therefore gives the same embeddings in both. A model trained with
another length exports with its position table padded to 77 rows (the rows past its length repeat its
last position, so the padding tokens there look like the padding it was trained on), and the pipeline's
images differ from ours. The trained length is kept in the config (`ldm_max_seq_len`) so the import gives
back the exact weights.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Optional

import torch

from ldm.diffusers_bridge.common import check_keys, device_and_dtype, import_diffusers
from ldm.modules.encoders.modules import BERTEmbedder

if TYPE_CHECKING:
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel

# The prompt length LDMTextToImagePipeline pads to (hard-coded there).
PIPELINE_MAX_LENGTH = 77
# LDMBertConfig key that records the length the model was trained with.
TRAINED_LENGTH_KEY = "ldm_max_seq_len"
POSITIONS = "transformer.pos_emb.emb.weight"


def bert_params(embedder: BERTEmbedder) -> dict[str, Any]:
    """The BERTEmbedder constructor params that fix its architecture, read from the module."""
    transformer = embedder.transformer
    attention = transformer.attn_layers.layers[0][1]
    vocab_size, n_embed = transformer.token_emb.weight.shape
    return {"n_embed": n_embed, "n_layer": len(transformer.attn_layers.layers) // 2, "vocab_size": vocab_size,
            "max_seq_len": transformer.max_seq_len, "heads": attention.heads, "dim_head": attention.dim_head}


def ldmbert_config(params: Mapping[str, Any], pad_token_id: int) -> dict[str, Any]:
    """The LDMBertConfig kwargs of a BERTEmbedder built with `params` (dropout off: the reference has none)."""
    return {
        "vocab_size": params["vocab_size"],
        "max_position_embeddings": max(params["max_seq_len"], PIPELINE_MAX_LENGTH),
        TRAINED_LENGTH_KEY: params["max_seq_len"],
        "encoder_layers": params["n_layer"],
        "encoder_ffn_dim": 4 * params["n_embed"],
        "encoder_attention_heads": params["heads"],
        "head_dim": params["dim_head"],
        "d_model": params["n_embed"],
        "activation_function": "gelu",
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "scale_embedding": False,
        "pad_token_id": pad_token_id,
    }


def bert_params_from_ldmbert(config: Mapping[str, Any]) -> dict[str, Any]:
    """BERTEmbedder params of an LDMBertConfig (as a dict); ValueError where it has no CompVis equivalent."""
    if config.get("activation_function", "gelu") != "gelu" or config.get("scale_embedding", False):
        raise ValueError("only an LDMBertModel with GELU and unscaled embeddings is the CompVis BERT encoder")
    if config["encoder_ffn_dim"] != 4 * config["d_model"]:
        raise ValueError(f"encoder_ffn_dim={config['encoder_ffn_dim']} is not 4 x d_model={config['d_model']}, "
                         "the CompVis encoder's MLP width")
    return {"n_embed": config["d_model"], "n_layer": config["encoder_layers"], "vocab_size": config["vocab_size"],
            "max_seq_len": config.get(TRAINED_LENGTH_KEY, config["max_position_embeddings"]),
            "heads": config["encoder_attention_heads"], "dim_head": config["head_dim"]}


def _ldmbert_key(key: str) -> str:
    """The LDMBertModel name of one BERTEmbedder key (`transformer.*`)."""
    block = re.match(r"transformer\.attn_layers\.layers\.(\d+)\.(\d)\.(.+)$", key)
    if block:
        index, part, rest = int(block[1]), block[2], block[3]
        layer, is_mlp = divmod(index, 2)
        if part == "0":
            name = f"{'final' if is_mlp else 'self_attn'}_layer_norm.{rest}"
        elif is_mlp:
            name = {"net.0.0": "fc1", "net.2": "fc2"}[rest.rsplit(".", 1)[0]] + "." + rest.rsplit(".", 1)[1]
        else:
            name = "self_attn." + {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj",
                                   "to_out": "out_proj"}[rest.split(".")[0]] + "." + rest.split(".", 1)[1]
        return f"model.layers.{layer}.{name}"
    return {"transformer.token_emb.weight": "model.embed_tokens.weight",
            POSITIONS: "model.embed_positions.weight",
            "transformer.norm.weight": "model.layer_norm.weight",
            "transformer.norm.bias": "model.layer_norm.bias",
            "transformer.to_logits.weight": "to_logits.weight",
            "transformer.to_logits.bias": "to_logits.bias"}[key]


def ldmbert_module_names(embedder: BERTEmbedder) -> dict[str, str]:
    """BERTEmbedder module path (`transformer.*`) -> LDMBertModel module path, for every module holding a weight
    (the names an adapter such as a LoRA is keyed by)."""
    return {key[: -len(".weight")]: _ldmbert_key(key)[: -len(".weight")] for key in _shapes(bert_params(embedder))
            if key.endswith(".weight")}


def _shapes(params: Mapping[str, Any]) -> dict[str, torch.Size]:
    with torch.device("meta"):
        embedder = BERTEmbedder(**{k: params[k] for k in ("n_embed", "n_layer", "vocab_size", "max_seq_len", "heads",
                                                           "dim_head")}, use_tokenizer=False)
    return {k: v.shape for k, v in embedder.state_dict().items()}


def to_ldmbert_state_dict(state_dict: Mapping[str, torch.Tensor], params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A BERTEmbedder state dict under LDMBertModel's names, its position table padded to the pipeline's 77."""
    shapes = _shapes(params)
    check_keys(state_dict, shapes, "BERTEmbedder state dict")
    converted = {_ldmbert_key(k): state_dict[k] for k in shapes}
    positions = state_dict[POSITIONS]
    missing_rows = PIPELINE_MAX_LENGTH - positions.shape[0]
    if missing_rows > 0:
        converted[_ldmbert_key(POSITIONS)] = torch.cat([positions, positions[-1:].expand(missing_rows, -1)])
    return converted


def from_ldmbert_state_dict(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """An LDMBertModel state dict under BERTEmbedder's names (the position rows past the trained length dropped)."""
    params = bert_params_from_ldmbert(config)
    shapes = _shapes(params)
    key_map = {k: _ldmbert_key(k) for k in shapes}
    expected = {d: shapes[k] for k, d in key_map.items()}
    expected[key_map[POSITIONS]] = torch.Size([config["max_position_embeddings"], params["n_embed"]])
    check_keys(state_dict, expected, "diffusers LDMBertModel state dict")
    return {k: state_dict[d][: params["max_seq_len"]] if k == POSITIONS else state_dict[d] for k, d in key_map.items()}


def ldmbert_classes() -> tuple[type, type]:
    """diffusers' (LDMBertConfig, LDMBertModel)."""
    module = import_diffusers().pipelines.latent_diffusion.pipeline_latent_diffusion
    return module.LDMBertConfig, module.LDMBertModel


def to_diffusers(embedder: BERTEmbedder) -> LDMBertModel:
    """An LDMBertModel with the embedder's weights (copied), device, dtype and mode:
    ``bert(ids)[0]`` equals ``embedder(ids)`` for ids of the trained length."""
    if not getattr(embedder, "use_tknz_fn", False):
        raise ValueError("the diffusers pipeline tokenizes prompts itself: export a BERTEmbedder with a tokenizer")
    params = bert_params(embedder)
    config_class, model_class = ldmbert_classes()
    config = config_class(**ldmbert_config(params, embedder.tknz_fn.tokenizer.pad_token_id))
    device, dtype = device_and_dtype(embedder)
    with torch.device(device):
        bert = model_class(config).to(dtype)
    bert.load_state_dict(to_ldmbert_state_dict(embedder.state_dict(), params))
    return bert.train(embedder.training)


def from_diffusers(bert: LDMBertModel, tokenizer_path: Optional[str]) -> BERTEmbedder:
    """A BERTEmbedder with an LDMBertModel's weights, tokenizing with the vocabulary at `tokenizer_path`."""
    params = bert_params_from_ldmbert(bert.config.to_dict())
    device, dtype = device_and_dtype(bert)
    embedder = BERTEmbedder(**params, tokenizer_path=tokenizer_path).to(device, dtype)
    embedder.load_state_dict(from_ldmbert_state_dict(bert.state_dict(), bert.config.to_dict()))
    return embedder.train(bert.training)
