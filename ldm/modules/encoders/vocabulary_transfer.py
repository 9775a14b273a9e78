"""A trained text encoder moved onto a larger vocabulary and more positions, keeping what it learned.

`BERTEmbedder`'s weights index words by their line in its vocab.txt. To teach a trained model new words (a
fine-tune on captions with words it never read), its embedding table is rebuilt for the new vocabulary: each
word both vocabularies hold keeps its trained row (at its new id), a new word starts from the row of a word
that means the same (``like={"big": "large"}``) or else from the mean of the trained rows, and positions
past the old `max_seq_len` start from the last trained one (they hold padding in the old model's prompts).
The unused vocabulary head (`to_logits`, kept for the reference's checkpoints) is moved the same way.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

ENCODER_PREFIX = "cond_stage_model.transformer."
VOCABULARY_ROWS = ("token_emb.weight", "to_logits.weight", "to_logits.bias")
POSITIONS = "pos_emb.emb.weight"


def read_vocabulary(path: str) -> list[str]:
    """The tokens of a WordPiece vocab.txt, one a line, in id order."""
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def grow_text_encoder(state: Mapping[str, torch.Tensor], old_vocabulary: Sequence[str],
                      new_vocabulary: Sequence[str], max_seq_len: int, like: Mapping[str, str] | None = None,
                      prefix: str = ENCODER_PREFIX) -> dict[str, torch.Tensor]:
    """`state` (a diffusion model's or an encoder's weights) with the text encoder under `prefix` moved from
    `old_vocabulary` to `new_vocabulary` and to `max_seq_len` positions (module docstring); other keys as they are.
    Returns the new state and raises ValueError for a `like` word the old vocabulary lacks or fewer positions."""
    like = dict(like or {})
    old_ids = {token: i for i, token in enumerate(old_vocabulary)}
    missing = sorted(w for w in like.values() if w not in old_ids)
    if missing:
        raise ValueError(f"like: {missing} not in the old vocabulary, so they have no trained row to start from")
    out = dict(state)
    for name in VOCABULARY_ROWS:
        key = prefix + name
        if key not in state:
            continue
        old = state[key]
        if old.shape[0] != len(old_vocabulary):
            raise ValueError(f"{key} has {old.shape[0]} rows but the old vocabulary {len(old_vocabulary)} tokens")
        mean = old.float().mean(0).to(old.dtype)
        rows = []
        for token in new_vocabulary:
            source = token if token in old_ids else like.get(token)
            rows.append(old[old_ids[source]] if source is not None else mean)
        out[key] = torch.stack(rows)
    key = prefix + POSITIONS
    if key in state:
        old = state[key]
        if max_seq_len < old.shape[0]:
            raise ValueError(f"max_seq_len {max_seq_len} is below the trained {old.shape[0]} positions")
        extra = old[-1:].expand(max_seq_len - old.shape[0], -1)
        out[key] = torch.cat([old, extra])
    return out
