"""A whole text-to-image latent diffusion model as a diffusers `LDMTextToImagePipeline` folder, and back.

    export_pipeline(load_model("txt2img"), "out/txt2img-diffusers")
    pipe = diffusers.DiffusionPipeline.from_pretrained("out/txt2img-diffusers")
    import_pipeline("out/txt2img-diffusers", "models/ldm/txt2img-imported")   # a model directory of ours

The folder is what ``DiffusionPipeline.save_pretrained`` writes (model_index.json and one folder per
component): ``vqvae`` (AutoencoderKL, `autoencoder.py`), ``bert`` (LDMBertModel, `text_encoder.py`),
``tokenizer`` (our BertTokenizerFast with the model's vocabulary), ``unet`` (UNet2DConditionModel,
`unet.py`) and ``scheduler`` (DDIMScheduler, `scheduler.py`). With DDIM, the same number of steps,
guidance scale and initial noise, the pipeline's images equal ours up to float32 rounding for a model
whose text encoder was trained on 77-token prompts (see `text_encoder.py` for other lengths).

One diffusers habit needs a correction: LDMTextToImagePipeline sizes its noise as height // 8 whatever
the autoencoder's factor, while its default height is ``unet.sample_size × vae_scale_factor``. The
exported U-Net's `sample_size` is therefore latent size × 8 / f, so that a plain ``pipe(prompt)`` makes
latents of the trained size (for an f=4 model of 32-pixel images: sample_size 16, the default height is 64,
the noise is 8×8 and the images are 32×32). Pass ``height=width=8 × latent size`` when giving a size.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Union

from omegaconf import OmegaConf

from ldm.checkpoint import save_safetensors
from ldm.diffusers_bridge import autoencoder, scheduler, text_encoder, unet
from ldm.diffusers_bridge.common import import_diffusers
from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.encoders.modules import BERTEmbedder
from ldm.util import instantiate_from_config

PIPELINE_LATENT_FACTOR = 8  # LDMTextToImagePipeline's noise is (height // 8, width // 8)
VOCAB_FILE = "vocab.txt"
LATENT_DIFFUSION = "ldm.models.diffusion.ddpm.LatentDiffusion"
UNET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
AUTOENCODER = "ldm.models.autoencoder.AutoencoderKL"
BERT = "ldm.modules.encoders.modules.BERTEmbedder"


def _vae_factor(vae_config: Any) -> int:
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def _check_exportable(model: Any) -> None:
    problems = []
    if getattr(model.model, "conditioning_key", None) != "crossattn":
        problems.append(f"conditioning_key is {model.model.conditioning_key!r} (the pipeline cross-attends to text)")
    if not isinstance(model.cond_stage_model, BERTEmbedder):
        problems.append(f"the text encoder is {type(model.cond_stage_model).__name__} (LDMTextToImagePipeline "
                        "holds the BERT-style BERTEmbedder as LDMBertModel)")
    if not isinstance(model.first_stage_model, AutoencoderKL):
        problems.append(f"the first stage is {type(model.first_stage_model).__name__} (only the KL autoencoder "
                        "is exported)")
    if problems:
        raise ValueError("this model does not fit diffusers' LDMTextToImagePipeline: " + "; ".join(problems))


def to_pipeline(model: Any) -> Any:
    """An `LDMTextToImagePipeline` holding copies of a text-to-image LatentDiffusion's parts (its weights as
    they are: load an export, or call inside ``model.ema_scope()`` for a training model's EMA weights)."""
    _check_exportable(model)
    diffusers = import_diffusers()
    vae = autoencoder.to_diffusers(model.first_stage_model, float(model.scale_factor))
    denoiser = unet.to_diffusers(model.model.diffusion_model)
    latent_size = model.image_size
    if (latent_size * _vae_factor(vae.config)) % PIPELINE_LATENT_FACTOR:
        raise ValueError(f"latents of {latent_size}² with an f={_vae_factor(vae.config)} autoencoder cannot be "
                         "sized by LDMTextToImagePipeline (height // 8 must be the latent size)")
    denoiser.register_to_config(sample_size=latent_size * PIPELINE_LATENT_FACTOR // _vae_factor(vae.config))
    return diffusers.LDMTextToImagePipeline(
        vqvae=vae, bert=text_encoder.to_diffusers(model.cond_stage_model),
        tokenizer=model.cond_stage_model.tknz_fn.tokenizer, unet=denoiser, scheduler=scheduler.ddim_scheduler(model))


def export_pipeline(model: Any, outdir: Union[str, Path]) -> Path:
    """Write `model` as a diffusers pipeline folder (``DiffusionPipeline.from_pretrained(outdir)`` loads it)."""
    outdir = Path(outdir)
    to_pipeline(model).save_pretrained(outdir, safe_serialization=True)
    return outdir


def _write_vocabulary(tokenizer: Any, path: Path) -> None:
    """The tokenizer's WordPiece vocabulary as a BERT vocab.txt (one token per line, in id order)."""
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise ValueError("the pipeline's tokenizer has gaps in its token ids; it is not a BERT WordPiece vocabulary")
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")


def model_config_from_pipeline(pipe: Any, tokenizer_path: str) -> dict[str, Any]:
    """Our LatentDiffusion config (the `model:` node) for an LDMTextToImagePipeline."""
    vae_config, unet_config = pipe.vqvae.config, pipe.unet.config
    if type(pipe.vqvae).__name__ != "AutoencoderKL":
        raise ValueError(f"the pipeline's first stage is {type(pipe.vqvae).__name__}; only AutoencoderKL is imported")
    ddconfig, embed_dim, scaling_factor = autoencoder.ddconfig_from_diffusers(vae_config)
    latent_size = unet_config["sample_size"] * _vae_factor(vae_config) // PIPELINE_LATENT_FACTOR
    unet_params = {**unet.unet_params_from_diffusers(unet_config), "image_size": latent_size}
    return {
        "target": LATENT_DIFFUSION,
        "params": {
            **scheduler.schedule_params_from_scheduler(pipe.scheduler.config),
            "first_stage_key": "image",
            "cond_stage_key": "caption",
            "image_size": latent_size,
            "channels": unet_params["in_channels"],
            "cond_stage_trainable": True,
            "conditioning_key": "crossattn",
            "scale_factor": scaling_factor,
            "use_ema": False,
            "unet_config": {"target": UNET, "params": unet_params},
            "first_stage_config": {"target": AUTOENCODER, "params": {
                "embed_dim": embed_dim, "ddconfig": ddconfig, "lossconfig": dict(autoencoder.IDENTITY_LOSS)}},
            "cond_stage_config": {"target": BERT, "params": {
                **text_encoder.bert_params_from_ldmbert(pipe.bert.config.to_dict()), "tokenizer_path": tokenizer_path}},
        },
    }


def import_pipeline(directory: Union[str, Path], outdir: Union[str, Path]) -> Path:
    """Write an LDMTextToImagePipeline folder as our model directory (config.yaml, model.safetensors, vocab.txt),
    which `ldm.inference.load_model(outdir)` and the sampling scripts load."""
    diffusers = import_diffusers()
    # low_cpu_mem_usage needs `accelerate`; without it diffusers falls back to this anyway, with a warning.
    pipe = diffusers.DiffusionPipeline.from_pretrained(directory, low_cpu_mem_usage=False)
    if not isinstance(pipe, diffusers.LDMTextToImagePipeline):
        raise ValueError(f"{directory} holds a {type(pipe).__name__}; only LDMTextToImagePipeline is imported")
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    _write_vocabulary(pipe.tokenizer, outdir / VOCAB_FILE)
    config = model_config_from_pipeline(pipe, str(outdir / VOCAB_FILE))
    model = instantiate_from_config(config)
    first_stage, _ = autoencoder.from_diffusers(pipe.vqvae)
    model.first_stage_model.load_state_dict(first_stage.state_dict())
    model.cond_stage_model.load_state_dict(text_encoder.from_ldmbert_state_dict(pipe.bert.state_dict(),
                                                                               pipe.bert.config.to_dict()))
    model.model.diffusion_model.load_state_dict(unet.from_diffusers(pipe.unet).state_dict())
    config["params"]["cond_stage_config"]["params"]["tokenizer_path"] = VOCAB_FILE  # relative to the directory
    OmegaConf.save(OmegaConf.create({"model": config}), outdir / "config.yaml")
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("model_ema.")}
    save_safetensors(state, outdir / "model.safetensors", metadata={"source": str(directory)})
    return outdir
