"""Train or evaluate any model of the toolkit from OmegaConf YAML configs (the CompVis `main.py` CLI).

    python main.py --base configs/autoencoder/autoencoder_kl_shapes_f4.yaml -t
    python main.py -r logs/<run>                # resume: optimizer, step and EMA state continue exactly
    python main.py --base a.yaml b.yaml -t model.params.base_learning_rate=1e-4 --max_steps 500

Configs are merged left to right, then `key.path=value` overrides. Trainer options come from the
config's `lightning.trainer` block and from `--<Trainer argument>` flags (flags win). A run writes
`logs/<date>_<name>/{configs,checkpoints,images,csv,tensorboard}`.
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import logging
import math
import os
import shutil
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

# Reference configs name `main.DataModuleFromConfig`, `main.ImageLogger`, ...: `main` is this module
# (`ldm.config.REFERENCE_MODULES`), so they resolve here.
from ldm.callbacks import ImageLogger, LastCheckpoint, SetupCallback  # noqa: F401
from ldm.checkpoint import CheckpointError, is_disk_full
from ldm.console import configure_logging
from ldm.config import ConfigError, describe_key, load_configs, refuse_unsafe_targets, target_of
from ldm.csv_logger import ResumableCSVLogger
from ldm.data.datamodule import DataModuleFromConfig  # noqa: F401
from ldm.divergence import SafeCheckpointIO, TrainingDiverged, remove_partial_writes
from ldm.finetune import apply_init_from
from ldm.model_files import run_config_files
from ldm.modules.encoders.caption_vocabulary import prepare_run_vocabulary
from ldm.new_words import prepare_new_words
from ldm.prior_images import prepare_prior_preservation
from ldm.run_lock import LOCK_NAME, RunLocked, lock_run
from ldm.script_args import HelpFormatter
from ldm.util import instantiate_from_config

log = logging.getLogger(__name__)


class _DropLightningAdverts(logging.Filter):
    """Lightning's rank-zero log advertises a cloud service at every fit ("💡 Tip: ..."); nothing about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_DropLightningAdverts())
# Lightning 2.6 trips over its own deprecation on every fit; it says nothing about the user's run.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
# Latent diffusion keeps its frozen first stage (and a frozen condition encoder) in eval mode on purpose.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")

# Our own flags; every other `--name value` that names a `pytorch_lightning.Trainer` argument is a
# trainer option, and bare `a.b=c` words are config overrides.
OWN_FLAGS = {"name", "resume", "base", "train", "no_test", "debug", "seed", "postfix", "logdir",
             "scale_lr", "gpus", "trust_config"}


def _parse_value(text: str) -> Any:
    """`--devices 2` -> 2, `--precision bf16-mixed` -> 'bf16-mixed', `--devices [0,1]` -> [0, 1]."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _str2bool(text: str) -> bool:
    if text.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if text.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {text!r}")


BOOL_FLAGS = {"-t", "--train", "--no-test", "-d", "--debug", "--scale_lr"}
BOOL_WORDS = {"yes", "true", "t", "y", "1", "no", "false", "f", "n", "0"}


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate `key.path=value` overrides from flags, wherever they stand.

    Left in place, `--base a.yaml x=1` would read `x=1` as a config file, and `-t x=1` would read it as
    `-t`'s optional boolean; boolean flags given alone are made explicit (`-t true`).
    """
    overrides = [t for t in argv if "=" in t and not t.startswith("-")]
    flags = [t for t in argv if t not in overrides]
    out = []
    for i, token in enumerate(flags):
        out.append(token)
        following = flags[i + 1] if i + 1 < len(flags) else None
        if token in BOOL_FLAGS and (following is None or following.lower() not in BOOL_WORDS):
            out.append("true")
    return out, overrides


def get_parser() -> argparse.ArgumentParser:
    import pytorch_lightning as pl

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("-n", "--name", type=str, default="", help="postfix for the log directory")
    parser.add_argument("-r", "--resume", type=str, default="",
                        help="resume from a log directory or a checkpoint inside one")
    parser.add_argument("-b", "--base", nargs="*", metavar="base_config.yaml", default=[],
                        help="config files, merged left to right; later ones override earlier ones")
    parser.add_argument("-t", "--train", type=_str2bool, const=True, default=None, nargs="?",
                        help="train (the default with -r; -t false resumes without training)")
    parser.add_argument("--no-test", dest="no_test", type=_str2bool, const=True, default=False, nargs="?",
                        help="skip testing after training")
    parser.add_argument("-d", "--debug", type=_str2bool, nargs="?", const=True, default=False,
                        help="debug run: verbose logging, anomaly detection, logs moved to <logdir>/debug_runs")
    parser.add_argument("-s", "--seed", type=int, default=23, help="seed for seed_everything")
    parser.add_argument("-f", "--postfix", type=str, default="", help="post-postfix for the run name")
    parser.add_argument("-l", "--logdir", type=str, default="logs", help="directory for logging")
    parser.add_argument("--scale_lr", type=_str2bool, nargs="?", const=True, default=False,
                        help="scale base-lr by ngpu * batch_size * n_accumulate (off by default)")
    parser.add_argument("--trust_config", action="store_true",
                        help="with -r: build whatever the run's saved configs name (by default only classes of ldm, "
                             "torch.nn/optim and Lightning's callbacks and loggers: a run from elsewhere runs no code)")
    parser.add_argument("--gpus", type=str, default=None,
                        help="legacy: '0,1' means --accelerator gpu --devices [0,1]")
    trainer_group = parser.add_argument_group("trainer", "any pytorch_lightning.Trainer argument")
    for name, param in inspect.signature(pl.Trainer.__init__).parameters.items():
        if name in ("self", "callbacks", "plugins") or name in OWN_FLAGS:  # objects, given in the config
            continue
        trainer_group.add_argument(f"--{name}", type=_parse_value, default=None, help=argparse.SUPPRESS)
    return parser


def resolve_trainer_options(lightning_config: DictConfig, opt: argparse.Namespace) -> dict[str, Any]:
    """Merge `lightning.trainer` with command-line trainer flags (flags win); map legacy `--gpus`."""
    options = OmegaConf.to_container(lightning_config.get("trainer", OmegaConf.create()), resolve=True)
    import pytorch_lightning as pl

    names = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}
    unknown = sorted(set(options) - names - {"gpus"})
    if unknown:
        raise ConfigError(f"'lightning.trainer' has unknown Trainer option(s) {unknown}; "
                          f"see `python main.py --help` and the pytorch_lightning.Trainer docs")
    for name in names:
        value = getattr(opt, name, None)
        if value is not None and name not in OWN_FLAGS:
            options[name] = value
    gpus = opt.gpus if opt.gpus is not None else options.pop("gpus", None)
    options.pop("gpus", None)
    if gpus not in (None, "", -1):
        ids = [int(g) for g in str(gpus).strip(",").split(",") if g.strip() != ""]
        options["accelerator"] = "gpu"
        options["devices"] = ids
        log.info("legacy --gpus %s -> accelerator=gpu, devices=%s", gpus, ids)
    options.setdefault("accelerator", "auto")
    if isinstance(options.get("val_check_interval"), int) and "check_val_every_n_epoch" not in options:
        # An integer interval counts optimizer batches across epochs, so a config runs on a folder of any size
        # (Lightning otherwise requires it to fit in one epoch: "val_check_interval (5000) must be less than or
        # equal to the number of the training batches (282)").
        options["check_val_every_n_epoch"] = None
    return options


CLAIMED_RUN_DIRS: list[Path] = []


def release_empty_run_dirs() -> None:
    """Remove the run directories this process claimed and never wrote into (it stopped on a user error)."""
    for path in CLAIMED_RUN_DIRS:
        if path.is_dir() and {p.name for p in path.iterdir()} <= {LOCK_NAME}:
            (path / LOCK_NAME).unlink(missing_ok=True)
            path.rmdir()


def claim_run_name(logdir: Path, now: str, suffix: str) -> str:
    """`now`, or `now-2`, `now-3`, ... : the first whose run directory `logdir/<now><suffix>` did not exist, made
    here (atomically, so two runs started in the same second never share a directory)."""
    try:
        logdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"-l/--logdir {logdir}: cannot create it ({e.strerror}); give a directory you can "
                          "write") from e
    if not os.access(logdir, os.W_OK | os.X_OK):
        raise ConfigError(f"-l/--logdir {logdir} is not writable; give a directory you can write")
    for attempt in range(1, 1000):
        candidate = now if attempt == 1 else f"{now}-{attempt}"
        try:
            (logdir / f"{candidate}{suffix}").mkdir()
            CLAIMED_RUN_DIRS.append(logdir / f"{candidate}{suffix}")
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"999 runs named {now}{suffix} already exist in {logdir}; pick another -n/--name")


def _resolve_resume(resume: str) -> tuple[Path, Path]:
    """(logdir, checkpoint) for `-r logs/<run>` or `-r logs/<run>/checkpoints/x.ckpt`."""
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"cannot resume: {path} does not exist (give a run directory or a .ckpt in it)")
    if path.is_file():
        logdir = path.parent.parent
        return logdir, path
    ckpt = path / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        raise FileNotFoundError(f"cannot resume from {path}: no checkpoints/last.ckpt in it")
    return path, ckpt


def learning_rate(model: Any, config: DictConfig, trainer: Any, scale_lr: bool) -> float:
    """Set `model.learning_rate` from `model.base_learning_rate`, printing the arithmetic."""
    base_lr = config.model.get("base_learning_rate", 1e-4)
    if isinstance(base_lr, bool) or not isinstance(base_lr, (int, float)) or not math.isfinite(base_lr) or base_lr <= 0:
        raise ConfigError(f"{describe_key(config.model, 'base_learning_rate')}: must be a positive number, got "
                          f"{base_lr!r}")
    base_lr = float(base_lr)
    batch_size = int(OmegaConf.select(config, "data.params.batch_size", default=1))  # checked by the data module
    devices, nodes = trainer.num_devices, trainer.num_nodes
    accumulate = trainer.accumulate_grad_batches
    effective_batch = accumulate * nodes * devices * batch_size
    if scale_lr:
        model.learning_rate = effective_batch * base_lr
        print(f"[ldm] learning rate = {model.learning_rate:.2e} (--scale_lr: {accumulate} (accumulate_grad_batches)"
              f" * {nodes} (num_nodes) * {devices} (devices) * {batch_size} (batch size) * {base_lr:.2e} (base_lr))")
    else:
        model.learning_rate = base_lr
        print(f"[ldm] learning rate = {model.learning_rate:.2e} (base_learning_rate; not scaled, --scale_lr is off)."
              f" Effective batch size = {effective_batch} = {accumulate} (accumulate) * {nodes} (nodes) *"
              f" {devices} (devices) * {batch_size} (batch size)")
    return model.learning_rate


def build_callbacks(lightning_config: DictConfig, model: Any, opt: argparse.Namespace, now: str, logdir: Path,
                    ckptdir: Path, cfgdir: Path, config: DictConfig) -> list:
    """The reference's default callbacks, overridable by `lightning.callbacks` / `lightning.modelcheckpoint`."""
    checkpoint_cfg = {
        "target": "pytorch_lightning.callbacks.ModelCheckpoint",
        # No version counter: LastCheckpoint (below) also writes last.ckpt, and ModelCheckpoint would otherwise save
        # a full duplicate as last-v1.ckpt whenever it finds a last.ckpt it did not write itself.
        "params": {"dirpath": str(ckptdir), "filename": "{epoch:06}-{step:09}", "verbose": True,
                   "save_last": True, "enable_version_counter": False},
    }
    monitor = getattr(model, "monitor", None)
    if monitor:
        print(f"[ldm] monitoring {monitor} as checkpoint metric")
        checkpoint_cfg["params"].update(monitor=monitor, save_top_k=3)
    checkpoint_cfg = OmegaConf.merge(checkpoint_cfg, lightning_config.get("modelcheckpoint", OmegaConf.create()))
    defaults = {
        "setup_callback": {"target": "ldm.callbacks.SetupCallback", "params": {
            "now": now, "logdir": str(logdir), "ckptdir": str(ckptdir),
            "cfgdir": str(cfgdir)}},
        "image_logger": {"target": "ldm.callbacks.ImageLogger",
                         "params": {"batch_frequency": 750, "max_images": 4, "clamp": True}},
        "learning_rate_logger": {"target": "pytorch_lightning.callbacks.LearningRateMonitor",
                                 "params": {"logging_interval": "step"}},
        "export_safetensors": {"target": "ldm.callbacks.ExportSafetensors", "params": {"ckptdir": str(ckptdir)}},
        "last_checkpoint": {"target": "ldm.callbacks.LastCheckpoint",
                            "params": {"ckptdir": str(ckptdir)}},
        "resumed_learning_rate": {"target": "ldm.callbacks.ResumedLearningRate"},
        "resumed_metrics": {"target": "ldm.csv_logger.ResumedMetrics"},
        "progress_bar": {"target": "ldm.progress.StepProgressBar"},
        "loss_curve": {"target": "ldm.callbacks.LossCurve", "params": {"logdir": str(logdir)}},
        "skipped_images": {"target": "ldm.callbacks.SkippedImages"},
    }
    callbacks_cfg = OmegaConf.merge(defaults, lightning_config.get("callbacks", OmegaConf.create()))
    trainer_options = lightning_config.get("trainer", {})
    # Trainer flags that switch a feature off switch off the callbacks that provide it (Lightning refuses a
    # progress bar or checkpoint callback beside `enable_progress_bar: false` / `enable_checkpointing: false`).
    off = set()
    if trainer_options.get("enable_progress_bar") is False:
        off.add("progress_bar")
    if trainer_options.get("enable_checkpointing") is False:
        off.add("last_checkpoint")
    if trainer_options.get("logger") is False:
        off.update({"learning_rate_logger", "loss_curve"})  # they read or write the loggers' metrics
    callbacks = [] if "last_checkpoint" in off else [instantiate_from_config(checkpoint_cfg)]
    for key, cfg in callbacks_cfg.items():
        if key in off:
            continue
        if key == "setup_callback":
            callbacks.append(instantiate_from_config(cfg, config=config, lightning_config=lightning_config))
        else:
            callbacks.append(instantiate_from_config(cfg))
    return callbacks


def build_loggers(lightning_config: DictConfig, logdir: Path) -> list:
    """`csv/metrics.csv` always (resume appends to it; the loss curve is drawn from it), then the reference's
    `lightning.logger` (`target:` + `params:`: TensorBoard, Weights & Biases, MLflow, ...; its `save_dir` defaults to
    the run directory), or TensorBoard under `tensorboard/` when the config names none; `logger: false` for none."""
    from pytorch_lightning.loggers import TensorBoardLogger

    loggers = [ResumableCSVLogger(str(logdir), name="", version="csv")]
    spec = lightning_config.get("logger", None)
    if spec is None:
        return loggers + [TensorBoardLogger(str(logdir), name="", version="tensorboard")]
    if spec is False:
        return loggers
    spec = OmegaConf.to_container(spec, resolve=True)
    params = spec.setdefault("params", {}) or {}
    spec["params"] = params
    accepted = inspect.signature(target_of(spec)).parameters
    if "save_dir" in accepted and "save_dir" not in params:
        params["save_dir"] = str(logdir)
    return loggers + [instantiate_from_config(spec)]


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, os.getcwd())
    parser = get_parser()
    flags, overrides = split_argv(sys.argv[1:] if argv is None else argv)
    opt, stray = parser.parse_known_args(flags)
    if stray:
        parser.error(f"unrecognised argument(s) {stray}: flags are listed by --help; "
                     "config overrides look like key.path=value")
    if opt.name and opt.resume:
        parser.error("-n/--name and -r/--resume cannot both be given: a resumed run keeps its name")
    configure_logging(logging.DEBUG if opt.debug else logging.INFO)

    # Child processes of a DDP launch re-run this script: they must reuse the parent's run directory.
    first_process = "LDM_RUN_NOW" not in os.environ
    now = os.environ.setdefault("LDM_RUN_NOW", datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S"))
    ckpt_path = None
    if opt.resume:
        logdir, ckpt_path = _resolve_resume(opt.resume)
        if first_process:
            lock_run(logdir)  # before anything in it is touched
            for partial in remove_partial_writes(logdir / "checkpoints"):
                print(f"[ldm] removed {partial}: a checkpoint write that was killed before it finished")
        # The run's saved configs may come from someone else: they build only what a model directory may (plus
        # Lightning's callbacks and loggers) unless --trust_config. -b files and key=value overrides, the user's
        # own, come on top of them.
        saved = run_config_files(logdir)
        if not saved and not opt.base:
            raise FileNotFoundError(f"cannot resume {logdir}: its configs/ folder has no saved *-project.yaml; give "
                                    "the run's config with --base CONFIG.yaml beside -r (the one it was started with)")
        if not opt.trust_config:
            refuse_unsafe_targets(saved)
        opt.base = [str(p) for p in saved] + list(opt.base)
        nowname = logdir.name
    else:
        if opt.name:
            name = "_" + opt.name
        elif opt.base:
            name = "_" + Path(opt.base[0]).stem
        else:
            name = ""
        if first_process and opt.base:
            now = claim_run_name(Path(opt.logdir), now, name + opt.postfix)
            os.environ["LDM_RUN_NOW"] = now  # what DDP's child processes read
        nowname = now + name + opt.postfix
        logdir = Path(opt.logdir) / nowname
        if first_process and opt.base:
            lock_run(logdir)  # a `-r` of this run while it trains waits its turn
    if not opt.base:
        parser.error("no config given: use --base configs/<...>.yaml (or -r a previous run)")
    if opt.train is None:
        opt.train = bool(opt.resume)  # resuming a run means training it on
    ckptdir, cfgdir = logdir / "checkpoints", logdir / "configs"

    import pytorch_lightning as pl
    import torch

    if opt.debug:
        torch.autograd.set_detect_anomaly(True)
    pl.seed_everything(opt.seed, workers=True)
    config = load_configs(opt.base, overrides=overrides)
    apply_init_from(config)  # fine-tuning: the base model's architecture under the run's own settings
    lightning_config = config.pop("lightning", OmegaConf.create())
    trainer_options = resolve_trainer_options(lightning_config, opt)
    lightning_config.trainer = trainer_options
    for section in ("model", "data"):
        if section not in config:
            raise ConfigError(f"the merged config from {opt.base} has no '{section}:' section")

    prepare_run_vocabulary(config, logdir)  # a text encoder that reads the words of this run's own captions
    prepare_new_words(config, logdir)  # fine-tuning: the base's vocabulary and the words this run adds to it
    model = instantiate_from_config(config.model)
    # The base model's own samples, mixed into the training data (drawn now, while the model still is the base).
    prepare_prior_preservation(config, model, logdir)
    if (trainer_options.get("accumulate_grad_batches") or 1) > 1 and not model.automatic_optimization:
        raise ConfigError(f"--accumulate_grad_batches: {type(model).__name__} steps its optimizers itself (the "
                          "autoencoder and its discriminator alternate), which Lightning cannot accumulate; raise "
                          "data.params.batch_size instead")
    if trainer_options.get("strategy") == "ddp" and getattr(model, "ddp_find_unused_parameters", False):
        trainer_options["strategy"] = "ddp_find_unused_parameters_true"
        print(f"[ldm] {type(model).__name__} leaves some parameters without gradients in each backward pass: "
              "using strategy ddp_find_unused_parameters_true")
    # `--logger false` (a Trainer flag) or `lightning.logger: false`: no metrics files at all.
    loggers = [] if trainer_options.pop("logger", None) is False else build_loggers(lightning_config, logdir)
    callbacks = build_callbacks(lightning_config, model, opt, now, logdir, ckptdir, cfgdir, config)
    # Checkpoints: finite weights only, written atomically (ldm/divergence.py).
    trainer = pl.Trainer(**trainer_options, logger=loggers, callbacks=callbacks, default_root_dir=str(logdir),
                         plugins=[SafeCheckpointIO()])

    data = instantiate_from_config(config.data)
    learning_rate(model, config, trainer, opt.scale_lr)

    try:
        if opt.train:
            trainer.fit(model, data, ckpt_path=str(ckpt_path) if ckpt_path else None)
        if not opt.no_test and not trainer.interrupted and data_has_split(data, "test") \
                and pl.LightningModule.test_step is not type(model).test_step:
            trainer.test(model, data)
    finally:
        if opt.debug and not opt.resume and trainer.global_rank == 0 and logdir.exists():
            dst = logdir.parent / "debug_runs" / logdir.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(logdir), str(dst))
            print(f"[ldm] debug run moved to {dst}")
    if trainer.global_rank == 0:
        print(f"[ldm] done: {logdir}")
    return 0


def data_has_split(data: Any, split: str) -> bool:
    return split in getattr(data, "dataset_configs", {})


def user_message(error: BaseException) -> str:
    """The error's own message; for one raised in a DataLoader worker (which torch re-raises in this process with
    the worker's traceback as its text), that traceback's last line without its type."""
    text = str(error)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if ": " in last else last


def disk_full_message(error: OSError) -> str:
    """What a write that found the disk full means for the run, and how to go on."""
    written = Path(error.filename) if error.filename else None
    run = written.parent.parent if written is not None and written.parent.name == "checkpoints" else None
    if run is not None and (run / "checkpoints" / "last.ckpt").is_file():
        go_on = f"then resume with: python main.py -r {run}"
    elif run is not None:
        go_on = f"then start it again (it had saved no checkpoint; remove {run} first)"
    else:
        go_on = "then resume the run with -r"
    return (f"no space left on the disk writing {written or 'the run'}: free some space, {go_on}. Checkpoints "
            "already written are whole (they are only replaced by complete ones)")


def cli() -> None:
    """`ldm-train` and `python main.py`: user errors end with one line and a non-zero exit status (a traceback
    with -d/--debug)."""
    debug = "-d" in sys.argv or "--debug" in sys.argv
    try:
        sys.exit(main())
    except SystemExit as e:
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        if isinstance(e, SIGTERMException):
            # Lightning's SIGTERM exit is a bare SystemExit (status 0), but a stopped run is not a finished one:
            # callers such as scripts/train_builtin.sh must not export it and go on. 128 + 15, as for a process
            # the signal killed; last.ckpt is saved and `-r` continues it.
            sys.exit(128 + signal.SIGTERM)
        raise
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    except (TrainingDiverged, RunLocked) as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except (CheckpointError, FileNotFoundError) as e:
        # Missing data folders, VGG16 weights, checkpoints: the message says what to provide.
        if debug:
            raise
        print(f"error: {user_message(e)}\n(run with -d for the traceback)", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if debug or not is_disk_full(e):
            raise
        print(f"error: {disk_full_message(e)}", file=sys.stderr)
        sys.exit(1)
    finally:
        release_empty_run_dirs()  # a run that stopped before writing anything leaves no empty directory
