"""Prompts to fixed-length token tensors, for every text encoder here."""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Union

Text = Union[str, Sequence[str]]


def tokenize_to_length(tokenizer: Any, text: Text, max_length: int, warned: set[str], owner: str) -> Any:
    """`text` tokenized with special tokens, truncated and padded to exactly `max_length` (a `BatchEncoding`
    of (B, max_length) tensors).

    Truncation silently changes what a prompt means, so each distinct over-long prompt is reported once
    (`warned` records the prompts already reported) with the number of tokens dropped.
    """
    prompts = [text] if isinstance(text, str) else list(text)
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"{owner} expects a string or a list of strings; got {[type(p).__name__ for p in prompts]}")
    # verbose=False: without truncation HF would warn about prompts longer than the model's own limit.
    full_lengths = [len(ids) for ids in tokenizer(prompts, truncation=False, verbose=False)["input_ids"]]
    for prompt, length in zip(prompts, full_lengths):
        if length > max_length and prompt not in warned:
            warned.add(prompt)
            warnings.warn(
                f"{owner}: prompt is {length} tokens long (with [CLS]/[SEP]) but max_length is {max_length}; "
                f"its last {length - max_length} tokens were dropped: {prompt[:80]!r}"
                + ("..." if len(prompt) > 80 else ""),
                stacklevel=2,
            )
    return tokenizer(prompts, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
