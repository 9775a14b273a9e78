"""Export a training checkpoint (.ckpt) to weights-only safetensors.

    python scripts/export_weights.py logs/<run>/checkpoints/last.ckpt -o model.safetensors
    python scripts/export_weights.py logs/<run>/checkpoints/last.ckpt --model-dir models/ldm/my-model --dtype fp16

The `.ckpt` is read with weights_only=True (no arbitrary unpickling). Training-only `loss.*` weights
(LPIPS, discriminator) are dropped unless --keep-loss is given.

A LoRA run (configs/latent-diffusion/txt2img_lora.yaml) checkpoints its adapter alone:
    python scripts/export_weights.py logs/<run>/checkpoints/last.ckpt --lora -o my_lora.safetensors
    python scripts/export_weights.py logs/<run>/checkpoints/last.ckpt --lora --format kohya -o my_lora.safetensors
    python scripts/export_weights.py logs/<run>/checkpoints/last.ckpt --merge-lora --model-dir models/ldm/my-model \
        --vae logs/<decoder fine-tune run>
--lora writes the adapter alone, a small file in diffusers' key format (diffusers' `load_lora_adapter` /
`load_lora_weights`) or kohya's (AUTOMATIC1111, ComfyUI), for `ldm-txt2img --lora FILE[:SCALE]`; --merge-lora
writes the base model with the adapter merged into its weights (a model directory, or -o weights).

With --model-dir the export is a self-contained model directory for `ldm.inference.load_model` and the
sampling scripts, loadable wherever it is copied:
- `model.safetensors`: every weight sampling uses (the EMA weights folded into the model, no `model_ema.*`,
  the first stage included), parameters in --dtype (buffers such as the noise schedule stay float32);
  --share-first-stage leaves the frozen first stage out when the run's config names its own checkpoint (the
  built-in models share one first stage that way);
- `config.yaml`: the run's config (model, data and lightning sections), so `main.py --base <dir>/config.yaml
  -t` retrains it; file references inside the directory are relative to it;
- with --vae PATH (a first stage of the model's architecture, e.g. a decoder fine-tuned on the same images with
  configs/autoencoder/decoder_finetune.yaml), that first stage's weights in place of the model's own, so the
  directory samples with it without --vae (a run trained with `model.params.vae` carries its VAE the same way);
- the caption tokenizer's vocabulary (`vocab.txt`) when the config names one;
- `README.md`, a model card: what the model is, what it was trained on and for how long, how to use it (a
  fine-tuned model: the model it started from and the words it added to its vocabulary).
"""
import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from collections.abc import Mapping
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf


from ldm.checkpoint import inference_state_dict, load_checkpoint_file, load_state_dict, save_safetensors
from ldm.model_loading import build_model
from ldm.config import load_configs, safe_targets_only
from ldm.finetune import INIT_PARAMS, apply_init_from
from ldm.lora import export_trained_lora, is_lora_checkpoint, load_training_state, merge_trained_lora
from ldm.lora_formats import FORMATS
from ldm.util import instantiate_from_config
from ldm.modules.encoders.vocabulary import find_bert_vocab
from ldm.new_words import parse_new_words
from ldm.script_args import HelpFormatter, add_trust_config_arg, check_writable, command_line
from ldm.model_files import run_config_files
from ldm.model_loading import vae_hash
from ldm.vae import swap_vae

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def ckpt_run_configs(ckpt: Path) -> list[Path]:
    """The project and lightning configs main.py saved for the run that wrote `ckpt` (logs/<run>/configs/)."""
    run = ckpt.resolve().parent.parent
    files = run_config_files(run)
    if not files:
        raise SystemExit(f"error: no run config beside {ckpt} (expected {run / 'configs'}/*-project.yaml); "
                         "pass --config")
    return files


def sampling_state_dict(model: torch.nn.Module, config, dtype: torch.dtype,
                        share_first_stage: bool = False) -> dict[str, torch.Tensor]:
    """The weights sampling uses: EMA folded in, no training-only parts; with `share_first_stage`, the first stage
    left to its own file (when the config names one)."""
    with model.ema_scope():  # the EMA weights while inside (a no-op for a model without EMA)
        state = {k: v.clone() for k, v in inference_state_dict(model.state_dict()).items()
                 if not k.startswith("model_ema.")}
    first_stage = OmegaConf.select(config, "model.params.first_stage_config.params.ckpt_path")
    if first_stage and share_first_stage:
        shared = ("first_stage_model.", "cond_stage_model.") if model.cond_stage_model is model.first_stage_model \
            else ("first_stage_model.",)
        state = {k: v for k, v in state.items() if not k.startswith(shared)}
    parameters = {name for name, _ in model.named_parameters()}
    return {k: v.to(dtype) if k in parameters and v.is_floating_point() else v for k, v in state.items()}


def copy_vocabulary(config, model_dir: Path) -> Optional[Path]:
    """The caption tokenizer's vocabulary copied into the model directory, the config pointing at it there."""
    params = OmegaConf.select(config, "model.params.cond_stage_config.params")
    source = params.get("tokenizer_path") if params is not None else None
    if not source:
        return None
    found = find_bert_vocab(source)
    target = model_dir / found.name
    if found.resolve() != target.resolve():
        shutil.copyfile(found, target)
    params["tokenizer_path"] = found.name  # load_model reads it relative to the model directory
    return target


# The command that samples a model, by what it is conditioned on (cond_stage_key; inpainting models by class).
USAGE = {
    "caption": ("txt2img", '--prompt "..."'),
    "LR_image": ("superres", "--input low_res.png"),
    "segmentation": ("semantic2img", "--label label_map.png"),
    "objects_bbox": ("layout2img", "--layout boxes.json"),
    "class_label": ("sample_diffusion", "--class_label 0 -n 8"),
}
CONSOLE_NAMES = {"sample_diffusion": "sample"}  # the script files whose command is named otherwise


def usage_line(config, model_dir: Path) -> str:
    """The console command that samples this model (as the scripts/ caller too)."""
    params = config.model.get("params", {})
    if config.model.target.endswith("LatentInpaintDiffusion"):
        script, args = "inpaint", "--indir data/inpainting_examples"
    else:
        script, args = USAGE.get(params.get("cond_stage_key"), ("sample_diffusion", "-n 8"))
    return (f"ldm-{CONSOLE_NAMES.get(script, script)} --config {model_dir} {args}      "
            f"# or: python scripts/{script}.py --config {model_dir} ...")


LISTED_WORDS = 2000  # a vocabulary up to this size is listed in the model card itself


def vocabulary_section(vocabulary: Path) -> list[str]:
    """Model card lines listing the words a text encoder's vocabulary file holds (special tokens aside): where the
    unknown-word warning sends a user."""
    words = [w for w in vocabulary.read_text(encoding="utf-8").split() if not (w.startswith("[") and w.endswith("]"))]
    listed = ", ".join(words) if len(words) <= LISTED_WORDS else f"see `{vocabulary.name}`"
    return ["## Vocabulary", "",
            f"The caption encoder reads {len(words)} words (`{vocabulary.name}`); any other word is read as unknown, "
            "and sampling says so (`--strict_vocab` makes it an error). Case, punctuation the vocabulary lacks and "
            "curly quotes are ignored.", "", listed, ""]


# What a model does, by the input its condition encoder reads (`cond_stage_key`): the Hugging Face Hub's task
# (`pipeline_tag`; none where the Hub has no such task) and a tag naming it.
TASKS = {"caption": ("text-to-image", "text-to-image"), "LR_image": ("image-to-image", "super-resolution"),
         "segmentation": ("image-to-image", "semantic-synthesis"), "objects_bbox": (None, "layout-to-image"),
         "class_label": (None, "class-conditional")}


def front_matter(config) -> list[str]:
    """The Hugging Face model card metadata block (what the Hub lists and searches: license, library, task, tags)."""
    params = config.model.get("params", {})
    task, tag = TASKS.get(params.get("cond_stage_key"), ("unconditional-image-generation", "unconditional"))
    if params.get("conditioning_key") == "hybrid":  # the masked image concatenated, the caption attended to
        task, tag = "image-to-image", "inpainting"
    return ["---", "license: mit", "library_name: ldm", *([f"pipeline_tag: {task}"] if task else []),
            "tags:", "- latent-diffusion", "- ldm", f"- {tag}", "---", ""]


def limitations_section(config) -> list[str]:
    data = OmegaConf.select(config, "data.params.train.target", default="its training data")
    return ["## Limitations", "",
            f"It draws only what its training data (`{data}`) show, at the size it was trained at, and it has not "
            "been evaluated by this export: measure how often its samples do what was asked (the benchmarks above) "
            "before relying on it. It inherits whatever its training images and captions hold.", ""]


def new_words_section(new_words: Mapping[str, Optional[str]], only: bool) -> list[str]:
    """Model card lines naming the words a fine-tuning run added to the base model's vocabulary
    (ldm/new_words.py), and what each started from."""
    rows = [f"| `{word}` | {f'`{like}`' if like else 'the mean of the embedding table'} |"
            for word, like in new_words.items()]
    how = ("textual inversion: only their embeddings trained, every other weight is the base model's" if only
           else "their embeddings trained with the rest of the model")
    return ["## New words", "",
            f"Fine-tuning added {len(rows)} word{'s' * (len(rows) > 1)} to the base model's vocabulary ({how}); use "
            "them in prompts:", "", "| word | embedding started from |", "|---|---|", *rows, ""]


def write_model_card(model_dir: Path, config, ckpt: Path, dtype: str, vocabulary: Optional[Path] = None,
                     base_model: Optional[str] = None, merged_lora: bool = False,
                     new_words: Optional[Mapping[str, Optional[str]]] = None, only_new_words: bool = False,
                     vae: Optional[str] = None) -> Path:
    """README.md: what the model is, how it was trained (from the run's config and checkpoint; the model it was
    fine-tuned from, `base_model`, the words it added, `new_words`, and the first stage it carries in place of its
    own, `vae`: its path and hash as markdown), how to use it, and the words its caption encoder reads."""
    params = config.model.get("params", {})
    step = load_checkpoint_file(ckpt, mmap=True).get("global_step") if ckpt.suffix == ".ckpt" else None
    data = OmegaConf.select(config, "data.params.train", default=None)
    lines = [
        *front_matter(config),
        f"# {model_dir.name}", "",
        f"A `{config.model.target.rpartition('.')[2]}` model of the ldm toolkit, exported by "
        f"`ldm-export {ckpt} --model-dir {model_dir}`.", "",
        "| | |", "|---|---|",
        f"| conditioning | {params.get('conditioning_key') or 'none'} (`{params.get('cond_stage_key', '-')}`) |",
        f"| prediction | {params.get('parameterization', 'eps')} |",
        f"| latent | {params.get('channels', '?')} × {params.get('image_size', '?')}² |",
        f"| trained | {'?' if step is None else f'{step:,} optimizer steps'}, learning rate "
        f"{config.model.get('base_learning_rate', '?')}, batch size "
        f"{OmegaConf.select(config, 'data.params.batch_size', default='?')} |",
        f"| training data | `{data.target if data is not None else '?'}` |",
        *([f"| fine-tuned from | `{base_model}`{' (a LoRA, merged into its weights)' if merged_lora else ''} |"]
          if base_model else []),
        *([f"| new words | {', '.join(f'`{w}`' for w in new_words)} |"] if new_words else []),
        *([f"| first stage (VAE) | {vae}, in place of the config's own |"] if vae else []),
        f"| weights | {dtype}; `config.yaml` holds the full training config |", "",
        "Use it:", "", "```bash", usage_line(config, model_dir), "```", "",
        "Measured figures (prompt following, FID) are not part of an export: measure them with the benchmarks "
        "(`bench/convergence.py`, `bench/sampling.py`) and add them here.", "",
        *limitations_section(config),
        *(new_words_section(new_words, only_new_words) if new_words else []),
        *(vocabulary_section(vocabulary) if vocabulary is not None else []),
    ]
    path = model_dir / "README.md"
    path.write_text("\n".join(lines))
    return path


def default_out(opt: argparse.Namespace) -> Path:
    """-o, else beside the checkpoint (``last.safetensors``; a LoRA adapter ``last-lora.safetensors``, since a LoRA
    run's own ``last.safetensors`` is one already)."""
    if opt.out is not None:
        return opt.out
    return opt.ckpt.with_name(f"{opt.ckpt.stem}-lora.safetensors") if opt.lora else opt.ckpt.with_suffix(".safetensors")


def trained_lora_model(opt: argparse.Namespace, config: DictConfig) -> torch.nn.Module:
    """The LoRA run's model: its base weights (`init_from`) and the checkpoint's adapter."""
    if not OmegaConf.select(config, "model.params.lora_config"):
        raise SystemExit(f"error: {opt.ckpt} is not from a LoRA run (its config has no model.params.lora_config): "
                         "export it without --lora / --merge-lora")
    apply_init_from(config)
    with safe_targets_only(not opt.trust_config):
        model = instantiate_from_config(config.model)
    load_training_state(model, load_state_dict(opt.ckpt), str(opt.ckpt))
    return model.eval()


def refuse_to_lose(opt: argparse.Namespace) -> None:
    """Stop before any work when the export would replace the checkpoint it reads (a weights file where `-r`
    needs a training checkpoint), or, without --overwrite, an existing file or model directory; or when the
    output cannot be written at all."""
    check_writable(opt.model_dir if opt.model_dir is not None else (opt.out or opt.ckpt).parent,
                   "--model-dir" if opt.model_dir is not None else "-o")
    if opt.model_dir is not None:
        existing = [p.name for p in (opt.model_dir / "config.yaml", opt.model_dir / "model.safetensors") if p.exists()]
        if existing and not opt.overwrite:
            raise SystemExit(f"error: --model-dir {opt.model_dir} already holds a model ({', '.join(existing)}); "
                             "give a new directory, or --overwrite to replace it")
        return
    out = default_out(opt)
    if out.exists() and out.resolve() == opt.ckpt.resolve():
        raise SystemExit(f"error: -o {out} is the checkpoint being exported; write the weights elsewhere "
                         "(the training checkpoint is what `main.py -r` resumes from)")
    if out.exists() and not opt.overwrite:
        raise SystemExit(f"error: {out} exists; give another -o, or --overwrite to replace it")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("ckpt", type=Path, help="a Lightning .ckpt (or .pt/.pth state dict)")
    parser.add_argument("-o", "--out", type=Path, default=None, help="output .safetensors (default: beside ckpt)")
    parser.add_argument("--keep-loss", action="store_true", help="keep loss.* (discriminator, LPIPS) weights")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="write a model directory (config.yaml + model.safetensors) for sampling instead")
    parser.add_argument("--config", type=Path, nargs="+", default=None,
                        help="with --model-dir: the run's config files (default: logs/<run>/configs/ of the ckpt)")
    parser.add_argument("--share-first-stage", action="store_true",
                        help="with --model-dir: leave the frozen first stage out of model.safetensors when the run's "
                             "config names its own checkpoint (the directory then needs that file)")
    parser.add_argument("--vae", default=None, metavar="PATH",
                        help="with --model-dir (or --merge-lora -o): put this first stage's weights in place of the "
                             "model's own (a first stage's .safetensors or .ckpt, its model directory or its run, "
                             "of the model's architecture), so the export samples with it")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="with --model-dir: type of the stored parameters (fp16 halves the file)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing -o file or --model-dir model (the checkpoint read is never replaced)")
    lora = parser.add_argument_group("LoRA runs")
    lora.add_argument("--lora", action="store_true",
                      help="write the run's LoRA adapter alone (-o FILE.safetensors), for --lora FILE[:SCALE] when "
                           "sampling and for diffusers / kohya-format tools")
    lora.add_argument("--format", choices=FORMATS, default=None,
                      help="with --lora: the key format (diffusers: unet.<module>.lora_A/B.weight; kohya: "
                           "lora_unet_<module>.lora_down/up.weight + .alpha); default: the run's "
                           "lora_config.file_format (diffusers unless the config says otherwise)")
    lora.add_argument("--merge-lora", action="store_true",
                      help="write the base model with the run's LoRA merged into its weights (--model-dir or -o)")
    add_trust_config_arg(parser)
    opt = parser.parse_args()
    if opt.lora and (opt.merge_lora or opt.model_dir is not None):
        parser.error("--lora writes the adapter alone (-o FILE.safetensors); for a model directory use --merge-lora")
    if opt.vae and opt.lora:
        parser.error("--vae: a LoRA file holds the adapter alone; give --vae when sampling with it, or export the "
                     "model merged (--merge-lora --model-dir DIR --vae PATH)")
    if opt.vae and not (opt.model_dir is not None or opt.merge_lora):
        parser.error("--vae goes with --model-dir or --merge-lora (a whole model to carry it); a first stage's own "
                     "checkpoint exports as it is")
    if opt.vae and opt.share_first_stage:
        parser.error("--vae puts a first stage of its own in model.safetensors: leave out --share-first-stage")
    refuse_to_lose(opt)
    vae_card = f"`{opt.vae}` (VAE hash {vae_hash(opt.vae)})" if opt.vae else None  # a bad path stops it here
    config, model = None, None
    if opt.lora or opt.merge_lora:
        config = load_configs(opt.config or ckpt_run_configs(opt.ckpt))
        model = trained_lora_model(opt, config)
        if opt.lora:
            fmt = opt.format or model.lora_settings.file_format
            out = export_trained_lora(model, default_out(opt), fmt, metadata={"source": str(opt.ckpt)})
            print(f"wrote {out}: the LoRA adapter in {fmt} format ({out.stat().st_size / 2**20:.2f} MiB)")
            if model.new_words:
                # The file holds the adapter alone: on the base model the new words would be unknown.
                print(f"warning: the run also trained new words ({', '.join(model.new_words)}), which the adapter "
                      f"file does not hold; export --merge-lora --model-dir DIR to keep them", file=sys.stderr)
            return
        merge_trained_lora(model)
        OmegaConf.select(config, "model.params").pop("lora_config")
        if opt.vae:
            swap_vae(model, opt.vae)
    if opt.model_dir is not None:
        config = config if config is not None else load_configs(opt.config or ckpt_run_configs(opt.ckpt))
        if OmegaConf.select(config, "model.params.lora_config"):
            raise SystemExit(f"error: {opt.ckpt} holds a LoRA adapter alone: export the model with it merged "
                             "(--merge-lora), or the adapter (--lora -o FILE.safetensors)")
        base_model = OmegaConf.select(config, "model.params.init_from")
        # The first stage the directory carries in place of the config's own file: --vae, or the run's own VAE
        # (`model.params.vae`, swapped in when the run's model was built, so its weights are in the checkpoint).
        vae = opt.vae or OmegaConf.select(config, "model.params.vae")
        new_words = parse_new_words(OmegaConf.select(config, "model.params.new_words", default=None))
        only_new_words = bool(OmegaConf.select(config, "model.params.train_only_new_words", default=False))
        # The directory holds every weight: the training run's starting point is not needed to load it.
        for init in INIT_PARAMS:
            OmegaConf.select(config, "model.params", default={}).pop(init, None)
        if model is None:
            # The checkpoint is read (and fits the config) before anything is written: a bad checkpoint leaves a
            # model directory that was there as it was.
            with tempfile.TemporaryDirectory() as scratch:
                OmegaConf.save(config, Path(scratch) / "config.yaml")
                model = build_model(Path(scratch) / "config.yaml", opt.ckpt, trust_config=opt.trust_config)
            if opt.vae:
                swap_vae(model, opt.vae)
        state = sampling_state_dict(model, config, DTYPES[opt.dtype], opt.share_first_stage and not vae)
        if not opt.share_first_stage or vae:
            OmegaConf.select(config, "model.params.first_stage_config.params", default={}).pop("ckpt_path", None)
        opt.model_dir.mkdir(parents=True, exist_ok=True)
        vocabulary = copy_vocabulary(config, opt.model_dir)
        config_path = opt.model_dir / "config.yaml"
        OmegaConf.save(config, config_path)
        out = save_safetensors(state, opt.model_dir / "model.safetensors",
                               metadata={"source": str(opt.ckpt), "dtype": opt.dtype})
        card = write_model_card(opt.model_dir, config, opt.ckpt, opt.dtype, vocabulary, base_model, opt.merge_lora,
                                new_words, only_new_words, vae_card or (f"`{vae}`" if vae else None))
        written = ", ".join(str(p) for p in (config_path, out, vocabulary, card) if p is not None)
        print(f"wrote {written} ({out.stat().st_size / 2**20:.2f} MiB of weights)")
        return
    out = default_out(opt)
    if model is not None:  # --merge-lora -o: the merged model's weights
        state = sampling_state_dict(model, config, torch.float32)
        save_safetensors(state, out, metadata={"source": str(opt.ckpt), "merged_lora": "true"})
        print(f"wrote {out} ({len(state)} tensors, the LoRA merged)")
        return
    state = load_state_dict(opt.ckpt)
    if is_lora_checkpoint(state):
        raise SystemExit(f"error: {opt.ckpt} holds a LoRA adapter alone: export it with --lora -o FILE.safetensors, "
                         "or the whole model with it merged (--merge-lora)")
    if not opt.keep_loss:
        state = inference_state_dict(state)
    save_safetensors(state, out, metadata={"source": str(opt.ckpt)})
    print(f"wrote {out} ({len(state)} tensors)")


cli = command_line(main)
