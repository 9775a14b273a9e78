"""A trained text model moved onto a larger vocabulary reads its old words exactly as before."""
import pytest
import torch

from ldm.modules.encoders.modules import BERTEmbedder
from ldm.modules.encoders.vocabulary_transfer import grow_text_encoder, read_vocabulary

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _encoder(tmp_path, words, max_seq_len, name):
    path = tmp_path / f"{name}.txt"
    path.write_text("\n".join(SPECIAL + words) + "\n")
    encoder = BERTEmbedder(n_embed=16, n_layer=1, vocab_size=len(SPECIAL) + len(words), max_seq_len=max_seq_len,
                           heads=2, dim_head=8, tokenizer_path=str(path)).eval()
    return encoder, path


def test_old_prompts_read_the_same_and_new_words_start_from_their_like(tmp_path):
    torch.manual_seed(0)
    old, old_path = _encoder(tmp_path, ["a", "circle", "large", "red"], 8, "old")
    new, new_path = _encoder(tmp_path, ["a", "big", "circle", "circles", "large", "red", "two"], 8, "new")
    state = {f"cond_stage_model.{k}": v for k, v in old.state_dict().items()}
    grown = grow_text_encoder(state, read_vocabulary(str(old_path)), read_vocabulary(str(new_path)), 8,
                              like={"big": "large", "circles": "circle"})
    new.load_state_dict({k.removeprefix("cond_stage_model."): v for k, v in grown.items()})
    with torch.no_grad():
        before, after = old(["a large red circle"]), new(["a large red circle"])
        assert torch.allclose(before, after, atol=1e-6)  # the old words at new ids: read exactly as before
        big = new(["a big red circle"])
    emb = grown["cond_stage_model.transformer.token_emb.weight"]
    ids = {w: i for i, w in enumerate(read_vocabulary(str(new_path)))}
    assert torch.equal(emb[ids["big"]], emb[ids["large"]]) and torch.equal(emb[ids["circles"]], emb[ids["circle"]])
    old_emb = state["cond_stage_model.transformer.token_emb.weight"]
    assert torch.allclose(emb[ids["two"]], old_emb.mean(0))
    assert torch.allclose(big, after)  # "big" starts as "large"
    # More positions: the new ones start as the last trained one (padding in every old prompt).
    longer = grow_text_encoder(state, read_vocabulary(str(old_path)), read_vocabulary(str(new_path)), 10)
    positions = longer["cond_stage_model.transformer.pos_emb.emb.weight"]
    assert positions.shape[0] == 10 and torch.equal(positions[8], positions[7]) and torch.equal(positions[9], positions[7])
    with pytest.raises(ValueError, match="not in the old vocabulary"):
        grow_text_encoder(state, read_vocabulary(str(old_path)), read_vocabulary(str(new_path)), 10, {"big": "huge"})
    with pytest.raises(ValueError, match="below the trained 8 positions"):
        grow_text_encoder(state, read_vocabulary(str(old_path)), read_vocabulary(str(new_path)), 6)


def test_grow_vocabulary_script_writes_weights_a_larger_model_loads(tmp_path, capsys):
    """scripts/grow_vocabulary.py as the README shows it: a model directory onto the built-in 61-word vocabulary."""
    import copy

    from ldm.checkpoint import load_state_dict, load_weights
    from ldm.cli.grow_vocabulary import main
    from ldm.util import instantiate_from_config
    from tests.test_main import REPO
    from tests.tiny_models import txt2img_config, write_model_dir

    old_vocab = tmp_path / "old_vocab.txt"
    old_vocab.write_text("\n".join(SPECIAL + ["a", "blue", "circle", "large", "red", "square"]) + "\n")
    config = txt2img_config()
    params = config["model"]["params"]["cond_stage_config"]["params"]
    params.update(tokenizer_path=str(old_vocab), vocab_size=11, max_seq_len=16)
    model_dir = write_model_dir(tmp_path / "model", copy.deepcopy(config))
    new_vocab = REPO / "ldm" / "data" / "shapes_vocab.txt"
    main([str(model_dir), "--vocab", str(new_vocab), "--max_seq_len", "20", "--like", "big=large",
          "-o", str(tmp_path / "grown.safetensors")])
    params.update(tokenizer_path=str(new_vocab), vocab_size=66, max_seq_len=20)
    bigger = instantiate_from_config(config["model"])
    load_weights(bigger, load_state_dict(tmp_path / "grown.safetensors"), strict=True, ignore_prefixes=("model_ema.",))
    emb = bigger.cond_stage_model.transformer.token_emb.weight
    ids = {w: i for i, w in enumerate(read_vocabulary(str(new_vocab)))}
    assert torch.equal(emb[ids["big"]], emb[ids["large"]])
    with pytest.raises(SystemExit):
        main([str(model_dir), "--vocab", str(new_vocab), "--like", "big", "-o", str(tmp_path / "x.safetensors")])
    assert "--like 'big': use NEW=OLD" in capsys.readouterr().err
