"""New words for a trained text model: its vocabulary grown when fine-tuning starts, and textual inversion.

`model.params.new_words` in a fine-tuning config (one with `init_from`, ldm/finetune.py) teaches the base model's
caption encoder (`BERTEmbedder`) words it never read. It maps each word to the known word its embedding starts from
(``{zorb: circle, blorp: null}``, null for the mean), or lists them (``[zorb=circle, blorp]``): a list given on the
command line replaces the config's, where a mapping would be merged with it.

- at the start of the run (`prepare_new_words`, called by ``main.py``) the base's vocabulary with the new words
  appended (every old token keeps its id) is written to ``<run>/vocab.txt``, and the encoder's ``tokenizer_path``
  and ``vocab_size`` are set to it in the run's config: ``-r`` and ``ldm-export --model-dir`` rebuild the grown
  table and carry the file, and prompts with the new words are no longer "unknown";
- when the model loads the base's weights (`grow_base_state`), its embedding table moves onto the grown vocabulary
  through `vocabulary_transfer.grow_text_encoder`: the old rows kept, a new word's row copied from its like word's
  row, or the mean of the table for ``null``;
- `model.params.train_only_new_words: true` is textual inversion (Gal et al. 2022): every weight is frozen but the
  embedding table, whose other rows get no gradient and are put back after every optimizer step (`NewWordRows`),
  so that weight decay cannot move them either;
- with `model.params.lora_config` the new words' rows train with the LoRA adapter, every other weight frozen (what
  kohya's scripts call pivotal tuning: a LoRA plus textual-inversion embeddings). The run's checkpoints hold the
  adapter and the grown embedding table; the `--lora` file holds the adapter alone, so such a run is used exported
  with the adapter merged (``ldm-export <ckpt> --merge-lora --model-dir DIR``), which carries the words.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ldm.config import ConfigError, describe_key, load_configs
from ldm.model_files import base_model_files
from ldm.modules.encoders.caption_vocabulary import VOCAB_FILE, caption_words, write_tokens
from ldm.modules.encoders.vocabulary import find_bert_vocab, load_bert_tokenizer
from ldm.modules.encoders.vocabulary_transfer import ENCODER_PREFIX, POSITIONS, grow_text_encoder

NEW_WORDS = "model.params.new_words"
ENCODER = "ldm.modules.encoders.modules.BERTEmbedder"


def vocabulary_tokens(tokenizer: Any) -> list[str]:
    """A tokenizer's tokens in id order (as its vocab.txt lists them; also for a tokenizer.json)."""
    vocab = tokenizer.get_vocab()
    return sorted(vocab, key=vocab.__getitem__)


def base_vocabulary(init_from: str, init_config: Optional[str] = None) -> tuple[Path, list[str]]:
    """(file, tokens in id order) of the vocabulary the caption encoder of the model `init_from` names reads
    (`init_config`: the config of a weights file named alone, ldm/finetune.py)."""
    files, _ = base_model_files(init_from, init_config)
    params = OmegaConf.select(load_configs(files), "model.params.cond_stage_config.params", default=None) or {}
    path = find_bert_vocab(params.get("tokenizer_path"))
    return path, vocabulary_tokens(load_bert_tokenizer(path))


def parse_new_words(value: Any) -> dict[str, Optional[str]]:
    """`new_words` as {word: like word or None}, from a mapping or a list of ``word`` / ``word=like`` (module
    docstring); ValueError for anything else."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        pairs = [(word, like) for word, like in value.items()]
    elif isinstance(value, Sequence) and not isinstance(value, str):
        pairs = [(word, like if sep else None) for word, sep, like in (str(e).partition("=") for e in value)]
    else:
        raise ValueError(f"new_words must map each new word to the word its embedding starts from (null for the "
                         f"mean), e.g. {{zorb: circle}}, or list them, e.g. [zorb=circle, blorp]; got {value!r}")
    return {str(word).strip(): None if like is None or str(like).strip() in ("", "null") else str(like).strip()
            for word, like in pairs}


def check_new_words(new_words: Mapping[str, Optional[str]], vocabulary: Sequence[str], where: str,
                    ) -> dict[str, Optional[str]]:
    """`new_words` ({word: like word or None}), or a `ConfigError` naming the first word that cannot be added to
    `vocabulary` (the base model's) and what to do instead; `where` names the option in messages."""
    known = set(vocabulary)
    checked: dict[str, Optional[str]] = {}
    for word, like in new_words.items():
        read = caption_words(word)
        if read != [word]:
            # The tokenizer lower-cases and splits at punctuation: "<sks>" would be read as "sks" between two
            # dropped symbols, and never as the new token.
            example = "".join(read).lower() or "zorb"
            raise ConfigError(f"{where}: the tokenizer reads {word!r} as {read}, so it can never be one token: use "
                              f"one lower-case word without punctuation, e.g. {example!r}")
        if word in known:
            raise ConfigError(f"{where}: {word!r} is already in the base model's vocabulary: use it as it is (full "
                              "fine-tuning teaches it), or pick a word the vocabulary lacks")
        if like is not None and like not in known:
            raise ConfigError(f"{where}.{word}: the like word {like!r} is not in the base model's vocabulary, so it "
                              "has no trained row to start from: name a word the model knows, or null for the mean")
        checked[word] = like
    return checked


def prepare_new_words(config: DictConfig, logdir: Path) -> Optional[Path]:
    """Write the grown vocabulary `model.params.new_words` asks for to ``<logdir>/vocab.txt`` and point the text
    encoder at it (module docstring); returns the file, or None when the config adds no words. Run again on a
    resumed run it writes the same file (the words are checked against the base's vocabulary, not the run's)."""
    params = config.model.get("params") or {}
    where = describe_key(params, "new_words")
    try:
        new_words = parse_new_words(params.get("new_words"))
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from e
    if not new_words or not params.get("init_from"):
        return None  # no words, or none to add to: the model's constructor says what is missing
    encoder = params.get("cond_stage_config")
    if not isinstance(encoder, Mapping) or encoder.get("target") != ENCODER:
        target = encoder.get("target") if isinstance(encoder, Mapping) else encoder
        raise ConfigError(f"{where}: the base model's text encoder is {target}, not a {ENCODER.rpartition('.')[2]} "
                          "with a word vocabulary of its own; new words need a model whose caption encoder trains")
    init_config = params.get("init_config")
    base_file, tokens = base_vocabulary(str(params.init_from), str(init_config) if init_config else None)
    words = check_new_words(new_words, tokens, where)
    run_file = logdir / VOCAB_FILE
    encoder_params = encoder.setdefault("params", {})
    own = encoder_params.get("tokenizer_path")
    if own and Path(own).resolve() not in (base_file.resolve(), run_file.resolve()):
        raise ConfigError(f"{describe_key(encoder_params, 'tokenizer_path')} names a vocabulary of its own ({own}), "
                          f"but {NEW_WORDS} grows the base model's: remove tokenizer_path from the config")
    write_tokens([*tokens, *words], run_file)
    encoder_params.tokenizer_path = str(run_file)
    encoder_params.vocab_size = len(tokens) + len(words)
    return run_file


def text_encoder(model: nn.Module) -> nn.Module:
    """The model's `BERTEmbedder` (with its tokenizer): the encoder whose vocabulary new words grow."""
    from ldm.modules.encoders.modules import BERTEmbedder

    encoder = getattr(model, "cond_stage_model", None)
    if not isinstance(encoder, BERTEmbedder) or not encoder.use_tknz_fn:
        raise ValueError(f"new_words: the text encoder is {type(encoder).__name__}, not a BERTEmbedder with its "
                         "tokenizer; new words need a model whose caption encoder has a word vocabulary of its own")
    return encoder


def grow_base_state(state: Mapping[str, torch.Tensor], model: nn.Module, init_from: str,
                    new_words: Mapping[str, Optional[str]],
                    init_config: Optional[str] = None) -> dict[str, torch.Tensor]:
    """The base model's weights `state` with its embedding table moved onto `model`'s grown vocabulary (the new
    words' rows from their like words, or the mean)."""
    _, old = base_vocabulary(init_from, init_config)
    new = vocabulary_tokens(text_encoder(model).tknz_fn.tokenizer)
    positions = state[ENCODER_PREFIX + POSITIONS].shape[0]  # unchanged: the prompts' length is the base's
    like = {word: source for word, source in new_words.items() if source is not None}
    return grow_text_encoder(state, old, new, positions, like)


class NewWordRows(nn.Module):
    """Textual inversion's hold on an embedding table: only the rows of the new words learn. The other rows'
    gradients are zeroed (their optimizer state stays zero) and their values are put back after each step by
    `restore` (AdamW's weight decay shrinks every row that has a gradient tensor, zero or not). Both buffers are
    left out of the state dict: checkpoints keep the model's own keys."""

    def __init__(self, table: nn.Parameter, ids: Sequence[int]) -> None:
        super().__init__()
        learns = torch.zeros(table.shape[0], 1, dtype=torch.bool)
        learns[list(ids)] = True
        self.register_buffer("learns", learns, persistent=False)
        self.register_buffer("kept", table.detach().clone(), persistent=False)
        table.register_hook(lambda grad: grad * self.learns.to(grad.dtype))

    @torch.no_grad()
    def restore(self, table: torch.Tensor) -> None:
        table.copy_(torch.where(self.learns, table, self.kept.to(table.dtype)))


def freeze_all_but_new_words(model: nn.Module, words: Sequence[str]) -> tuple[nn.Parameter, NewWordRows]:
    """Freeze every weight of `model` but its text encoder's embedding table, of which only the rows of `words`
    will learn; returns (the table, the `NewWordRows` that holds the other rows)."""
    model.requires_grad_(False)
    return train_new_word_rows(model, words)


def train_new_word_rows(model: nn.Module, words: Sequence[str]) -> tuple[nn.Parameter, NewWordRows]:
    """Let the rows of `words` in `model`'s embedding table learn, and no other row of it; the rest of the model is
    left as it is (frozen by textual inversion, an adapter training beside them with LoRA). Returns (the table, the
    `NewWordRows` that holds the other rows)."""
    encoder = text_encoder(model)
    vocab = encoder.tknz_fn.tokenizer.get_vocab()
    missing = [w for w in words if w not in vocab]
    if missing:
        raise ValueError(f"new_words: {missing} are not in the text encoder's vocabulary; main.py adds "
                         f"them ({NEW_WORDS}) before the model is built")
    table = encoder.transformer.token_emb.weight
    table.requires_grad_(True)
    return table, NewWordRows(table, [vocab[w] for w in words])
