"""New words (ldm/new_words.py): a fine-tuning run grows the base model's vocabulary (new rows from a like word or the
mean, every other row kept), textual inversion trains those rows alone, and user errors are one line. The tiny
random model of tests/tiny_models.py reads the full BERT vocabulary, so its new words are made-up ones."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.config import ConfigError, load_configs
from ldm.finetune import apply_init_from
from ldm.inference import load_model
from ldm.new_words import parse_new_words, prepare_new_words
from ldm.util import instantiate_from_config
from tests.test_lora import denoiser_output
from tests.tiny_models import txt2img_config

REPO = Path(__file__).resolve().parents[1]
TEXTUAL_INVERSION = REPO / "configs/latent-diffusion/txt2img_textual_inversion.yaml"


def new_words_model(init_from: Path | str, run: Path, **params) -> torch.nn.Module:
    """The model main.py builds for a fine-tuning config with `params` (new_words, ...) on `init_from`."""
    config = OmegaConf.create({"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                                         "params": {"init_from": str(init_from), "use_ema": False, **params}}})
    apply_init_from(config)
    prepare_new_words(config, run)
    return instantiate_from_config(config.model)


def table(model: torch.nn.Module) -> torch.Tensor:
    return model.cond_stage_model.transformer.token_emb.weight


def train_two_steps(model, optimizer) -> dict:
    """Two optimizer steps on captions that use the new word, as Lightning runs them; the state dict after."""
    torch.manual_seed(0)
    batch = {"image": torch.rand(2, 32, 32, 3) * 2 - 1, "caption": ["a zorb", "two zorb at the top"]}
    model.train()
    for _ in range(2):
        loss, _ = model.shared_step(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.on_train_batch_end(None, batch, 0)
    return model.state_dict()


def test_new_words_grow_the_vocabulary_and_keep_every_old_row(tiny_txt2img_model, tmp_path):
    model = new_words_model(tiny_txt2img_model, tmp_path, new_words={"zorb": "circle", "blorp": None}).eval()
    base = load_model(tiny_txt2img_model, device="cpu")
    vocab = base.cond_stage_model.tknz_fn.tokenizer.get_vocab()
    old, grown = table(base), table(model)
    assert grown.shape[0] == old.shape[0] + 2 and torch.equal(grown[:-2], old)
    assert torch.equal(grown[-2], old[vocab["circle"]])
    torch.testing.assert_close(grown[-1], old.mean(0))
    lines = (tmp_path / "vocab.txt").read_text().splitlines()
    assert lines[-2:] == ["zorb", "blorp"] and len(lines) == grown.shape[0]
    # Prompts without the new words: the base model exactly; with them, no unknown-word warning.
    assert torch.equal(denoiser_output(model), denoiser_output(base))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokens = model.cond_stage_model.tknz_fn(["a zorb beside a blorp"])
    assert {len(vocab), len(vocab) + 1} <= set(tokens[0].tolist())


def test_textual_inversion_moves_the_new_rows_alone(tiny_txt2img_model, tmp_path):
    model = new_words_model(tiny_txt2img_model, tmp_path, new_words=["zorb=circle"], train_only_new_words=True)
    model.weight_decay = 0.5  # a decay this strong would shrink every other row if they were not put back
    model.learning_rate = 1e-2
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "cond_stage_model.transformer.token_emb.weight"]
    assert "new_word_rows.kept" not in model.state_dict()  # checkpoints keep the model's own keys
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = model.configure_optimizers()
    assert [p for group in optimizer.param_groups for p in group["params"]] == [table(model)]
    after = train_two_steps(model, optimizer)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == ["cond_stage_model.transformer.token_emb.weight"]
    moved = (after[changed[0]] != before[changed[0]]).any(1).nonzero().flatten().tolist()
    assert moved == [table(model).shape[0] - 1]  # zorb's row alone


def test_lora_with_new_words_trains_the_adapter_and_the_new_rows_alone(tiny_txt2img_model, tmp_path):
    """Pivotal tuning: the adapter and the new word's row learn; every other row and base weight stays."""
    model = new_words_model(tiny_txt2img_model, tmp_path, new_words=["zorb=circle"], lora_config={"rank": 2})
    model.weight_decay = 0.5
    model.learning_rate = 1e-2
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "cond_stage_model.transformer.token_emb.weight" in trained
    assert all(".lora_" in n for n in trained if n != "cond_stage_model.transformer.token_emb.weight")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = model.configure_optimizers()
    after = train_two_steps(model, optimizer)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "cond_stage_model.transformer.token_emb.weight" in changed
    assert all(".lora_" in k for k in changed - {"cond_stage_model.transformer.token_emb.weight"})
    moved = (table(model) != before["cond_stage_model.transformer.token_emb.weight"]).any(1).nonzero().flatten()
    assert moved.tolist() == [table(model).shape[0] - 1]  # zorb's row alone
    # The checkpoint holds the adapter and the grown table (with its new row), no frozen base weight.
    from ldm.lora import training_state

    kept = training_state(model, model.state_dict())
    assert "cond_stage_model.transformer.token_emb.weight" in kept
    assert all(".lora_" in k for k in set(kept) - {"cond_stage_model.transformer.token_emb.weight"})


@pytest.mark.parametrize("params, message", [
    ({"new_words": {"circle": None}}, "'circle' is already in the base model's vocabulary"),
    ({"new_words": {"zorb": "qwxzzy"}}, "the like word 'qwxzzy' is not in the base model's vocabulary"),
    ({"new_words": ["<zorb>"]}, r"reads '<zorb>' as \['zorb'\], so it can never be one token.*e.g. 'zorb'"),
    ({"new_words": "zorb"}, "new_words must map each new word"),
    ({"train_only_new_words": True}, "train_only_new_words .textual inversion.*new_words names none"),
    ({"new_words": ["zorb"], "train_only_new_words": True, "lora_config": {"rank": 2}},
     "train_only_new_words with lora_config"),
])
def test_user_errors_are_one_line_config_errors(tiny_txt2img_model, tmp_path, params, message):
    with pytest.raises(ConfigError, match=message) as error:
        new_words_model(tiny_txt2img_model, tmp_path, **params)
    assert "\n" not in str(error.value)


def test_new_words_need_a_base_model():
    config = OmegaConf.create(txt2img_config())
    config.model.params.new_words = ["zorb"]
    with pytest.raises(ConfigError, match="new_words adds words to a trained model's vocabulary: set "
                                          "model.params.init_from"):
        instantiate_from_config(config.model)


def test_both_spellings_mean_the_same():
    assert parse_new_words({"zorb": "circle", "blorp": None}) == parse_new_words(["zorb=circle", "blorp"]) \
        == {"zorb": "circle", "blorp": None}


def test_the_textual_inversion_config_adds_its_word_to_the_builtin_vocabulary(tmp_path):
    config = load_configs([TEXTUAL_INVERSION])
    apply_init_from(config)
    vocab = prepare_new_words(config, tmp_path)
    params = config.model.params
    assert params.train_only_new_words and params.cond_stage_config.params.tokenizer_path == str(vocab)
    shipped = (REPO / "models/ldm/txt2img-shapes/shapes_vocab.txt").read_text().splitlines()
    assert vocab.read_text().splitlines() == [*shipped, "heart"]
    assert params.cond_stage_config.params.vocab_size == len(shipped) + 1
    overridden = load_configs([TEXTUAL_INVERSION], overrides=["model.params.new_words=[zorb=circle,blorp]"])
    assert parse_new_words(overridden.model.params.new_words) == {"zorb": "circle", "blorp": None}  # replaced
