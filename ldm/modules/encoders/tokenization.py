"""Prompts to fixed-length token tensors, for every text encoder here, saying what the model cannot read.

Two things silently change what a prompt means, and both are reported once per prompt (a `PromptWarning`, which
the command-line scripts print as one line): tokens cut off past the encoder's length, and words its vocabulary
lacks (read as the unknown token). With ``strict_vocab`` unknown words are an `UnknownWordsError` instead.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Optional, Union

from torch import nn

Text = Union[str, Sequence[str]]


# Unicode forms people paste, folded to the ASCII that vocabularies hold (the tokenizers apply the same folds).
UNICODE_FOLDS = {"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'",
                 "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u2033": '"',
                 "\u00ab": '"', "\u00bb": '"', "\u2010": "-", "\u2011": "-", "\u2012": "-",
                 "\u2013": "-", "\u2014": "-", "\u2015": "-", "\u2212": "-", "\u2026": "...",
                 "\u00a0": " ", "\u2009": " ", "\u202f": " "}
_FOLD = str.maketrans(UNICODE_FOLDS)


def fold_unicode(text: str) -> str:
    """Curly quotes, dashes, ellipses and odd spaces as their ASCII forms."""
    return text.translate(_FOLD)


class PromptWarning(UserWarning):
    """A prompt the text encoder reads differently from what it says (cut short, or words it does not know)."""


class UnknownWordsError(ValueError):
    """A prompt holds words the text encoder's vocabulary lacks (raised only with ``strict_vocab``)."""


def unknown_words(tokenizer: Any, prompt: str, ids: Sequence[int], offsets: Optional[Sequence[tuple[int, int]]],
                  ) -> list[str]:
    """The words of `prompt` that became the unknown token, as typed (in order, each once)."""
    unk = tokenizer.unk_token_id
    if unk is None or unk not in ids:
        return []
    if offsets is None:  # a slow tokenizer: no alignment to the text, so name the prompt's words it cannot read
        words = [w for w in prompt.split() if unk in tokenizer(w, add_special_tokens=False)["input_ids"]]
    else:  # an empty span is a special token: CLIP's end-of-text token is also its unknown token
        words = [_word_at(prompt, start, end) for token, (start, end) in zip(ids, offsets)
                 if token == unk and end > start]
    return list(dict.fromkeys(words))


def _word_at(prompt: str, start: int, end: int) -> str:
    """The whitespace-delimited word of `prompt` holding characters start:end (a sub-word tokenizer may mark
    only a piece of a word unknown: CLIP's BPE, a letter)."""
    while start > 0 and not prompt[start - 1].isspace():
        start -= 1
    while end < len(prompt) and not prompt[end].isspace():
        end += 1
    return prompt[start:end]


def tokenize_to_length(tokenizer: Any, text: Text, max_length: int, warned: set[str], owner: str,
                       vocabulary_listing: Optional[str] = None, strict_vocab: bool = False,
                       check_vocab: bool = True) -> Any:
    """`text` tokenized with special tokens, truncated and padded to exactly `max_length` (a `BatchEncoding`
    of (B, max_length) tensors).

    A prompt cut short is reported with the number of tokens dropped; with `check_vocab`, one with words the
    vocabulary lacks is reported with those words and `vocabulary_listing` (where the model's words are listed:
    its model card or vocabulary file), or raises `UnknownWordsError` with `strict_vocab` (before anything is
    sampled). Each prompt is reported once: `warned` records the prompts reported. Encoders pass
    ``check_vocab=False`` while training, where captions with rare words are expected and each is new.
    """
    prompts = [text] if isinstance(text, str) else list(text)
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"{owner} expects a string or a list of strings; got {[type(p).__name__ for p in prompts]}")
    to_check = list(dict.fromkeys(p for p in prompts if strict_vocab or p not in warned))
    fast = bool(getattr(tokenizer, "is_fast", False)) and check_vocab
    # verbose=False: without truncation HF would warn about prompts longer than the model's own limit.
    full = tokenizer(to_check, truncation=False, verbose=False, return_offsets_mapping=fast) if to_check else None
    for i, prompt in enumerate(to_check):
        ids = full["input_ids"][i]
        unknown = unknown_words(tokenizer, prompt, ids, full["offset_mapping"][i] if fast else None) \
            if check_vocab else []
        if unknown:
            where = f"; the words it knows are listed in {vocabulary_listing}" if vocabulary_listing else ""
            message = (f"{owner}: {len(unknown)} word{'s' * (len(unknown) > 1)} of the prompt "
                       f"{_shorten(prompt)} {'are' if len(unknown) > 1 else 'is'} not in the model's vocabulary "
                       f"and read as unknown: {', '.join(repr(w) for w in unknown)}{where}")
            if strict_vocab:
                raise UnknownWordsError(message)
            if prompt not in warned:
                warnings.warn(message + " (--strict_vocab makes this an error)", PromptWarning, stacklevel=3)
                warned.add(prompt)
        if len(ids) > max_length and prompt not in warned:
            warnings.warn(
                f"{owner}: prompt is {len(ids)} tokens long (with [CLS]/[SEP]) but max_length is {max_length}; "
                f"its last {len(ids) - max_length} tokens were dropped: {_shorten(prompt)}",
                PromptWarning, stacklevel=3,
            )
            warned.add(prompt)
    return tokenizer(prompts, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")


def set_strict_vocab(model: nn.Module, strict: bool = True) -> None:
    """Make unknown words in prompts an error (`UnknownWordsError`) rather than a warning, for every text
    encoder inside `model` (a diffusion model or an encoder)."""
    for module in model.modules():
        if hasattr(module, "strict_vocab"):
            module.strict_vocab = strict


def _shorten(prompt: str, limit: int = 80) -> str:
    return repr(prompt[:limit]) + ("..." if len(prompt) > limit else "")
