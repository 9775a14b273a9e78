"""Teach a trained text model new words: its weights moved onto a larger vocabulary, ready to fine-tune.

    python scripts/grow_vocabulary.py models/ldm/txt2img-shapes --vocab ldm/data/shapes_vocab.txt --max_seq_len 20 \\
        --like big=large tiny=small -o grown.safetensors
    python main.py --base configs/latent-diffusion/txt2img.yaml -t model.params.ckpt_path=grown.safetensors \\
        model.params.ignore_keys=[first_stage_model.]

Words both vocabularies hold keep their trained embedding; a new word starts from the word --like names for
it, else from the mean of the trained words; positions past the old --max_seq_len start from the last trained
one (ldm/modules/encoders/vocabulary_transfer.py). The output holds the model directory's weights with the
text encoder moved; train it with a config whose encoder names the new vocabulary and max_seq_len.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import OmegaConf

from ldm.checkpoint import load_state_dict, save_safetensors
from ldm.modules.encoders.vocabulary import find_bert_vocab
from ldm.modules.encoders.vocabulary_transfer import grow_text_encoder, read_vocabulary
from ldm.script_args import HelpFormatter, command_line


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("model_dir", type=Path, help="a text model's directory (config.yaml + model.safetensors)")
    parser.add_argument("--vocab", type=Path, required=True, help="the new vocab.txt (a superset of words, any order)")
    parser.add_argument("--max_seq_len", type=int, default=None, help="new number of positions (default: as trained)")
    parser.add_argument("--like", nargs="*", default=[], metavar="NEW=OLD",
                        help="start a new word from the embedding of a word the model knows")
    parser.add_argument("-o", "--out", type=Path, required=True, help="the weights to write (.safetensors)")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = get_parser()
    opt = parser.parse_args(argv)
    like = {}
    for pair in opt.like:
        new, sep, old = pair.partition("=")
        if not sep or not new or not old:
            parser.error(f"--like {pair!r}: use NEW=OLD, e.g. big=large")
        like[new] = old
    config_path = opt.model_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: give a model directory (ldm-export --model-dir writes one)")
    params = OmegaConf.load(config_path).model.params.cond_stage_config.params
    old_vocab = find_bert_vocab(opt.model_dir / params.tokenizer_path if params.get("tokenizer_path") else None)
    old_words, new_words = read_vocabulary(str(old_vocab)), read_vocabulary(str(opt.vocab))
    state = load_state_dict(opt.model_dir / "model.safetensors")
    grown = grow_text_encoder(state, old_words, new_words, opt.max_seq_len or int(params.get("max_seq_len", 77)), like)
    save_safetensors(grown, opt.out, metadata={"source": str(opt.model_dir), "vocabulary": str(opt.vocab)})
    added = [w for w in new_words if w not in set(old_words)]
    print(f"wrote {opt.out}: {len(new_words)} tokens ({len(added)} new: {', '.join(added)})")


cli = command_line(main)
