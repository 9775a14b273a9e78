"""LoRA (ldm/lora.py, ldm/lora_formats.py): an adapter trained on a frozen model, its checkpoint, its files in
diffusers' and kohya's key formats, applying several at sampling with a scale each, merging, and diffusers itself
loading our files. Tiny random models (tests/tiny_models.py) keep every test a few seconds long; the adapters get
random weights (a fresh LoRA's up-projection is zero and would hide every mapping error)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from ldm.finetune import apply_init_from
from ldm.inference import load_model, text_to_image
from ldm.lora import (LoraSettings, add_adapter, export_trained_lora, read_lora, trained_adapter,
                      write_lora)
from ldm.util import instantiate_from_config

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle", "two small blue squares at the top"]


def lora_run_model(init_from: Path | str, **lora_config) -> torch.nn.Module:
    """A LoRA fine-tuning model as main.py builds it from a config naming `init_from`, its adapter randomised."""
    config = OmegaConf.create({"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "init_from": str(init_from), "use_ema": False, "lora_config": {"rank": 2, "alpha": 4, **lora_config}}}})
    apply_init_from(config)
    model = instantiate_from_config(config.model).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0.0, 0.2)
    return model


def denoiser_output(model: torch.nn.Module) -> torch.Tensor:
    """The network's output on fixed latents, timesteps and captions."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, model.channels, model.image_size, model.image_size, generator=generator)
    with torch.no_grad():
        return model.apply_model(x, torch.tensor([3, 11]), model.get_learned_conditioning(PROMPTS))


@pytest.fixture(scope="module")
def trained(tiny_txt2img_model, tmp_path_factory):
    """(the LoRA run's model, its adapter in a diffusers-format file, in a kohya-format file); the text encoder is
    adapted too."""
    model = lora_run_model(tiny_txt2img_model, text_encoder=True)
    folder = tmp_path_factory.mktemp("lora")
    files = {fmt: export_trained_lora(model, folder / f"{fmt}.safetensors", fmt) for fmt in ("diffusers", "kohya")}
    return model, files


def test_the_adapter_starts_at_the_base_model_and_alone_trains(tiny_txt2img_model):
    config = OmegaConf.create({"model": {"params": {"init_from": str(tiny_txt2img_model), "use_ema": False,
                                                    "lora_config": {"rank": 4, "alpha": 4}}}})
    apply_init_from(config)
    model = instantiate_from_config(config.model).eval()
    base = load_model(tiny_txt2img_model, device="cpu")
    assert torch.equal(denoiser_output(model), denoiser_output(base))  # peft's up-projections start at zero
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.parameters() if p.requires_grad}
    # The default targets: every attention projection of the U-Net, none of the text encoder.
    assert all(n.startswith("model.diffusion_model.") for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == {"to_q", "to_k", "to_v", "0"}
    unet_size = sum(p.numel() for p in base.model.diffusion_model.parameters())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) < 0.05 * unet_size


def test_scale_zero_is_the_base_model_exactly_and_merging_equals_peft_unmerged(trained, tiny_txt2img_model):
    model, files = trained
    base = denoiser_output(load_model(tiny_txt2img_model, device="cpu"))
    assert torch.equal(denoiser_output(load_model(tiny_txt2img_model, device="cpu", lora=[(files["kohya"], 0.0)])),
                       base)
    merged = load_model(tiny_txt2img_model, device="cpu", lora=[files["diffusers"]])
    assert not any("lora" in k or "base_layer" in k for k in merged.state_dict())  # plain modules and keys again
    out = denoiser_output(merged)
    assert (out - base).abs().max() > 1e-2  # the adapter changes what the model does
    torch.testing.assert_close(out, denoiser_output(model), rtol=0, atol=1e-5)  # = the training model's peft layers


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_both_formats_name_modules_as_our_diffusers_export_and_load_back(trained, fmt):
    from ldm.diffusers_bridge.unet import to_diffusers_state_dict, unet_params

    model, files = trained
    state = load_file(files[fmt])
    unet = model.model.diffusion_model
    with torch.no_grad():
        plain = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if ".lora_" not in k}
    unet_modules = {k.rsplit(".", 1)[0] for k in to_diffusers_state_dict(plain, unet_params(unet))}
    if fmt == "diffusers":
        assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in state
        assert "text_encoder.model.layers.0.self_attn.q_proj.lora_B.weight" in state  # LDMBertModel's names
        assert {k[5:].rsplit(".lora_", 1)[0] for k in state if k.startswith("unet.")} <= unet_modules
    else:
        key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
        assert {f"{key}.lora_down.weight", f"{key}.lora_up.weight", f"{key}.alpha"} <= set(state)
        assert float(state[f"{key}.alpha"]) == 4.0 and "lora_te_model_layers_0_self_attn_q_proj.alpha" in state
        assert {k[10:].split(".")[0] for k in state if k.startswith("lora_unet_")} <= {
            m.replace(".", "_") for m in unet_modules}
    # Read back: the same update of every module (alpha folded into diffusers' lora_B, kept apart in kohya's).
    ours, back = trained_adapter(model), read_lora(files[fmt], model)
    assert set(back) == set(ours)
    for path, weights in ours.items():
        def update(w):
            return w.up @ w.down * (w.alpha / w.rank)
        torch.testing.assert_close(update(back[path]), update(weights), rtol=0, atol=1e-6)


def test_formats_give_the_same_model_and_several_loras_add_up(trained, tiny_txt2img_model):
    _, files = trained
    one = denoiser_output(load_model(tiny_txt2img_model, device="cpu", lora=[files["diffusers"]]))
    torch.testing.assert_close(denoiser_output(load_model(tiny_txt2img_model, device="cpu", lora=[files["kohya"]])),
                               one, rtol=0, atol=1e-6)
    halves = load_model(tiny_txt2img_model, device="cpu",
                        lora=[f"{files['diffusers']}:0.5", (files["kohya"], 0.5)])
    torch.testing.assert_close(denoiser_output(halves), one, rtol=0, atol=1e-5)


def test_diffusers_pipeline_with_our_lora_draws_our_images(trained, tiny_txt2img_model, tmp_path):
    """LDMTextToImagePipeline has no `load_lora_weights` (only Stable Diffusion-type pipelines do): its U-Net loads
    our file with diffusers' own `load_lora_adapter`, its LDMBert text encoder with the Stable Diffusion loader's
    `load_lora_into_text_encoder`; the images equal `ldm-txt2img --lora`'s."""
    import diffusers

    from ldm.diffusers_bridge.pipeline import export_pipeline

    _, files = trained
    export_pipeline(load_model(tiny_txt2img_model, device="cpu"), tmp_path / "pipe")
    pipe = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "pipe", low_cpu_mem_usage=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.load_lora_adapter(str(files["diffusers"]), prefix="unet", adapter_name="ours")
    diffusers.StableDiffusionPipeline.load_lora_into_text_encoder(
        load_file(files["diffusers"]), network_alphas=None, text_encoder=pipe.bert, prefix="text_encoder",
        adapter_name="ours")
    seeds = [3, 4]
    ours = text_to_image(load_model(tiny_txt2img_model, device="cpu", lora=[files["diffusers"]]), PROMPTS, scale=3.0,
                         sampler="ddim", steps=4, seed=seeds, progress=False)
    theirs = pipe(PROMPTS, num_inference_steps=4, guidance_scale=3.0, output_type="pt",
                  generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    torch.testing.assert_close(theirs, ((ours + 1) / 2).clamp(0, 1), rtol=0, atol=1e-4)


def test_diffusers_alphas_in_metadata_or_keys_are_read(trained, tmp_path):
    """A diffusers-format file written by diffusers' `save_lora_weights` keeps lora_B unscaled and its alpha in the
    ``lora_adapter_metadata``; one converted from kohya keeps ``.alpha`` keys."""
    model, files = trained
    adapter = trained_adapter(model)
    state = {k: v for k, v in load_file(files["kohya"]).items()}  # lora_up unscaled
    from ldm.lora_formats import ecosystem_names, to_state_dict

    unscaled = to_state_dict({p: w.__class__(w.down, w.up, float(w.rank)) for p, w in adapter.items()},
                             ecosystem_names(model), "diffusers")
    meta = {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 4, "unet.r": 2, "text_encoder.lora_alpha": 4})}
    save_file(unscaled, tmp_path / "meta.safetensors", metadata=meta)
    back = read_lora(tmp_path / "meta.safetensors", model)
    assert {w.alpha for w in back.values()} == {4.0} and len(state) == 3 * len(back)


def test_user_errors_are_one_line(trained, tiny_txt2img_model, tmp_path, monkeypatch, capsys):
    from ldm.cli import txt2img

    _, files = trained

    def run(*lora: str) -> str:
        argv = ["txt2img.py", "--config", str(tiny_txt2img_model), "--n_samples", "1", "--steps", "1", "--outdir",
                str(tmp_path / "out"), *[a for f in lora for a in ("--lora", f)]]
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as stop:
            txt2img.cli()
        message = str(stop.value)
        assert message.startswith("error: ") and "\n" not in message
        return message

    assert "LoRA file not found: " in run(str(tmp_path / "missing.safetensors"))
    assert "holds no LoRA weights in diffusers' format" in run(str(tiny_txt2img_model / "model.safetensors"))
    # Made for the built-in model (another width): every module has another shape here.
    builtin = export_trained_lora(lora_run_model("txt2img"), tmp_path / "builtin.safetensors")
    assert "is a LoRA for another model" in run(str(builtin))
    kohya = load_file(files["kohya"])
    save_file({**kohya, "lora_unet_no_such_block.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_no_such_block.lora_up.weight": torch.zeros(4, 2)}, tmp_path / "other.safetensors")
    assert "lora_unet_no_such_block, which this model does not have" in run(str(tmp_path / "other.safetensors"))
    monkeypatch.setitem(sys.modules, "peft", None)  # peft not installed
    assert "pip install 'ldm[lora]'" in run(str(files["kohya"]))


def test_settings_are_checked_by_name():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['r'\]"):
        LoraSettings.from_config({"r": 4})
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        LoraSettings.from_config({"rank": 0})
    with pytest.raises(ValueError, match="target_modules must be a non-empty list"):
        LoraSettings.from_config({"target_modules": "to_q"})


def test_targets_the_model_lacks_are_named(tiny_txt2img_model):
    with pytest.raises(ValueError, match="lora_config.target_modules .U-Net.*no_such_layer"):
        lora_run_model(tiny_txt2img_model, target_modules=["no_such_layer"])


def test_an_adapter_written_and_added_again_is_the_same(trained, tmp_path):
    """write_lora / add_adapter keep per-module ranks and alphas (a file may mix them)."""
    model, _ = trained
    adapter = trained_adapter(model)
    first = next(iter(adapter))
    adapter[first] = adapter[first].__class__(adapter[first].down[:1], adapter[first].up[:, :1], 7.0)
    path = write_lora(adapter, model, tmp_path / "mixed.safetensors", "kohya")
    target = lora_run_model(model.init_from)
    add_adapter(target, read_lora(path, model), "mixed")
    layer = target.get_submodule(first)
    assert layer.r["mixed"] == 1 and layer.scaling["mixed"] == 7.0
