"""Command-line options every sampling script shares: which model, where it runs, which sampler."""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import json
import logging
import math
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ldm import __version__
from ldm.checkpoint import CheckpointError
from ldm.console import configure_logging
from ldm.image_io import next_index, save_grid, save_images
from ldm.inference import PRECISIONS, load_model
from ldm.model_loading import vae_hash, weights_hash
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.models.diffusion.samplers import SAMPLERS, sampler_help
from ldm.models.diffusion.spacing import SIGMA_SPACINGS
from ldm.modules.encoders.tokenization import PromptWarning
from ldm.util import read_utf8

# Stable Diffusion's scripts say "full" / "autocast".
PRECISION_ALIASES = {"full": "fp32", "autocast": "bf16"}


def add_model_args(parser: argparse.ArgumentParser, default_model: Optional[str] = "txt2img") -> None:
    group = parser.add_argument_group("model")
    default = f"the built-in {default_model!r} model" if default_model else "none"
    group.add_argument("--config", default=default_model,
                       help=f"a built-in model name, a model directory (config.yaml + model.safetensors) or a "
                            f"config .yaml (default: {default})")
    group.add_argument("--ckpt", default=None,
                       help="weights (.safetensors or a training .ckpt); default: model.safetensors beside the config")
    group.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                       help="apply a LoRA (diffusers or kohya .safetensors, e.g. from ldm-export --lora) at SCALE "
                            "(default 1), merged into the weights; repeat for several (needs pip install 'ldm[lora]')")
    group.add_argument("--vae", default=None, metavar="PATH",
                       help="decode (and encode) with this first stage instead of the model's own: a first stage's "
                            ".safetensors or .ckpt, its model directory or its training run, of the model's "
                            "architecture (e.g. a decoder fine-tuned with configs/autoencoder/decoder_finetune.yaml)")
    group.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    group.add_argument("--precision", default="fp32", choices=[*PRECISIONS, *PRECISION_ALIASES],
                       help="sampling precision: fp32, or autocast to bf16 (CPU or GPU) / fp16 (GPU)")
    add_trust_config_arg(group)
    group.add_argument("--verbose", action="store_true",
                       help="also print the library's messages (what was loaded, the sampler's timesteps, ...)")


def add_trust_config_arg(parser: Any) -> None:
    parser.add_argument("--trust_config", action="store_true",
                        help="build whatever the model's config names; by default only classes of ldm and torch.nn "
                             "(a shared model directory cannot run code)")


def guidance_scale(text: str) -> float:
    """argparse type of --scale: a finite number (nan or inf would make every image black)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number; use e.g. 3 (1 = no guidance)")
    return value


def _integer(text: str, minimum: int, too_small: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(too_small.format(value=value))
    return value


def non_negative_int(text: str) -> int:
    """argparse type of counts where 0 means "the default", such as --n_rows: an integer of at least 0."""
    return _integer(text, 0, "{value} is negative (0 means the default)")


def positive_int(text: str) -> int:
    """argparse type of counts such as --n_samples: an integer of at least 1."""
    return _integer(text, 1, "{value} is not at least 1")


def seed(text: str) -> int:
    """argparse type of --seed: an integer torch accepts (0 to 2**63 − 1)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"{value} is out of range: use 0 to {2 ** 63 - 1}")
    return value


def add_strict_vocab_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--strict_vocab", action="store_true",
                        help="stop with an error when a prompt holds words the model's vocabulary lacks (by default "
                             "a one-line warning names them and where the model's words are listed)")


def add_negative_prompt_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--negative_prompt", default="",
                        help="what guidance steers away from, in place of the empty prompt (needs --scale > 1; "
                             "default: none)")


def add_sampler_args(parser: argparse.ArgumentParser, default_steps: int = 50, default_sampler: str = "ddim") -> None:
    group = parser.add_argument_group("sampler")
    group.add_argument("--sampler", default=default_sampler, choices=list(SAMPLERS), metavar="SAMPLER",
                       help=f"(default {default_sampler}) {sampler_help()}")
    group.add_argument("--spacing", default=None, choices=SIGMA_SPACINGS,
                       help="noise levels of the σ-space samplers (default: the model's own; karras for VP models, "
                            "uniform t for flow models)")
    group.add_argument("--steps", "--ddim_steps", dest="steps", type=int, default=default_steps,
                       help="number of sampling steps")
    group.add_argument("--ddim_eta", "--eta", dest="eta", type=float, default=0.0,
                       help="DDIM eta (0 = deterministic) / Euler ancestral noise scale")
    group.add_argument("--plms", action="store_true", help="use the PLMS sampler (same as --sampler plms)")
    group.add_argument("--seed", type=seed, default=42, help="random seed (same seed, same images)")


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Problems with the user's input (a missing model or file, a bad size, a step count the schedule cannot
    take) end the script with their message and exit status 1 instead of a traceback."""
    try:
        yield
    except (FileNotFoundError, ValueError, CheckpointError) as e:  # ConfigError is a ValueError
        raise SystemExit(f"error: {e}") from e


@functools.lru_cache(maxsize=1)
def installed_commands() -> dict[str, str]:
    """``python scripts/X.py`` and ``python main.py`` -> the installed console command running the same code
    (``ldm-txt2img``, ``ldm-train``; pyproject.toml's [project.scripts]); empty when the package is not installed."""
    commands = {}
    for entry in importlib.metadata.entry_points(group="console_scripts"):
        module = entry.value.split(":")[0]
        if module.startswith("ldm.cli."):
            script = "main" if module == "ldm.cli.train" else module.rsplit(".", 1)[1]
            commands[f"python {'' if script == 'main' else 'scripts/'}{script}.py"] = entry.name
    return commands


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """`--help` as written in each program's docstring, with every option's default shown (unless its help already
    says it, or there is none to show). Run as an installed command (``ldm-txt2img``, where a wheel has no
    scripts/), the docstring's ``python scripts/X.py`` examples name the commands instead."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if not self._prog.endswith(".py"):
            for script, command in installed_commands().items():
                text = text.replace(script, command)
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or "default" in text or action.default in (None, False, "", [], argparse.SUPPRESS)
                or isinstance(action, argparse._HelpAction)):
            return text
        return f"{text} (default: %(default)s)"


def command_line(main: Callable[[], Any]) -> Callable[[], None]:
    """The console entry point of a script's `main` (``ldm-txt2img``, ``python scripts/txt2img.py``): user
    errors end it with one line (`user_errors`), and an integer `main` returns is its exit status."""

    def run() -> None:
        configure_logging(logging.WARNING)  # the library's messages with --verbose (`model_from_args`)
        with user_errors(), one_line_prompt_warnings():
            status = main()
        if status:
            raise SystemExit(status)

    return run


@contextlib.contextmanager
def one_line_prompt_warnings() -> Iterator[None]:
    """`PromptWarning`s (a prompt cut short, words the model does not know) printed as ``warning: <message>``,
    one line on stderr, rather than with Python's file, line and source."""
    original = warnings.showwarning

    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if issubclass(category, PromptWarning):
            print(f"warning: {message}", file=sys.stderr if file is None else file, flush=True)
        else:
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original


def model_from_args(opt: argparse.Namespace) -> LatentDiffusion:
    if opt.verbose:
        configure_logging(logging.INFO)
    precision = PRECISION_ALIASES.get(opt.precision, opt.precision)
    with user_errors():
        model = load_model(opt.config, opt.ckpt, opt.device, precision, trust_config=opt.trust_config,
                           strict_vocab=getattr(opt, "strict_vocab", False), lora=getattr(opt, "lora", ()),
                           vae=getattr(opt, "vae", None))
        opt.model_hash = weights_hash(opt.config, opt.ckpt)  # for the images' metadata (`generation_text`)
        if getattr(opt, "vae", None):
            opt.vae_hash = vae_hash(opt.vae)
    return model


def add_output_args(parser: argparse.ArgumentParser, default_outdir: str) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--outdir", type=Path, default=Path(default_outdir), help="where to write")
    group.add_argument("--n_samples", type=positive_int, default=4, help="samples per batch (grid columns)")
    group.add_argument("--n_iter", type=positive_int, default=1, help="batches per prompt")
    group.add_argument("--n_rows", type=non_negative_int, default=0, help="images per row of the grid (0: --n_samples)")
    group.add_argument("--skip_grid", action="store_true", help="do not write the grid")
    group.add_argument("--skip_save", action="store_true", help="do not write the individual samples")


def check_writable(folder: Path, flag: str = "--outdir") -> None:
    """A ValueError naming `flag` unless files can be written in `folder` (or where it would be created): checked
    before a script loads its model, so an output problem is found before any work, and nothing is created."""
    existing = Path(folder).absolute()
    while not existing.exists():  # created when the first output is written, not before
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is not a folder")
        with tempfile.TemporaryFile(dir=existing):  # what permission bits cannot tell (root, read-only mounts)
            pass
    except OSError as e:
        raise ValueError(f"{flag} {folder}: cannot write there ({e.strerror or e})") from e


def generation_text(opt: argparse.Namespace, prompt: str, seed: int, **extra: str) -> dict[str, str]:
    """PNG text metadata of a generated image: what it was asked for, how it was sampled and by which model (its
    name and the first 10 hex digits of its weights file's SHA-256, as AUTOMATIC1111's "Model hash"; a --vae the
    same way, its "VAE" and "VAE hash"): enough to make it again. `save_png` adds the size and the `parameters` text
    other tools read."""
    text = {"prompt": prompt, "negative_prompt": getattr(opt, "negative_prompt", None) or "", "seed": str(seed),
            "sampler": "plms" if getattr(opt, "plms", False) else opt.sampler, "steps": str(opt.steps),
            "scale": str(getattr(opt, "scale", 1.0)), "eta": str(opt.eta), "model": str(opt.config),
            "model_hash": getattr(opt, "model_hash", "")}
    for optional in ("ckpt", "vae", "vae_hash", "spacing", "strength"):
        if getattr(opt, optional, None) is not None:
            text[optional] = str(getattr(opt, optional))
    if getattr(opt, "lora", None):
        text["lora"] = ", ".join(opt.lora)
    return {**text, **extra, "software": f"ldm {__version__}"}


class SampleWriter:
    """Writes each batch as numbered PNGs in <outdir>/samples/ as soon as it exists (an interrupted run keeps
    what it made), then one grid <outdir>/grid-NNNN.png of all batches, a row each (the reference's layout)."""

    def __init__(self, opt: argparse.Namespace) -> None:
        """Made before the model is loaded: an --outdir that cannot be written is an error before any work."""
        self.opt = opt
        self.batches: list[torch.Tensor] = []
        self.prompts: list[str] = []
        check_writable(opt.outdir)

    def add(self, images: torch.Tensor, prompt: str, seed: Union[int, Sequence[int]]) -> None:
        """Write a batch made from `prompt` with `seed` (the batch's, or one per image); each PNG carries how it
        was made (`generation_text`)."""
        seeds = [seed] * len(images) if isinstance(seed, int) else list(seed)
        if not self.opt.skip_save:
            save_images(images, self.opt.outdir / "samples", text=[generation_text(self.opt, prompt, s) for s in seeds])
        self.batches.append(images.cpu())
        self.prompts.append(prompt)  # the grid's row


    def finish(self, grid: Optional[torch.Tensor] = None, columns: Optional[int] = None) -> None:
        """Report where the samples are and write the grid: of every batch (a row each, --n_samples or --n_rows
        columns), or `grid` with `columns` per row when a script lays it out itself."""
        if not self.opt.skip_save:
            print(f"samples: {self.opt.outdir / 'samples'}")
        if not self.opt.skip_grid:
            path = self.opt.outdir / f"grid-{next_index(self.opt.outdir, 'grid-'):04}.png"
            images = torch.cat(self.batches) if grid is None else grid
            columns = columns or self.opt.n_rows or self.opt.n_samples
            # The grid carries the settings of its first image and every row's prompt.
            prompts = self.prompts or [getattr(self.opt, "prompt", None) or ""]
            save_grid(images, path, nrow=columns,
                      text={**generation_text(self.opt, prompts[0], self.opt.seed), "prompts": json.dumps(prompts)})
            print(f"grid ({-(-len(images) // columns)} rows x {columns}): {path}")


def read_prompt_file(parser: argparse.ArgumentParser, path: Path) -> list[str]:
    """The non-blank lines of a --from-file prompt file; a missing or empty file is a usage error."""
    if not path.is_file():
        parser.error(f"--from-file {path}: no such file (give a text file with one prompt per line)")
    try:
        prompts = [line.strip() for line in read_utf8(path).splitlines() if line.strip()]
    except ValueError as e:
        parser.error(f"--from-file {e}")
    if not prompts:
        parser.error(f"--from-file {path} has no prompts (write one prompt per line)")
    return prompts


def sampler_kwargs(opt: argparse.Namespace) -> dict[str, Any]:
    return {"sampler": "plms" if opt.plms else opt.sampler, "steps": opt.steps, "eta": opt.eta,
            "spacing": opt.spacing, "seed": opt.seed}
