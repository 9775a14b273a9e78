"""Export a training checkpoint (.ckpt) to weights-only safetensors.

    python scripts/export_weights.py logs/<run>/checkpoints/last.ckpt -o model.safetensors
    python scripts/export_weights.py logs/<run>/checkpoints/last.ckpt --model-dir models/ldm/my-model --dtype fp16

The `.ckpt` is read with weights_only=True (no arbitrary unpickling). Training-only `loss.*` weights
(LPIPS, discriminator) are dropped unless --keep-loss is given.

With --model-dir the export is a model directory for `ldm.inference.load_model` and the sampling scripts:
`model.safetensors` holds the weights used for sampling (the EMA weights folded into the model, no
`model_ema.*`), without the frozen first stage when the run's config names the first stage's own
checkpoint, parameters in --dtype (buffers such as the noise schedule stay float32); `config.yaml` is the
run's config (model, data and lightning sections), so `main.py --base <dir>/config.yaml -t` retrains it.
"""
import argparse
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf


from ldm.checkpoint import inference_state_dict, load_state_dict, save_safetensors
from ldm.model_loading import INIT_PARAMS, build_model
from ldm.config import load_configs
from ldm.script_args import HelpFormatter, add_trust_config_arg, command_line
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


def sampling_state_dict(model: torch.nn.Module, config, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The weights sampling uses: EMA folded in, no training-only parts, the first stage left to its own file."""
    with model.ema_scope():  # the EMA weights while inside (a no-op for a model without EMA)
        state = {k: v.clone() for k, v in inference_state_dict(model.state_dict()).items()
                 if not k.startswith("model_ema.")}
    first_stage = OmegaConf.select(config, "model.params.first_stage_config.params.ckpt_path")
    if first_stage:
        shared = ("first_stage_model.", "cond_stage_model.") if model.cond_stage_model is model.first_stage_model \
            else ("first_stage_model.",)
        state = {k: v for k, v in state.items() if not k.startswith(shared)}
    parameters = {name for name, _ in model.named_parameters()}
    return {k: v.to(dtype) if k in parameters and v.is_floating_point() else v for k, v in state.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("ckpt", type=Path, help="a Lightning .ckpt (or .pt/.pth state dict)")
    parser.add_argument("-o", "--out", type=Path, default=None, help="output .safetensors (default: beside ckpt)")
    parser.add_argument("--keep-loss", action="store_true", help="keep loss.* (discriminator, LPIPS) weights")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="write a model directory (config.yaml + model.safetensors) for sampling instead")
    parser.add_argument("--config", type=Path, nargs="+", default=None,
                        help="with --model-dir: the run's config files (default: logs/<run>/configs/ of the ckpt)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="with --model-dir: type of the stored parameters (fp16 halves the file)")
    add_trust_config_arg(parser)
    opt = parser.parse_args()
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
        state = sampling_state_dict(model, config, DTYPES[opt.dtype])
        opt.model_dir.mkdir(parents=True, exist_ok=True)
        config_path = opt.model_dir / "config.yaml"
        OmegaConf.save(config, config_path)
        out = save_safetensors(state, opt.model_dir / "model.safetensors",
                               metadata={"source": str(opt.ckpt), "dtype": opt.dtype})
        print(f"wrote {config_path} and {out} ({out.stat().st_size / 2**20:.2f} MiB)")
        return
    state = load_state_dict(opt.ckpt)
    if not opt.keep_loss:
        state = inference_state_dict(state)
    out = opt.out or opt.ckpt.with_suffix(".safetensors")
    save_safetensors(state, out, metadata={"source": str(opt.ckpt)})
    print(f"wrote {out} ({len(state)} tensors)")


cli = command_line(main)
