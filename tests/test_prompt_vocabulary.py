"""Text models read prompts as typed (case, punctuation, unicode quotes) and say which words they cannot read."""
from __future__ import annotations

import shutil
import sys
import warnings

import pytest
import torch

from ldm.inference import load_model, text_to_image
from ldm.modules.encoders.modules import BERTEmbedder, BERTTokenizer
from ldm.modules.encoders.tokenization import PromptWarning, UnknownWordsError
from tests.test_main import REPO
from tests.tiny_models import txt2img_config, write_model_dir

SHAPES_VOCAB = REPO / "ldm" / "data" / "shapes_vocab.txt"


def _tokenizer(vocab=SHAPES_VOCAB) -> BERTTokenizer:
    return BERTTokenizer(vq_interface=False, max_length=20, tokenizer_path=str(vocab)).eval()


def _prompt_warnings(encode, prompts) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encode(prompts)
    return [str(w.message) for w in caught if issubclass(w.category, PromptWarning)]


def test_case_punctuation_quotes_and_spaces_read_as_the_plain_words():
    tokenizer = _tokenizer()
    plain = tokenizer(["a red circle above a blue square"])
    for typed in ("A Red Circle above a BLUE square.", "\u201ca red circle above a blue square!\u201d",
                  "a red circle\u00a0above a blue square...", "'a red circle', above a blue square?"):
        assert torch.equal(tokenizer([typed]), plain), typed
    assert _prompt_warnings(tokenizer, ["A red circle above a blue square."]) == []


def test_punctuation_a_vocabulary_holds_stays_a_token(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "."]) + "\n")
    tokenizer = _tokenizer(vocab)
    tokens = tokenizer.tokenizer.convert_ids_to_tokens(tokenizer(["A red circle!."])[0])
    assert tokens[:6] == ["[CLS]", "a", "red", "circle", ".", "[SEP]"]  # "!" is not in it: dropped


def test_unknown_words_warn_once_per_prompt_naming_them_and_the_vocabulary():
    tokenizer = _tokenizer()
    messages = _prompt_warnings(tokenizer, ["a white heart", "a red circle", "a white heart"])
    assert len(messages) == 1
    assert "'white', 'heart'" in messages[0] and str(SHAPES_VOCAB.name) in messages[0]
    assert "--strict_vocab" in messages[0]
    assert _prompt_warnings(tokenizer, ["a white heart"]) == []  # reported once
    assert len(_prompt_warnings(tokenizer, ["a huge red circle"])) == 1
    tokenizer.strict_vocab = True
    for _ in range(2):  # an error every time, not once
        with pytest.raises(UnknownWordsError, match="'white', 'heart'"):
            tokenizer(["a white heart"])


def test_a_model_card_beside_the_vocabulary_is_where_the_words_are_listed(tmp_path):
    shutil.copy(SHAPES_VOCAB, tmp_path / "shapes_vocab.txt")
    (tmp_path / "README.md").write_text("# model card\n")
    message = _prompt_warnings(_tokenizer(tmp_path / "shapes_vocab.txt"), ["a white heart"])[0]
    assert str(tmp_path / "README.md") in message


def test_training_captions_are_not_checked():
    """A trainable encoder's captions may hold words its vocabulary left out on purpose: no flood of warnings."""
    encoder = BERTEmbedder(n_embed=8, n_layer=1, vocab_size=66, max_seq_len=20, heads=1, dim_head=8,
                           tokenizer_path=str(SHAPES_VOCAB))
    assert _prompt_warnings(encoder.train(), ["a white heart"]) == []
    assert len(_prompt_warnings(encoder.eval(), ["a white heart"])) == 1


def test_the_full_bert_vocabulary_reports_what_it_lacks_too():
    tokenizer = BERTTokenizer(vq_interface=False, max_length=20).eval()  # bert-base-uncased, found offline
    assert _prompt_warnings(tokenizer, ["a white heart."]) == []
    message = _prompt_warnings(tokenizer, ["a red circle \u2603\ufe0f"])
    assert len(message) == 1 and "\u2603" in message[0]


@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory):
    """A tiny random txt2img model directory whose encoder reads the built-in 61-word vocabulary."""
    config = txt2img_config()
    params = config["model"]["params"]["cond_stage_config"]["params"]
    directory = tmp_path_factory.mktemp("small_vocab")
    shutil.copy(SHAPES_VOCAB, directory / "shapes_vocab.txt")
    params.update(tokenizer_path=str(directory / "shapes_vocab.txt"), vocab_size=66, max_seq_len=20)
    write_model_dir(directory, config)
    return directory


def test_txt2img_script_warns_in_one_line_or_stops_with_strict_vocab(small_vocab_model, tmp_path, monkeypatch, capsys):
    from ldm.cli.txt2img import cli

    base = ["txt2img", "--config", str(small_vocab_model), "--prompt", "a white heart", "--n_samples", "1",
            "--steps", "2"]
    monkeypatch.setattr(sys, "argv", [*base, "--outdir", str(tmp_path / "warn")])
    cli()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "white" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: BERTTokenizer:") and "'heart'" in lines[0]
    assert len(list((tmp_path / "warn" / "samples").glob("*.png"))) == 1

    monkeypatch.setattr(sys, "argv", [*base, "--outdir", str(tmp_path / "strict"), "--strict_vocab"])
    with pytest.raises(SystemExit) as stop:
        cli()
    assert str(stop.value).startswith("error: BERTTokenizer:") and "'white', 'heart'" in str(stop.value)
    assert not list((tmp_path / "strict").rglob("*.png"))


def test_load_model_strict_vocab_raises_in_the_python_api(small_vocab_model):
    model = load_model(str(small_vocab_model), strict_vocab=True)
    with pytest.raises(UnknownWordsError, match="'unicorn'"):
        text_to_image(model, ["a red unicorn"], steps=2, progress=False)
    assert text_to_image(model, ["A red circle."], steps=2, progress=False).shape[0] == 1
