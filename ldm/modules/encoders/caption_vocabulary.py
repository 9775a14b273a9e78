"""A text model's word vocabulary built from its run's own training captions.

A text encoder trained from scratch (`BERTEmbedder`) reads only the words of its vocabulary. A config that trains
one on a user's captions asks for a vocabulary of those captions with a ``vocabulary:`` block beside the encoder's
``target:`` and ``params:``::

    cond_stage_config:
      target: ldm.modules.encoders.modules.BERTEmbedder
      params: {n_embed: 512, n_layer: 8, max_seq_len: 77}
      vocabulary: {min_count: 2, max_size: 20000}

At the start of the run (`prepare_run_vocabulary`, called by ``main.py``) the training split's captions are split
into words as the uncased BERT tokenizer splits them (lower case, accents stripped, unicode quotes folded;
punctuation is dropped, as the tokenizer drops punctuation a vocabulary lacks); words seen at least `min_count`
times are kept, the `max_size` most frequent (ties in alphabetical order: the same captions give the same file).
The file is written to ``<run>/vocab.txt`` and the encoder's ``tokenizer_path`` and ``vocab_size`` are set to it in
the run's saved config, so ``-r`` resumes with it and an export copies it into the model directory. A config whose
encoder already names ``tokenizer_path`` (your own file, or a resumed run's) is left as it is.
"""
from __future__ import annotations

import logging
import string
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

from ldm.modules.encoders.tokenization import fold_unicode

log = logging.getLogger(__name__)

BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
VOCAB_FILE = "vocab.txt"
DEFAULTS = {"min_count": 2, "max_size": 20000}


def caption_words(caption: str) -> list[str]:
    """The words of `caption` as the uncased BERT pre-tokenizer splits them, punctuation left out."""
    from tokenizers import normalizers, pre_tokenizers

    normalised = normalizers.BertNormalizer(lowercase=True).normalize_str(fold_unicode(caption))
    pieces = pre_tokenizers.BertPreTokenizer().pre_tokenize_str(normalised)
    return [word for word, _ in pieces if not all(c in string.punctuation for c in word)]


def build_caption_vocabulary(captions: Iterable[str], min_count: int = 2, max_size: int = 20000) -> list[str]:
    """Words of `captions` seen at least `min_count` times, the `max_size` most frequent, in that order
    (frequency, then alphabetical)."""
    if min_count < 1 or max_size < 1:
        raise ValueError(f"vocabulary min_count and max_size must be at least 1, got {min_count} and {max_size}")
    counts = Counter(word for caption in captions for word in caption_words(caption))
    kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
    return kept[:max_size]


def write_tokens(tokens: list[str], path: Path) -> Path:
    """A WordPiece vocab.txt holding `tokens`, one a line: a token's line is its id."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return path


def write_vocabulary(words: list[str], path: Path) -> Path:
    """A BERT WordPiece vocab.txt: the special tokens, then `words`."""
    return write_tokens([*BERT_SPECIAL_TOKENS, *words], path)


def dataset_captions(dataset: Any) -> Iterator[str]:
    """Every caption of a dataset, one at a time: a stream's `iter_captions()` (the shard datasets read them without
    holding them all), else its `captions` list (the folder datasets hold one), else each item's."""
    if hasattr(dataset, "iter_captions"):
        yield from dataset.iter_captions()
        return
    captions = getattr(dataset, "captions", None)
    if captions is None:
        captions = (dataset[i]["caption"] for i in range(len(dataset)))
    for caption in captions:
        yield str(caption)


class _Counted:
    """An iterable that counts what passes (the number of captions, for the log, without a list of them)."""

    def __init__(self, items: Iterable[str]) -> None:
        self.items, self.count = items, 0

    def __iter__(self) -> Iterator[str]:
        for item in self.items:
            self.count += 1
            yield item


def prepare_run_vocabulary(config: DictConfig, logdir: Path) -> Optional[Path]:
    """Build the vocabulary a config's ``vocabulary:`` block asks for (module docstring) and point the text
    encoder at it; returns the file, or None when the config asks for none or names its own."""
    from ldm.util import instantiate_from_config

    encoder = config.model.get("params", {}).get("cond_stage_config")
    if not isinstance(encoder, DictConfig) or encoder.get("vocabulary") is None:
        return None
    params = encoder.setdefault("params", {})
    if params.get("tokenizer_path"):
        return None
    options = {**DEFAULTS, **encoder.vocabulary}
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"model.params.cond_stage_config.vocabulary: unknown option(s) {sorted(unknown)}; "
                         f"use {sorted(DEFAULTS)}")
    train = config.get("data", {}).get("params", {}).get("train")
    if train is None:
        raise ValueError("model.params.cond_stage_config.vocabulary builds the vocabulary from the training "
                         "captions, but the config has no data.params.train; set tokenizer_path to a vocab.txt instead")
    captions = _Counted(dataset_captions(instantiate_from_config(train)))
    words = build_caption_vocabulary(captions, int(options["min_count"]), int(options["max_size"]))
    if not words:
        raise ValueError(f"no word occurs {options['min_count']} times in the {captions.count} training captions: "
                         "lower model.params.cond_stage_config.vocabulary.min_count, or check the captions")
    path = write_vocabulary(words, logdir / VOCAB_FILE)
    params.tokenizer_path = str(path)
    params.vocab_size = len(BERT_SPECIAL_TOKENS) + len(words)
    log.info(f"vocabulary: {len(words)} words of {captions.count} training captions (seen at least "
             f"{options['min_count']} times, at most {options['max_size']}) -> {path}")
    return path
