"""Stable Diffusion v1's text encoder: CLIP ViT-L/14's text transformer, frozen (Rombach et al. 2022, sec. 4.3.2).

`FrozenCLIPEmbedder` keeps SD v1's layout and behaviour so its checkpoints load strictly and sample as they
were trained:
- state-dict keys ``transformer.text_model.*`` (``cond_stage_model.transformer.text_model.*`` in the diffusion
  model), whatever the installed transformers nests inside `CLIPTextModel`;
- prompts padded to 77 tokens with the end token and encoded **without** an attention mask (CLIP's causal mask
  only): SD v1 was trained on the hidden states of the padding positions too;
- the output is the last hidden state after the final layer norm, (B, 77, 768).

Where CLIP comes from (`version`): a local directory (config.json and the tokenizer's vocab.json/merges.txt, and
the weights when `pretrained`), else the Hugging Face cache, else a download; a missing one is an error that says
which and how to get it. Loading an SD checkpoint needs only the config and the tokenizer: the checkpoint holds
the text encoder's weights (``pretrained: false`` in configs/stable-diffusion/v1-inference.yaml).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.modules.encoders.base import FreezableEncoder
from ldm.modules.encoders.tokenization import tokenize_to_length

DEFAULT_VERSION = "openai/clip-vit-large-patch14"


class CLIPNotFound(FileNotFoundError):
    """CLIP's config/tokenizer (or weights) are neither local nor downloadable; the message says how to get them."""


def _from_pretrained(loader: Any, version: str, what: str, **kwargs: Any) -> Any:
    """`loader.from_pretrained(version)`: a local directory, else the HF cache, else a download (unless offline)."""
    if Path(version).expanduser().is_dir():
        return loader.from_pretrained(str(Path(version).expanduser()), local_files_only=True, **kwargs)
    try:
        return loader.from_pretrained(version, local_files_only=True, **kwargs)
    except (OSError, ValueError) as cached_error:
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise CLIPNotFound(f"FrozenCLIPEmbedder: CLIP's {what} ({version}) is not in the Hugging Face cache and "
                               "HF_HUB_OFFLINE=1 forbids downloading it; on a machine with network run `hf "
                               f"download {version}` (huggingface_hub's command), or set "
                               "cond_stage_config.params.version to a local copy") from cached_error
    try:
        return loader.from_pretrained(version, **kwargs)
    except Exception as e:  # noqa: BLE001 (network, HTTP, missing repo: all end in the one message)
        raise CLIPNotFound(f"FrozenCLIPEmbedder: cannot load CLIP's {what} from {version!r} (not a local directory, not "
                           f"in the Hugging Face cache, and the download failed: {e.__class__.__name__}); run "
                           f"`hf download {version}` where there is network, or set "
                           "cond_stage_config.params.version to a local copy") from e


class FrozenCLIPEmbedder(FreezableEncoder):
    """Prompts -> (B, max_length, width) CLIP text features, as Stable Diffusion v1 (see the module docstring).

    `device` is accepted because SD's configs pass it; the module follows ``.to()``. `pretrained` loads CLIP's
    weights; without it the encoder is built from CLIP's config alone, for a checkpoint to fill.
    """

    # SD v1 checkpoints hold this buffer (persistent in the transformers of 2022); it is arange(77), recomputed.
    derived_state_keys = ("transformer.text_model.embeddings.position_ids",)

    def __init__(self, version: str = DEFAULT_VERSION, device: str = "cpu", max_length: int = 77,
                 pretrained: bool = True, freeze: bool = True) -> None:
        super().__init__()
        from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

        self.tokenizer = _from_pretrained(AutoTokenizer, version, "tokenizer")
        if pretrained:
            text_model = _from_pretrained(CLIPTextModel, version, "weights")
        else:
            text_model = CLIPTextModel(_from_pretrained(CLIPTextConfig, version, "config"))
        # transformers < 5 nests the transformer as CLIPTextModel.text_model; 5 does not. SD's keys are
        # transformer.text_model.*, so the newer model is put one level down.
        if hasattr(text_model, "text_model"):
            self.transformer = text_model
        else:
            self.transformer = nn.Module()
            self.transformer.text_model = text_model
        positions = text_model.config.max_position_embeddings
        if max_length > positions:
            raise ValueError(f"max_length={max_length} exceeds CLIP's {positions} positions")
        self.max_length = max_length
        self.output_dim = text_model.config.hidden_size
        self.version = version
        self.strict_vocab = False  # unknown words: a warning, or with True an error (tokenization.set_strict_vocab)
        self._warned_prompts: set[str] = set()
        if freeze:
            self.freeze()

    def forward(self, text: str | list[str]) -> torch.Tensor:
        tokens = tokenize_to_length(self.tokenizer, text, self.max_length, self._warned_prompts,
                                    "FrozenCLIPEmbedder", self.version, self.strict_vocab)["input_ids"]
        text_model = self.transformer.text_model
        device = next(text_model.parameters()).device
        return text_model(input_ids=tokens.to(device)).last_hidden_state  # no attention mask, as SD v1
