"""Export a training checkpoint (.ckpt) to weights-only safetensors.

    python scripts/export_weights.py logs/<run>/checkpoints/last.ckpt -o model.safetensors
    python scripts/export_weights.py logs/<run>/checkpoints/last.ckpt --model-dir models/ldm/my-model --dtype fp16

The `.ckpt` is read with weights_only=True (no arbitrary unpickling). Training-only `loss.*` weights
(LPIPS, discriminator) are dropped unless --keep-loss is given.

With --model-dir the export is a self-contained model directory for `ldm.inference.load_model` and the
sampling scripts, loadable wherever it is copied:
- `model.safetensors`: every weight sampling uses (the EMA weights folded into the model, no `model_ema.*`,
  the first stage included), parameters in --dtype (buffers such as the noise schedule stay float32);
  --share-first-stage leaves the frozen first stage out when the run's config names its own checkpoint (the
  built-in models share one first stage that way);
- `config.yaml`: the run's config (model, data and lightning sections), so `main.py --base <dir>/config.yaml
  -t` retrains it; file references inside the directory are relative to it;
- the caption tokenizer's vocabulary (`vocab.txt`) when the config names one;
- `README.md`, a model card: what the model is, what it was trained on and for how long, how to use it.
"""
import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
from omegaconf import OmegaConf


from ldm.checkpoint import inference_state_dict, load_checkpoint_file, load_state_dict, save_safetensors
from ldm.model_loading import INIT_PARAMS, build_model
from ldm.config import load_configs
from ldm.modules.encoders.vocabulary import find_bert_vocab
from ldm.script_args import HelpFormatter, add_trust_config_arg, check_writable, command_line
from ldm.cli.train import run_config_files

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


def write_model_card(model_dir: Path, config, ckpt: Path, dtype: str, vocabulary: Optional[Path] = None) -> Path:
    """README.md: what the model is, how it was trained (from the run's config and checkpoint), how to use it, and
    the words its caption encoder reads."""
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
        f"| weights | {dtype}; `config.yaml` holds the full training config |", "",
        "Use it:", "", "```bash", usage_line(config, model_dir), "```", "",
        "Measured figures (prompt following, FID) are not part of an export: measure them with the benchmarks "
        "(`bench/convergence.py`, `bench/sampling.py`) and add them here.", "",
        *limitations_section(config),
        *(vocabulary_section(vocabulary) if vocabulary is not None else []),
    ]
    path = model_dir / "README.md"
    path.write_text("\n".join(lines))
    return path


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
    out = opt.out or opt.ckpt.with_suffix(".safetensors")
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
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="with --model-dir: type of the stored parameters (fp16 halves the file)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing -o file or --model-dir model (the checkpoint read is never replaced)")
    add_trust_config_arg(parser)
    opt = parser.parse_args()
    refuse_to_lose(opt)
    if opt.model_dir is not None:
        config = load_configs(opt.config or ckpt_run_configs(opt.ckpt))
        # The directory holds every weight: the training run's starting point is not needed to load it.
        for init in INIT_PARAMS:
            OmegaConf.select(config, "model.params", default={}).pop(init, None)
        # The checkpoint is read (and fits the config) before anything is written: a bad checkpoint leaves a
        # model directory that was there as it was.
        with tempfile.TemporaryDirectory() as scratch:
            OmegaConf.save(config, Path(scratch) / "config.yaml")
            model = build_model(Path(scratch) / "config.yaml", opt.ckpt, trust_config=opt.trust_config)
        state = sampling_state_dict(model, config, DTYPES[opt.dtype], opt.share_first_stage)
        if not opt.share_first_stage:
            OmegaConf.select(config, "model.params.first_stage_config.params", default={}).pop("ckpt_path", None)
        opt.model_dir.mkdir(parents=True, exist_ok=True)
        vocabulary = copy_vocabulary(config, opt.model_dir)
        config_path = opt.model_dir / "config.yaml"
        OmegaConf.save(config, config_path)
        out = save_safetensors(state, opt.model_dir / "model.safetensors",
                               metadata={"source": str(opt.ckpt), "dtype": opt.dtype})
        card = write_model_card(opt.model_dir, config, opt.ckpt, opt.dtype, vocabulary)
        written = ", ".join(str(p) for p in (config_path, out, vocabulary, card) if p is not None)
        print(f"wrote {written} ({out.stat().st_size / 2**20:.2f} MiB of weights)")
        return
    state = load_state_dict(opt.ckpt)
    if not opt.keep_loss:
        state = inference_state_dict(state)
    out = opt.out or opt.ckpt.with_suffix(".safetensors")
    save_safetensors(state, out, metadata={"source": str(opt.ckpt)})
    print(f"wrote {out} ({len(state)} tensors)")


cli = command_line(main)
