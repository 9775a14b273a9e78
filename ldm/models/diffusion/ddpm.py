"""`DDPM` (pixel space) and `LatentDiffusion` Lightning modules, with the reference's parameters and API.

The modules orchestrate; the math lives in small parts shared with the samplers:
`ldm.modules.diffusionmodules.schedule` (the reference's β table), `.noise_process` (how x_t is made, which
noise levels exist), `.denoiser` (what the network predicts: ε/x_0/v/flow/EDM), `.noise_levels` and
`.loss_weighting` (the training density and weights), `.objectives` (L_simple, VLB weights), `.likelihood` (bits/dim), `ldm.models.diffusion.guidance`
(condition dropout, guided outputs) and `ldm.models.diffusion.samplers` (DDPM's own `sample`).

The images the ImageLogger shows are drawn by `ldm.image_logs.log_images(model, batch)`, not by a method here: they
need the sampling API and the datasets' renderers, which sit above the model. The model gives what they are made of
(`log_inputs`, `decode_for_display`, `unconditional_guidance_inputs`).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Union

import pytorch_lightning as pl
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ldm.checkpoint import load_state_dict, load_weights
from ldm.config import instantiate_from_config
from ldm.divergence import raise_if_not_finite
from ldm.finetune import load_base_weights
from ldm.models.autoencoder import IdentityFirstStage, VQModelInterface
from ldm.models.diffusion.guidance import drop_conditions, guided_model
from ldm.models.diffusion.latent_cache import LatentCache
from ldm.models.diffusion.samplers import EditedDenoiser, get_sampler, run_sampler, sampler_sigmas, start_state
from ldm.modules.diffusionmodules.likelihood import variational_bound
from ldm.modules.diffusionmodules.denoiser import Denoiser, make_prediction
from ldm.modules.diffusionmodules.loss_weighting import check_loss_weighting, loss_weights
from ldm.modules.diffusionmodules.noise_levels import make_noise_level_density
from ldm.modules.diffusionmodules.noise_process import EDM, NoiseProcess, make_noise_process
from ldm.modules.diffusionmodules.objectives import elementwise_loss, reweight_by_logvar, vlb_weights
from ldm.modules.diffusionmodules.offset_noise import OffsetNoise
from ldm.modules.diffusionmodules.schedule import NoiseSchedule
from ldm.modules.diffusionmodules.speed import DEFAULT_SPEED_OPTIONS, apply_speed_options
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.ema import LitEma
from ldm.new_words import freeze_all_but_new_words, parse_new_words, train_new_word_rows
from ldm.optim import adamw
from ldm.prior_preservation import PRIOR_KEY, PriorPreservation
from ldm.vae import swap_vae

log = logging.getLogger(__name__)

CONDITIONING_KEYS = ("concat", "crossattn", "hybrid", "adm")


def disabled_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """Replacement for `train()` on frozen parts, so Lightning's `model.train()` leaves them in eval mode."""
    return self


class DiffusionWrapper(nn.Module):
    """The denoising network (`diffusion_model`) and how conditions reach it (the `conditioning_key`):
    ``concat`` stacks them with x on channels, ``crossattn`` feeds them as the U-Net's context (token axis
    concatenation), ``hybrid`` does both, ``adm`` passes a class vector as the U-Net's `y`."""

    def __init__(self, diff_model_config: Mapping, conditioning_key: Optional[str]) -> None:
        super().__init__()
        if conditioning_key not in (None, *CONDITIONING_KEYS):
            raise ValueError(f"unknown conditioning_key {conditioning_key!r}; choose one of "
                             f"{', '.join(CONDITIONING_KEYS)} (or leave it unset for an unconditional model)")
        self.diffusion_model = instantiate_from_config(diff_model_config)
        self.conditioning_key = conditioning_key

    def forward(self, x: torch.Tensor, t: torch.Tensor, c_concat: Optional[list] = None,
                c_crossattn: Optional[list] = None) -> torch.Tensor:
        key = self.conditioning_key
        if key is None:
            return self.diffusion_model(x, t)
        if key in ("concat", "hybrid"):
            x = torch.cat([x, *c_concat], dim=1)
        if key == "concat":
            return self.diffusion_model(x, t)
        if key == "adm":
            # A class vector: a ClassEmbedder's (B, 1, dim) output is one token, given as (B, dim).
            y = c_crossattn[0]
            return self.diffusion_model(x, t, y=y.flatten(1) if y.dim() == 3 else y)
        context = c_crossattn[0] if len(c_crossattn) == 1 else torch.cat(c_crossattn, dim=1)  # no copy of one
        return self.diffusion_model(x, t, context=context)


class DDPM(pl.LightningModule):
    """Denoising diffusion on data x (images in [-1, 1] here; latents in `LatentDiffusion`).

    Training minimises L_simple (DDPM eq. 14, in the chosen parameterization), optionally reweighted by a
    learned per-timestep log-variance, plus `original_elbo_weight` times the VLB term L_{t−1} (eq. 5) with
    the correct weight for the parameterization. `ucg_training` drops conditions for classifier-free
    guidance. `validation_bpd_timesteps` adds the variational bound in bits/dim to validation (Table 1).
    `speed_options` (ldm.modules.diffusionmodules.speed) are applied to the U-Net: channels-last by default,
    `compile` on request; none changes the weights or the state dict.

    Convergence levers, all off by default: `noise_level_density` (how t is drawn: uniform, EDM's
    lognormal, SD3's logit-normal; `noise_levels`), `loss_weighting` (`min_snr`: Hang et al. 2023, with
    `min_snr_gamma`; `loss_weighting`), `offset_noise_strength` (Guttenberg 2023; `offset_noise`) and
    `zero_terminal_snr` (Lin et al. 2024: ᾱ_T = 0, needs v or x0; `schedule.rescale_zero_terminal_snr`).
    """

    def __init__(self, unet_config: Mapping, timesteps: int = 1000, beta_schedule: str = "linear",
                 loss_type: str = "l2", ckpt_path: Optional[str] = None, ignore_keys: Sequence[str] = (),
                 load_only_unet: bool = False, monitor: Optional[str] = "val/loss", use_ema: bool = True,
                 first_stage_key: str = "image", image_size: int = 256, channels: int = 3, log_every_t: int = 100,
                 clip_denoised: bool = True, linear_start: float = 1e-4, linear_end: float = 2e-2,
                 cosine_s: float = 8e-3, given_betas: Optional[Sequence[float]] = None,
                 original_elbo_weight: float = 0.0, v_posterior: float = 0.0, l_simple_weight: float = 1.0,
                 conditioning_key: Optional[str] = None, parameterization: str = "eps",
                 scheduler_config: Optional[Mapping] = None, use_positional_encodings: bool = False,
                 learn_logvar: bool = False, logvar_init: float = 0.0, ema_decay: float = 0.9999,
                 ucg_training: Optional[Mapping] = None, validation_bpd_timesteps: int = 0,
                 speed_options: Sequence[str] = DEFAULT_SPEED_OPTIONS,
                 noise_level_density: Union[str, Mapping] = "uniform", loss_weighting: str = "simple",
                 min_snr_gamma: float = 5.0, offset_noise_strength: float = 0.0,
                 zero_terminal_snr: bool = False, noise_process: Union[str, Mapping, None] = "discrete_vp",
                 weight_decay: float = 0.01) -> None:
        super().__init__()
        if use_positional_encodings:
            raise ValueError("use_positional_encodings needs the reference's coordinate conditioning, which is "
                             "not part of ldm; set it to false")
        self.parameterization = parameterization
        self.cond_stage_model: Optional[nn.Module] = None
        self.clip_denoised = clip_denoised
        self.log_every_t = log_every_t
        self.first_stage_key = first_stage_key
        self.image_size = image_size
        self.channels = channels
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        apply_speed_options(self.model.diffusion_model, speed_options)
        self.use_ema = use_ema
        if use_ema:
            self.model_ema = LitEma(self.model, decay=ema_decay)
            log.debug(f"Keeping EMAs of {len(list(self.model_ema.buffers()))}.")
        self.scheduler_config = scheduler_config
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.weight_decay = weight_decay  # AdamW's decoupled decay; 0.01 is PyTorch's default, which the reference used
        self.v_posterior = v_posterior
        self.original_elbo_weight = original_elbo_weight
        self.l_simple_weight = l_simple_weight
        self.loss_type = loss_type
        self.ucg_training = dict(ucg_training) if ucg_training else None
        self.validation_bpd_timesteps = validation_bpd_timesteps
        if monitor is not None:
            self.monitor = monitor
        self.register_schedule(given_betas=given_betas, beta_schedule=beta_schedule, timesteps=timesteps,
                               linear_start=linear_start, linear_end=linear_end, cosine_s=cosine_s,
                               zero_terminal_snr=zero_terminal_snr, noise_process=noise_process)
        self.noise_level_density = make_noise_level_density(noise_level_density, self.process)
        self.loss_weighting, self.min_snr_gamma = check_loss_weighting(loss_weighting, min_snr_gamma), min_snr_gamma
        if not self.process.discrete and (learn_logvar or original_elbo_weight > 0):
            raise ValueError(f"learn_logvar and original_elbo_weight index tables by timestep and need noise_process "
                             f"discrete_vp, not {self.process.name}")
        self.training_noise = OffsetNoise(offset_noise_strength)
        self.learn_logvar = learn_logvar
        logvar = torch.full((self.num_timesteps,), float(logvar_init))
        # Learned: a parameter saved as `logvar`; fixed: a plain tensor, absent from the state_dict (reference).
        self.logvar = nn.Parameter(logvar) if learn_logvar else logvar
        # The reference's own schedule keys sit at the top level of its checkpoints (`betas`, ...).
        self.register_state_dict_post_hook(_schedule_keys_to_top_level)
        self.register_load_state_dict_pre_hook(_schedule_keys_from_top_level)
        self.restarted_from_ckpt = False
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys, only_model=load_only_unet)
            self.restarted_from_ckpt = True

    # ------------------------------------------------------------------------------------ schedule

    def register_schedule(self, given_betas: Optional[Sequence[float]] = None, beta_schedule: str = "linear",
                          timesteps: int = 1000, linear_start: float = 1e-4, linear_end: float = 2e-2,
                          cosine_s: float = 8e-3, zero_terminal_snr: bool = False,
                          noise_process: Union[str, Mapping, None] = "discrete_vp") -> None:
        """Build the reference's β table (`self.schedule`), the noise process (`self.process`), what the
        network predicts (`self.prediction`) and the VLB weights."""
        self.schedule = NoiseSchedule.from_config(given_betas=given_betas, beta_schedule=beta_schedule,
                                                  timesteps=timesteps, linear_start=linear_start,
                                                  linear_end=linear_end, cosine_s=cosine_s,
                                                  v_posterior=self.v_posterior, zero_terminal_snr=zero_terminal_snr)
        self.process: NoiseProcess = make_noise_process(noise_process, self.schedule)
        # EDM's preconditioning assumes the data's std that its process normalises the input by.
        params = {"sigma_data": self.process.sigma_data} if (self.parameterization == "edm"
                                                            and isinstance(self.process, EDM)) else {}
        self.prediction = make_prediction(self.parameterization, **params)
        self.prediction.check_alpha(self.process.alpha_min)
        self.num_timesteps = self.schedule.num_timesteps
        self.linear_start, self.linear_end = linear_start, linear_end
        self.register_buffer("lvlb_weights", vlb_weights(self.schedule, self.prediction), persistent=False)

    def __getattr__(self, name: str) -> Any:
        # `model.alphas_cumprod` and friends, as users' scripts written for the reference read them.
        if name in NoiseSchedule.BUFFER_NAMES:
            return getattr(self.schedule, name)
        return super().__getattr__(name)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) (DDPM eq. 4)."""
        return self.schedule.q_sample(x_start, t, torch.randn_like(x_start) if noise is None else noise)

    # ------------------------------------------------------------------------------------ weights

    def init_from_ckpt(self, path: str, ignore_keys: Sequence[str] = (), only_model: bool = False) -> None:
        """Initialise from a `.ckpt` (weights only) or `.safetensors`; missing or unexpected keys are errors.

        `loss.*` (a first stage's training loss) is never needed; `model_ema.*` is used only when this model
        keeps an EMA. With `only_model`, the checkpoint holds the DiffusionWrapper alone (`diffusion_model.*`).
        """
        state_dict = load_state_dict(path)
        ignore = tuple(ignore_keys) + ("loss.", "first_stage_model.loss.")
        # An export (a model directory's weights) holds the EMA folded into `model.*` and no `model_ema.*`, and
        # `ignore_keys: [model_ema.]` leaves a checkpoint's average out: the EMA then starts from the loaded weights
        # rather than from the random ones it was made with (for a run that continues another on new data: an average
        # carried over lags behind what a short new run learns, bench/results/demo/ema-vs-raw).
        ema_in_checkpoint = any(k.startswith("model_ema.") and not k.startswith(ignore) for k in state_dict)
        ema_from_model = self.use_ema and not only_model and not ema_in_checkpoint
        if not self.use_ema or ema_from_model:
            ignore += ("model_ema.",)
        target = self.model if only_model else self
        load_weights(target, state_dict, strict=True, ignore_prefixes=ignore, source=str(path))
        if ema_from_model:
            self.model_ema = LitEma(self.model, decay=float(self.model_ema.decay))
        log.info(f"Restored from {path}")

    @contextmanager
    def ema_scope(self, context: Optional[str] = None) -> Iterator[None]:
        """Run the body with the EMA weights in the model (no-op without EMA); the trained weights come back after."""
        if self.use_ema:
            self.model_ema.store(self.model.parameters())
            self.model_ema.copy_to(self.model)
            if context is not None:
                log.debug(f"{context}: Switched to EMA weights")
        try:
            yield
        finally:
            if self.use_ema:
                self.model_ema.restore(self.model.parameters())
                if context is not None:
                    log.debug(f"{context}: Restored training weights")

    # ------------------------------------------------------------------------------------ model calls

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """The network's output at (x_t, t). `cond` is a tensor, a list, or a dict with `c_concat`/`c_crossattn`."""
        if cond is None or isinstance(cond, dict):
            return self.model(x_noisy, t, **(cond or {}))
        key = "c_concat" if self.model.conditioning_key == "concat" else "c_crossattn"
        return self.model(x_noisy, t, **{key: cond if isinstance(cond, list) else [cond]})

    def p_losses(self, x_start: torch.Tensor, cond: Any, t: torch.Tensor, noise: Optional[torch.Tensor] = None,
                 example_weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss at noise levels t (of `self.process`) and its parts, logged under `train/` or `val/`.

        `noise` defaults to `training_noise` (offset noise when configured), which is also what an ε, v or
        flow target is made of. `loss_simple` is logged unweighted (comparable across weightings); the loss
        weights it per sample (`loss_weighting`) before the learned log-variance, and by `example_weights` (B,)
        when given (prior preservation's weight of the base model's own samples). The VLB term is unweighted.
        """
        noise = self.training_noise(x_start) if noise is None else noise
        x_noisy = self.process.add_noise(x_start, noise, t)
        model_output = self.apply_model(x_noisy, self.process.model_time(t), cond)
        alpha, sigma = self.process.coefficients(t)
        target = self.prediction.target(x_start, noise, alpha, sigma)
        prefix = "train" if self.training else "val"
        loss_simple = elementwise_loss(model_output, target, self.loss_type).flatten(1).mean(1)
        log = {f"{prefix}/loss_simple": loss_simple.mean()}
        weights = loss_weights(self.loss_weighting, self.prediction, alpha, sigma, self.min_snr_gamma)
        loss = weights.to(loss_simple) * loss_simple
        if self.process.discrete:
            loss = reweight_by_logvar(loss, self.logvar.to(x_start.device)[t])
        if example_weights is not None:
            loss = loss * example_weights.to(loss)
        loss = self.l_simple_weight * loss.mean()
        if self.learn_logvar:
            log[f"{prefix}/loss_gamma"] = loss
            log["logvar"] = self.logvar.data.mean()
        if self.original_elbo_weight > 0:
            # The VLB term is a KL between Gaussians: always the squared error, whatever loss_type is.
            squared_error = elementwise_loss(model_output, target, "l2").flatten(1).mean(1)
            loss_vlb = (self.lvlb_weights[t] * squared_error).mean()
            log[f"{prefix}/loss_vlb"] = loss_vlb
            loss = loss + self.original_elbo_weight * loss_vlb
        log[f"{prefix}/loss"] = loss
        return loss, log

    def forward(self, x: torch.Tensor, c: Any = None,
                example_weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        t = self.noise_level_density(x.shape[0], device=self.device)
        return self.p_losses(x, c, t, example_weights=example_weights)

    def sigma_denoiser(self, cond: Any = None, uncond: Any = None, guidance_scale: float = 1.0) -> Denoiser:
        """D(x_σ, σ) ≈ E[x_0 | x_σ] with classifier-free guidance when `uncond` is given, for every sampler
        (`ldm.models.diffusion.samplers`)."""
        return Denoiser(guided_model(self.apply_model, cond, uncond, guidance_scale), self.process, self.prediction)

    # ------------------------------------------------------------------------------------ likelihood

    @property
    def data_is_pixels(self) -> bool:
        """Whether x is 8-bit image data in [-1, 1] (so the bound's L_0 uses the discretized decoder)."""
        return True

    @torch.no_grad()
    def bits_per_dim(self, x_start: torch.Tensor, cond: Any = None, timesteps: Optional[Sequence[int]] = None,
                     ) -> dict[str, torch.Tensor]:
        """The variational bound on −log p(x) in bits/dim for each example of a batch (DDPM Table 1).

        All T terms by default (T network calls); a subset of `timesteps` in 1..T−1 gives an unbiased estimate
        of the sum of the middle terms. Pixel data uses the discretized Gaussian decoder for L_0 (DDPM
        sec. 3.3); latents use a continuous Gaussian, so their figure is a bound on the latents' density.
        """
        if not self.process.discrete:
            raise ValueError(f"the variational bound is computed on the discrete DDPM table; this model's noise "
                             f"process is {self.process.name}")
        return variational_bound(lambda x, t: self.apply_model(x, t, cond), self.schedule, x_start,
                                 self.prediction, discretized=self.data_is_pixels, timesteps=timesteps)

    def _bpd_timesteps(self) -> list[int]:
        """`validation_bpd_timesteps` evenly spread over 1..T−1 (a stratified estimate of the middle terms)."""
        k = min(self.validation_bpd_timesteps, self.num_timesteps - 1)
        return torch.linspace(1, self.num_timesteps - 1, k).round().long().tolist()

    # ------------------------------------------------------------------------------------ Lightning

    def get_input(self, batch: Mapping, k: str) -> torch.Tensor:
        """`batch[k]` as a float NCHW tensor (datasets give NHWC images, as the reference's)."""
        x = batch[k]
        if x.dim() == 3:
            x = x[..., None]
        return x.permute(0, 3, 1, 2).to(memory_format=torch.contiguous_format).float()

    def prepare_batch(self, batch: Mapping) -> Mapping:
        """The batch with conditions dropped for classifier-free guidance (training only)."""
        if self.ucg_training and self.training:
            batch = drop_conditions(dict(batch), self.ucg_training)
        return batch

    def shared_step(self, batch: Mapping) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = self.get_input(self.prepare_batch(batch), self.first_stage_key)
        return self(x)

    def training_step(self, batch: Mapping, batch_idx: int) -> torch.Tensor:
        loss, log = self.shared_step(batch)
        raise_if_not_finite(loss, log, f"global step {self.global_step}")
        self.log_dict(log, prog_bar=True, logger=True, on_step=True, on_epoch=True, batch_size=_batch_size(batch))
        self.log("global_step", float(self.global_step), prog_bar=False, logger=True, on_step=True, on_epoch=False)
        if self.scheduler_config is not None:
            self.log("lr_abs", self.optimizers().param_groups[0]["lr"], prog_bar=False, logger=True,
                     on_step=True, on_epoch=False)
        return loss

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        if self.use_ema:
            self.model_ema(self.model)

    @torch.no_grad()
    def validation_step(self, batch: Mapping, batch_idx: int) -> None:
        batch_size = _batch_size(batch)
        _, log = self.shared_step(batch)
        with self.ema_scope():
            _, log_ema = self.shared_step(batch)
        log.update({f"{k}_ema": v for k, v in log_ema.items()})
        if self.validation_bpd_timesteps > 0:
            with self.ema_scope():
                log["val/bpd"] = self.validation_bits_per_dim(batch).mean()
        self.log_dict(log, prog_bar=False, logger=True, on_step=False, on_epoch=True, batch_size=batch_size)

    def validation_bits_per_dim(self, batch: Mapping) -> torch.Tensor:
        x = self.get_input(batch, self.first_stage_key)
        return self.bits_per_dim(x, timesteps=self._bpd_timesteps())["total_bpd"]

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = list(self.model.parameters())
        if self.learn_logvar:
            params.append(self.logvar)
        return params

    def configure_optimizers(self) -> Any:
        opt = adamw(self.trainable_parameters(), lr=self.learning_rate, weight_decay=self.weight_decay)
        if self.scheduler_config is None:
            return opt
        scheduler = instantiate_from_config(self.scheduler_config)
        log.debug("Setting up LambdaLR scheduler...")
        return [opt], [{"scheduler": LambdaLR(opt, lr_lambda=scheduler.schedule), "interval": "step", "frequency": 1}]

    # ------------------------------------------------------------------------------------ images

    def decode_for_display(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from model-space samples (clamped pixels here; `LatentDiffusion` decodes latents)."""
        return x.clamp(-1.0, 1.0)

    @torch.no_grad()
    def sample(self, cond: Any = None, batch_size: int = 16, return_intermediates: bool = False,
               x_T: Optional[torch.Tensor] = None, uncond: Any = None, guidance_scale: float = 1.0,
               progress: bool = False) -> Any:
        """Ancestral samples (DDPM Algorithm 2: the registry's ``ddpm``) in model space, with guidance when `uncond`
        is given and x̂_0 clipped to [−1, 1] when `clip_denoised`; with `return_intermediates`, also x_T and the
        x̂_0 of every `log_every_t`-th step (and the last)."""
        info = get_sampler("ddpm")
        sigmas = sampler_sigmas(info, self.process, self.num_timesteps, device=self.device)
        shape = (batch_size, self.channels, self.image_size, self.image_size)
        x_T = torch.randn(shape, device=self.device) if x_T is None else x_T
        denoiser: Any = self.sigma_denoiser(cond, uncond, guidance_scale)
        if self.clip_denoised:
            denoiser = EditedDenoiser(denoiser, lambda x0: x0.clamp(-1.0, 1.0))
        intermediates = [x_T]

        def record(i: int, x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> None:
            if (self.num_timesteps - 1 - i) % self.log_every_t == 0:
                intermediates.append(denoised)

        samples = run_sampler(info, denoiser, start_state(info, denoiser, x_T, sigmas[0]), sigmas, callback=record,
                              disable=not progress)
        return (samples, intermediates) if return_intermediates else samples

    def unconditional_guidance_inputs(self, cond: Any, batch: Mapping, n: int) -> Any:
        """The "no condition" input matching `cond`, the condition of the first `n` examples of `batch` (empty
        captions, null classes, an all-padding layout), or None if the model was not trained for it."""
        return None

    def log_inputs(self, batch: Mapping, N: int) -> tuple[torch.Tensor, Any, Any, dict[str, torch.Tensor]]:
        """For the image logs (`ldm.image_logs`), the first `N` examples of `batch`: (model-space inputs, their
        conditioning, their raw condition to draw or None, images to show for them: ``inputs`` in [-1, 1], ...)."""
        x = self.get_input(batch, self.first_stage_key)[:N].to(self.device)
        return x, None, None, {"inputs": x}


class LatentDiffusion(DDPM):
    """Diffusion in the latent space of a frozen first stage (Rombach et al. 2022), conditioned through a
    condition encoder τθ (`cond_stage_model`), trained jointly when `cond_stage_trainable`.

    Latents are z = scale_factor · E(x). With `scale_by_std`, scale_factor = 1/std(z) is measured on the
    first training batch (the latents then have unit variance, as the schedule assumes: LDM paper, appendix
    G), printed, and stored in the checkpoint as a buffer. `latent_channel_norm` goes one step further: each
    latent channel is shifted and scaled to zero mean and unit variance on that batch (buffers
    `latent_shift`, `latent_scale`), so no channel is drowned by the noise earlier than the others (a first
    stage's channels can differ several-fold in spread; one global factor leaves the quietest channel at a
    fraction of the others' signal-to-noise ratio at every noise level).

    `cache_latents` (true, or ``{dir: path, max_items: n}``) encodes each training item once and reuses its
    posterior on later visits (`ldm.models.diffusion.latent_cache`, which says what it costs); validation and
    image logging always encode.

    `init_from` (with `init_config` for a weights file that has no config of its own) names a trained model to
    fine-tune: its weights are loaded here (ldm/finetune.py); `lora_config`, `new_words`, `train_only_new_words` and
    `prior_preservation` say how it is fine-tuned. `vae` names a first stage of the same architecture whose weights
    then replace the first stage's (ldm/vae.py: a decoder fine-tuned on the run's images, which its samples and image
    logs are then decoded with).
    """

    def __init__(self, first_stage_config: Mapping, cond_stage_config: Union[Mapping, str],
                 num_timesteps_cond: Optional[int] = None, cond_stage_key: str = "image",
                 cond_stage_trainable: bool = False, concat_mode: bool = True, cond_stage_forward: Optional[str] = None,
                 conditioning_key: Optional[str] = None, scale_factor: float = 1.0, scale_by_std: bool = False,
                 cache_latents: Union[bool, Mapping] = False, latent_channel_norm: bool = False,
                 init_from: Optional[str] = None, init_config: Optional[str] = None,
                 lora_config: Optional[Mapping] = None,
                 new_words: Union[Mapping[str, Optional[str]], Sequence[str], None] = None,
                 train_only_new_words: bool = False,
                 prior_preservation: Optional[Mapping] = None, vae: Optional[str] = None, **kwargs: Any) -> None:
        if num_timesteps_cond not in (None, 1):
            raise ValueError(f"num_timesteps_cond={num_timesteps_cond}: the reference's noisy-condition schedule "
                             "is not supported; use 1")
        if conditioning_key is None:
            conditioning_key = "concat" if concat_mode else "crossattn"
        if cond_stage_config == "__is_unconditional__":
            conditioning_key = None
        ckpt_path = kwargs.pop("ckpt_path", None)
        ignore_keys = kwargs.pop("ignore_keys", ())
        super().__init__(conditioning_key=conditioning_key, **kwargs)
        self.concat_mode = concat_mode
        self.cond_stage_trainable = cond_stage_trainable
        self.cond_stage_key = cond_stage_key
        self.cond_stage_forward = cond_stage_forward
        self.scale_by_std = scale_by_std
        if scale_by_std:
            self.register_buffer("scale_factor", torch.tensor(scale_factor))
        else:
            self.scale_factor = scale_factor
        self.instantiate_first_stage(first_stage_config)
        self.latent_channel_norm = latent_channel_norm
        if latent_channel_norm:
            channels = first_stage_config["params"]["embed_dim"]
            self.register_buffer("latent_shift", torch.zeros(channels, 1, 1))
            self.register_buffer("latent_scale", torch.ones(channels, 1, 1))
        self.instantiate_cond_stage(cond_stage_config)
        self.latent_cache = LatentCache.from_option(cache_latents)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys)
            self.restarted_from_ckpt = True
        self.init_from = init_from
        self.init_config = init_config
        self.new_words = _check_new_words_options(new_words, train_only_new_words, init_from, lora_config)
        if init_from is not None:  # fine-tuning a trained model (ldm/finetune.py)
            load_base_weights(self, init_from, first_stage_config, self.new_words, init_config)
            self.restarted_from_ckpt = True  # the base's scale_factor stays: its U-Net was trained on it
        if vae is not None:  # after every other weight: the VAE replaces whatever first stage came with them
            swap_vae(self, vae)
        self.lora_settings = None
        if lora_config is not None:
            self._add_lora(lora_config)
        self.new_word_rows = None
        if train_only_new_words:  # textual inversion (ldm/new_words.py)
            _, self.new_word_rows = freeze_all_but_new_words(self, list(self.new_words))
            log.info(f"textual inversion: the embeddings of {', '.join(self.new_words)} train, the rest is frozen")
        elif self.lora_settings is not None and self.new_words:  # pivotal tuning: the adapter and the new rows
            _, self.new_word_rows = train_new_word_rows(self, list(self.new_words))
            log.info(f"LoRA with new words: the embeddings of {', '.join(self.new_words)} train with the adapter")
        self.prior_weight = None
        if prior_preservation is not None:  # DreamBooth's prior preservation (ldm/prior_preservation.py)
            self.prior_weight = PriorPreservation.from_config(prior_preservation).weight

    def _add_lora(self, lora_config: Mapping) -> None:
        """Freeze the model and train a LoRA adapter on it (ldm/lora.py); checkpoints then hold the adapter alone."""
        from ldm.lora import LoraSettings, add_lora

        self.lora_settings = LoraSettings.from_config(lora_config)
        trainable = add_lora(self, self.lora_settings)
        if self.use_ema:  # an average of the adapter alone: the frozen weights do not move
            self.model_ema = LitEma(self.model, decay=float(self.model_ema.decay))
        self.strict_loading = False  # a resumed checkpoint holds no base weights (`on_load_checkpoint` checks it)
        log.info(f"LoRA: {trainable:,} trainable parameters (rank {self.lora_settings.rank}), the rest frozen")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.lora_settings is not None:
            from ldm.lora import training_state

            checkpoint["state_dict"] = training_state(self, checkpoint["state_dict"])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.lora_settings is not None:
            from ldm.lora import check_training_state

            check_training_state(self, checkpoint["state_dict"], "the resumed checkpoint")

    # ------------------------------------------------------------------------------------ parts

    def instantiate_first_stage(self, config: Mapping) -> None:
        ckpt_path = (config.get("params") or {}).get("ckpt_path")
        if ckpt_path is not None and not Path(ckpt_path).is_file():
            # Checked before building: the autoencoder's own loader cannot say how to make the file.
            raise FileNotFoundError(_missing_first_stage_message(config))
        model = instantiate_from_config(config)
        self.first_stage_model = model.eval()
        self.first_stage_model.train = disabled_train
        for param in self.first_stage_model.parameters():
            param.requires_grad = False

    def instantiate_cond_stage(self, config: Union[Mapping, str]) -> None:
        if config == "__is_first_stage__":
            if self.cond_stage_trainable:
                raise ValueError("cond_stage_config '__is_first_stage__' uses the frozen first stage; "
                                 "set cond_stage_trainable: false")
            log.info("Using first stage also as cond stage.")
            self.cond_stage_model = self.first_stage_model
        elif config == "__is_unconditional__":
            log.info(f"Training {self.__class__.__name__} as an unconditional model.")
            self.cond_stage_model = None
        else:
            model = instantiate_from_config(config)
            if not self.cond_stage_trainable:
                model = model.eval()
                model.train = disabled_train
                for param in model.parameters():
                    param.requires_grad = False
            self.cond_stage_model = model

    @property
    def data_is_pixels(self) -> bool:
        return isinstance(self.first_stage_model, IdentityFirstStage) and float(self.scale_factor) == 1.0

    # ------------------------------------------------------------------------------------ first stage

    def get_first_stage_encoding(self, encoder_posterior: Union[DiagonalGaussianDistribution, torch.Tensor]) -> torch.Tensor:
        """z = scale_factor · (a posterior sample, or the encoder's tensor output), then per channel
        (z − latent_shift)·latent_scale with `latent_channel_norm`."""
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample()
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            raise TypeError(f"encoder output of type {type(encoder_posterior).__name__} is not supported; "
                            "expected DiagonalGaussianDistribution or Tensor")
        z = self.scale_factor * z
        return (z - self.latent_shift) * self.latent_scale if self.latent_channel_norm else z

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor) -> Any:
        return self.first_stage_model.encode(x)

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor, predict_cids: bool = False, force_not_quantize: bool = False) -> torch.Tensor:
        if predict_cids:
            raise ValueError("predict_cids needs a codebook-predicting U-Net, which no released LDM uses")
        if self.latent_channel_norm:
            z = z / self.latent_scale + self.latent_shift
        # A multiplication by the reciprocal, as the reference: decoding then matches its outputs bit for bit.
        z = 1.0 / self.scale_factor * z
        if isinstance(self.first_stage_model, VQModelInterface):
            return self.first_stage_model.decode(z, force_not_quantize=force_not_quantize)
        return self.first_stage_model.decode(z)

    def decode_for_display(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode_first_stage(z).clamp(-1.0, 1.0)

    # ------------------------------------------------------------------------------------ conditioning

    def get_learned_conditioning(self, c: Any) -> Any:
        """τθ(c): the condition encoder's output for raw conditions (captions, class labels, images)."""
        if self.cond_stage_forward is not None:
            return getattr(self.cond_stage_model, self.cond_stage_forward)(c)
        if hasattr(self.cond_stage_model, "encode") and callable(self.cond_stage_model.encode):
            c = self.cond_stage_model.encode(c)
            return c.mode() if isinstance(c, DiagonalGaussianDistribution) else c
        return self.cond_stage_model(c)

    def get_raw_condition(self, batch: Mapping, key: Optional[str] = None) -> Any:
        """The raw condition of a batch: captions as a list, labels as a tensor, images as NCHW."""
        key = key or self.cond_stage_key
        if key not in batch:
            raise KeyError(f"cond_stage_key {key!r} is not in the batch (it has {sorted(batch)}); set "
                           "model.params.cond_stage_key to one of them")
        value = batch[key]
        if isinstance(value, torch.Tensor) and value.dim() == 4:
            return DDPM.get_input(self, batch, key)  # NHWC -> NCHW (LatentDiffusion's get_input encodes)
        return value

    def get_input(self, batch: Mapping, k: str, return_first_stage_outputs: bool = False,
                  force_c_encode: bool = False, cond_key: Optional[str] = None, return_original_cond: bool = False,
                  bs: Optional[int] = None) -> Any:
        """As the reference: ``[z, c]`` for the first-stage key `k`, then ``x, xrec`` with
        `return_first_stage_outputs` and the raw condition ``xc`` with `return_original_cond`.

        c is encoded by τθ here unless the encoder is trained jointly (then `forward` encodes it, inside
        the graph), or when `force_c_encode`. `bs` keeps the first `bs` examples. In training, with
        `cache_latents`, the posterior of an item seen before comes from the cache.
        """
        x = DDPM.get_input(self, batch, k)
        if bs is not None:
            x = x[:bs]
        x = x.to(self.device)
        if self.latent_cache is not None and self.training:
            keys = batch.get("index")
            posterior = self.latent_cache.encode(keys if bs is None or keys is None else keys[:bs], x,
                                                 self.encode_first_stage)
        else:
            posterior = self.encode_first_stage(x)
        z = self.get_first_stage_encoding(posterior).detach()
        c = xc = None
        if self.model.conditioning_key is not None:
            xc = c = self.get_raw_condition(batch, cond_key)
            if bs is not None:
                xc = c = _first(c, bs)
            if isinstance(c, torch.Tensor):
                c = c.to(self.device)
            if not self.cond_stage_trainable or force_c_encode:
                c = self.get_learned_conditioning(c)
        out = [z, c]
        if return_first_stage_outputs:
            out.extend([x, self.decode_first_stage(z)])
        if return_original_cond:
            out.append(xc)
        return out

    def shared_step(self, batch: Mapping) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z, c = self.get_input(self.prepare_batch(batch), self.first_stage_key)
        return self(z, c, example_weights=self.prior_example_weights(batch))

    def prior_example_weights(self, batch: Mapping) -> Optional[torch.Tensor]:
        """With prior preservation, each example's loss weight: 1 for the run's own images, the prior weight for
        the base model's samples (marked by the batch's `PRIOR_KEY`, `ldm.data.prior_mix`); else None."""
        if self.prior_weight is None or PRIOR_KEY not in batch:
            return None
        prior = torch.as_tensor(batch[PRIOR_KEY], device=self.device).float()
        return 1.0 + (self.prior_weight - 1.0) * prior

    def forward(self, x: torch.Tensor, c: Any = None,
                example_weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.model.conditioning_key is not None and self.cond_stage_trainable:
            c = self.get_learned_conditioning(c)  # inside the graph: τθ trains with the U-Net
        return super().forward(x, c, example_weights)

    def validation_bits_per_dim(self, batch: Mapping) -> torch.Tensor:
        z, c = self.get_input(batch, self.first_stage_key, force_c_encode=True)
        return self.bits_per_dim(z, c, timesteps=self._bpd_timesteps())["total_bpd"]

    # ------------------------------------------------------------------------------------ training

    @torch.no_grad()
    def on_train_batch_start(self, batch: Mapping, batch_idx: int) -> None:
        # scale_by_std: measure the latents' std on the very first batch of a fresh run (LDM paper, app. G).
        if (self.scale_by_std and self.global_step == 0 and batch_idx == 0 and self.current_epoch == 0
                and not self.restarted_from_ckpt):
            if float(self.scale_factor) != 1.0:
                raise ValueError("scale_by_std measures scale_factor itself; remove the custom scale_factor "
                                 f"({float(self.scale_factor)}) from the config")
            x = DDPM.get_input(self, batch, self.first_stage_key).to(self.device)
            z = self.get_first_stage_encoding(self.encode_first_stage(x)).detach()
            self.scale_factor.copy_(1.0 / z.flatten().std())
            # Every rank saw another first batch: all take rank 0's value, so they train on one latent scale.
            self.scale_factor.copy_(self._from_rank_zero(self.scale_factor))
            log.info(f"scale_by_std: latent std {1.0 / float(self.scale_factor):.4f} on the first batch -> "
                     f"scale_factor {float(self.scale_factor):.5f} (stored in the checkpoint"
                     f"{f'; rank 0 measured it for all {self._world_size()} ranks' if self._world_size() > 1 else ''})")
        if (self.latent_channel_norm and self.global_step == 0 and batch_idx == 0 and self.current_epoch == 0
                and not self.restarted_from_ckpt):
            x = DDPM.get_input(self, batch, self.first_stage_key).to(self.device)
            z = self.scale_factor * self.encode_first_stage(x).mode()
            self.latent_shift.copy_(self._from_rank_zero(z.mean(dim=(0, 2, 3)).reshape(-1, 1, 1)))
            self.latent_scale.copy_(self._from_rank_zero(1.0 / z.std(dim=(0, 2, 3)).reshape(-1, 1, 1)))
            log.info("latent_channel_norm: per-channel mean "
                     + ", ".join(f"{v:.3f}" for v in self.latent_shift.flatten()) + "; std " + ", ".join(f"{1 / v:.3f}" for v in self.latent_scale.flatten())
                     + " on the first batch (stored in the checkpoint)")

    def _world_size(self) -> int:
        return self._trainer.world_size if self._trainer is not None else 1

    def _from_rank_zero(self, value: torch.Tensor) -> torch.Tensor:
        """`value` as rank 0 has it (itself outside a multi-process run or without a trainer)."""
        return self._trainer.strategy.broadcast(value, src=0) if self._world_size() > 1 else value

    def on_fit_start(self) -> None:
        log.info(f"{self.__class__.__name__}: scale_factor {float(self.scale_factor):.5f}"
                 + (" (from the starting weights)" if self.restarted_from_ckpt else
                    " (scale_by_std: measured on the first batch of a fresh run)" if self.scale_by_std else ""))

    def on_train_start(self) -> None:
        # The train loader exists from here on (not yet in on_fit_start).
        if self.latent_cache is not None:
            data_configs = getattr(self.trainer.datamodule, "dataset_configs", {})
            self.latent_cache.open(self.first_stage_model, self.trainer.train_dataloader.dataset,
                                   data_configs.get("train"))
            log.info(f"cache_latents: {len(self.latent_cache)} latents cached"
                     + (f", disk cache {self.latent_cache.path}" if self.latent_cache.path else ", in memory"))

    def on_train_epoch_end(self) -> None:
        if self.latent_cache is not None and self.trainer.is_global_zero:
            self.latent_cache.save()

    def on_train_end(self) -> None:
        # A run stopped by max_steps ends inside an epoch.
        if self.latent_cache is not None and self.trainer.is_global_zero:
            self.latent_cache.save()

    @property
    def word_table(self) -> nn.Parameter:
        """The text encoder's word embedding table (the weights textual inversion trains rows of)."""
        return self.cond_stage_model.transformer.token_emb.weight

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        if self.new_word_rows is not None:
            self.new_word_rows.restore(self.word_table)  # before the EMA update: the old rows as they were
        super().on_train_batch_end(*args, **kwargs)

    def trainable_parameters(self) -> list[nn.Parameter]:
        if self.lora_settings is not None:
            return [p for p in self.parameters() if p.requires_grad]  # the adapter's (and new words' table)
        if self.new_word_rows is not None:
            return [self.word_table]  # textual inversion: the embedding table, of which only new rows move
        params = super().trainable_parameters()
        if self.cond_stage_trainable and self.cond_stage_model is not None:
            log.info(f"{self.__class__.__name__}: also optimizing the parameters of "
                     f"{type(self.cond_stage_model).__name__}")
            params.extend(self.cond_stage_model.parameters())
        return params

    # ------------------------------------------------------------------------------------ images

    def unconditional_guidance_inputs(self, cond: Any, batch: Mapping, n: int) -> Any:
        key = self.cond_stage_key
        if not self.ucg_training or key not in self.ucg_training:
            return None
        value = self.ucg_training[key].get("val", "")
        if isinstance(value, str):
            return self.get_learned_conditioning([value] * n)
        # A tensor condition (labels, layout tokens, images) filled with `val`, as drop_conditions makes it.
        raw = torch.as_tensor(batch[key][:n])
        dropped = self.get_raw_condition({key: torch.full_like(raw, value)})
        return self.get_learned_conditioning(dropped.to(self.device))

    def log_inputs(self, batch: Mapping, N: int) -> tuple[torch.Tensor, Any, Any, dict[str, torch.Tensor]]:
        z, c, x, xrec, xc = self.get_input(batch, self.first_stage_key, return_first_stage_outputs=True,
                                           force_c_encode=True, return_original_cond=True, bs=N)
        return z, c, xc, {"inputs": x, "reconstruction": xrec.clamp(-1.0, 1.0)}


def _check_new_words_options(new_words: Union[Mapping[str, Optional[str]], Sequence[str], None],
                             train_only_new_words: bool, init_from: Optional[str],
                             lora_config: Optional[Mapping]) -> dict[str, Optional[str]]:
    """`new_words` as a dict, or a ValueError naming a combination that cannot work (ldm/new_words.py)."""
    words = parse_new_words(new_words)
    if train_only_new_words and not words:
        raise ValueError("train_only_new_words (textual inversion) trains the embeddings of new words alone, but "
                         "new_words names none: add new_words: {word: like_word} (null for the mean)")
    if words and init_from is None:
        raise ValueError("new_words adds words to a trained model's vocabulary: set model.params.init_from to the "
                         "model to start from")
    if train_only_new_words and lora_config is not None:
        raise ValueError("train_only_new_words with lora_config: textual inversion trains the new words alone; drop "
                         "lora_config, or train_only_new_words to train the new words with the adapter")
    return words


def _first(condition: Any, n: int) -> Any:
    """The first n examples of a raw condition (a tensor, a list, or a dict of them)."""
    if isinstance(condition, dict):
        return {key: _first(value, n) for key, value in condition.items()}
    return condition[:n]


def _batch_size(batch: Mapping) -> int:
    for value in batch.values():
        if hasattr(value, "__len__"):
            return len(value)
    raise ValueError("cannot tell the batch size: the batch has no sized values")


def _missing_first_stage_message(config: Mapping) -> str:
    """Which file is missing, and the commands that make it (from the recipe beside it, when present)."""
    ckpt = Path(str(config["params"]["ckpt_path"]))
    recipe = ckpt.parent / "config.yaml"
    train_config = recipe if recipe.is_file() else Path("configs/autoencoder/<your first-stage config>.yaml")
    return (f"first-stage checkpoint missing: no file at {ckpt}. Make it by training the first stage and "
            f"exporting its weights:\n  python main.py --base {train_config} -t\n"
            f"  python scripts/export_weights.py logs/<that run>/checkpoints/last.ckpt -o {ckpt}\n"
            "or point first_stage_config.params.ckpt_path at an existing first-stage checkpoint.")


def _schedule_keys_to_top_level(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for name in NoiseSchedule.BUFFER_NAMES:
        key = f"{prefix}schedule.{name}"
        if key in state_dict:
            state_dict[prefix + name] = state_dict.pop(key)


def _schedule_keys_from_top_level(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    for name in NoiseSchedule.BUFFER_NAMES:
        if prefix + name in state_dict:
            state_dict[f"{prefix}schedule.{name}"] = state_dict.pop(prefix + name)
