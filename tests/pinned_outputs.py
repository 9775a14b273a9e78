"""Outputs of the diffusion math pinned before the denoiser / noise-process / sampler-registry redesign.

`compute()` evaluates, on fixed inputs and seeds: the training loss of the shipped text-to-image model
(v-prediction) and of a tiny ε-prediction model (also with min-SNR weighting and the VLB term), and every
sampler's latents after a few steps. (The shipped inpainting model's loss was pinned too and matched after
the redesign; its entry was dropped when that model was replaced by the text-conditioned one. The txt2img entries
were pinned again, by the same functions, each time the shipped model was trained further (20,000, then 30,000, then 40,000 steps), when the batch-128 model replaced it, and each time it was trained on typed captions; the tiny models' entries were kept as first pinned.) `python -m tests.pinned_outputs` writes them
to tests/fixtures/pinned_outputs.safetensors (run once, on the code before the redesign; `python -m tests.pinned_outputs
txt2img` pins the shipped model's entries alone);
tests/test_pinned_outputs.py recomputes them and requires the same numbers.
"""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

from ldm.checkpoint import save_safetensors
from ldm.inference import load_model, sample_latents, text_condition
from tests.tiny_models import txt2img_config, write_model_dir

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "pinned_outputs.safetensors"
PROMPTS = ["a red circle above a blue square", "a small green triangle"]
# (sampler, steps): the tiny model has 16 timesteps, so DDIM/PLMS step counts divide 16.
SAMPLER_RUNS = (("ddim", 4), ("plms", 4), ("euler_a", 4), ("heun", 3), ("dpmpp_2m", 5))


def _tiny_model(directory: Path, **params) -> torch.nn.Module:
    config = txt2img_config()
    config["model"]["params"].update(params)
    return load_model(write_model_dir(directory / "_".join(map(str, params.values())) or "plain",
                                      copy.deepcopy(config)))


def _losses(model: torch.nn.Module, name: str, out: dict) -> None:
    torch.manual_seed(1)
    shape = (2, model.channels, model.image_size, model.image_size)
    x_start, noise = torch.randn(shape), torch.randn(shape)
    cond = model.get_learned_conditioning(PROMPTS)
    t = torch.tensor([3, model.num_timesteps - 2])
    model.train()
    with torch.no_grad():
        loss, _ = model.p_losses(x_start, cond, t, noise)
    model.eval()
    out[f"{name}/loss"] = loss.reshape(1)


def _samples(model: torch.nn.Module, name: str, out: dict) -> None:
    cond, uncond = text_condition(model, PROMPTS, 3.0)
    for sampler, steps in SAMPLER_RUNS:
        out[f"{name}/{sampler}"] = sample_latents(model, 2, cond, uncond=uncond, scale=3.0, sampler=sampler,
                                                  steps=steps, seed=7, progress=False)
    if model.num_timesteps <= 16:
        out[f"{name}/ddpm"] = sample_latents(model, 2, cond, uncond=uncond, scale=3.0, sampler="ddpm", seed=7,
                                             progress=False)


def compute() -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)
    out: dict[str, torch.Tensor] = {}
    txt2img = load_model("txt2img")
    _losses(txt2img, "txt2img", out)
    _samples(txt2img, "txt2img", out)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = _tiny_model(Path(tmp))
        _losses(tiny, "tiny_eps", out)
        _samples(tiny, "tiny_eps", out)
        _losses(_tiny_model(Path(tmp), loss_weighting="min_snr", original_elbo_weight=0.01), "tiny_eps_minsnr_vlb",
                out)
        tiny_x0 = _tiny_model(Path(tmp), parameterization="x0")
        _losses(tiny_x0, "tiny_x0", out)
        _samples(tiny_x0, "tiny_x0", out)
    return {k: v.detach().float().contiguous() for k, v in out.items()}


if __name__ == "__main__":
    # `python -m tests.pinned_outputs txt2img` pins the shipped model's entries again (after it was retrained) and keeps
    # every other entry as it was pinned; without an argument every entry is written anew.
    import sys

    from safetensors.torch import load_file

    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    values = compute()
    if len(sys.argv) > 1:
        prefixes = tuple(f"{name}/" for name in sys.argv[1:])
        values = {**load_file(str(FIXTURE)), **{k: v for k, v in values.items() if k.startswith(prefixes)}}
    save_safetensors(values, FIXTURE)
    print(f"wrote {len(values)} pinned outputs to {FIXTURE}")
