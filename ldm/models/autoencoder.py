"""First-stage autoencoders of latent diffusion: `AutoencoderKL` and `VQModel` (Rombach et al. 2022, sec. 3.1).

Both are trained as in the reference: a reconstruction + perceptual loss with a patch discriminator
(Esser et al. 2021), and a KL penalty or a vector-quantisation bottleneck. Module, class, parameter and
state-dict names equal the CompVis code, so its configs and checkpoints work. Differences that matter:

- Lightning 2.x manual optimisation with the reference's two Adam optimisers (see `batch_step`).
- The discriminator is neither run nor stepped before `disc_start`.
- The loss's output log-variance is optimised (`learn_logvar`, on by default: the reference built it as
  a parameter but never gave it to an optimiser; `learn_logvar: false` keeps it fixed as there).
- A non-finite loss stops training with a message naming the step and the loss terms.
- `VQModel.decode_code` works (the reference called a method that does not exist).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR

from ldm.checkpoint import load_state_dict, load_weights
from ldm.divergence import raise_if_not_finite
from ldm.model_files import base_model_files
from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.ema import LitEma
from ldm.modules.vqvae.quantize import VectorQuantizer2 as VectorQuantizer
from ldm.util import instantiate_from_config

log = logging.getLogger(__name__)

# Fixed seed of the prior samples shown by `log_images`: the same latents at every logging step make the
# grids comparable over training, and drawing them does not disturb the training RNG stream.
SAMPLE_SEED = 0


class FirstStageModule(pl.LightningModule):
    """What the KL and VQ autoencoders share: input handling, the GAN training loop, EMA, logging.

    Subclasses build `encoder`, `decoder`, `loss`, `quant_conv` and `post_quant_conv`, then call
    `_finish_setup`, and implement `_reconstruct`, `_loss`, `_autoencoder_parameters`, `_sample_prior`.
    """

    # Each of the two backward passes leaves one side of the GAN without gradients; main.py reads this
    # to run `--strategy ddp` as DDP with find_unused_parameters.
    ddp_find_unused_parameters = True

    def __init__(self, image_key: str, colorize_nlabels: Optional[int], monitor: Optional[str],
                 lr_g_factor: float = 1.0, scheduler_config: Optional[dict] = None) -> None:
        super().__init__()
        # Two optimisers stepped by hand: Lightning 2.x has no `optimizer_idx` loop any more.
        self.automatic_optimization = False
        self.image_key = image_key
        self.lr_g_factor = lr_g_factor
        self.scheduler_config = scheduler_config
        if colorize_nlabels is not None:
            if not isinstance(colorize_nlabels, int) or isinstance(colorize_nlabels, bool):
                raise TypeError(f"colorize_nlabels must be an int (number of label channels), got {colorize_nlabels!r}")
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))
        if monitor is not None:
            self.monitor = monitor

    def _finish_setup(self, ema_decay: Optional[float], ckpt_path: Optional[str], ignore_keys: Sequence[str],
                      init_from: Optional[str] = None) -> None:
        """EMA of the weights (built once every module exists), then optional initial weights: `ckpt_path`, or
        the weights of the trained first stage `init_from` names (a model directory, a run or a `.ckpt` in one, as
        ldm/finetune.py reads it; its architecture went under this model's config before it was built)."""
        self.use_ema = ema_decay is not None
        if self.use_ema:
            if not 0.0 < ema_decay < 1.0:
                raise ValueError(f"ema_decay must lie in (0, 1) (e.g. 0.9999), got {ema_decay}")
            self.ema_decay = ema_decay
            self.model_ema = LitEma(self, decay=ema_decay)
        if ckpt_path is not None and init_from is not None:
            raise ValueError("ckpt_path and init_from both name starting weights of the autoencoder: keep one")
        if init_from is not None:
            ckpt_path = str(base_model_files(init_from)[1])
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)

    # ----------------------------------------------------------------------------------------- weights

    def init_from_ckpt(self, path: str, ignore_keys: Sequence[str] = ()) -> None:
        """Initialise from a checkpoint: the autoencoder strictly, training state where it fits.

        Keys starting with any of `ignore_keys` are dropped. The loss (discriminator, LPIPS) differs between
        configs (the LDM first stage uses Identity), so its weights load where names and shapes match.
        `model_ema.*` loads when this model keeps an EMA and the checkpoint has one; otherwise the EMA
        restarts from the loaded weights rather than from the random initialisation.
        """
        state_dict = load_state_dict(path)
        ignore = tuple(ignore_keys)
        if ignore:
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(ignore)}
        checkpoint_has_ema = any(k.startswith("model_ema.") for k in state_dict)
        skip = ("loss.",) if self.use_ema and checkpoint_has_ema else ("loss.", "model_ema.")
        load_weights(self, state_dict, strict=True, ignore_prefixes=ignore + skip, source=str(path))
        own_loss_state = self.loss.state_dict()
        loss_state = {k[len("loss."):]: v for k, v in state_dict.items() if k.startswith("loss.")}
        fitting = {k: v for k, v in loss_state.items() if k in own_loss_state and v.shape == own_loss_state[k].shape}
        load_weights(self.loss, fitting, strict=False, source=str(path))
        if self.use_ema and not checkpoint_has_ema:
            self.model_ema = LitEma(self, decay=self.ema_decay)
        unused = len(loss_state) - len(fitting)
        log.info(f"{self.__class__.__name__}: restored from {path}"
                 + (f" ({unused} loss keys do not fit this loss config and were skipped)" if unused else ""))

    @contextmanager
    def ema_scope(self, context: Optional[str] = None) -> Iterator[None]:
        """Run the body with the EMA weights swapped in (no-op without EMA); training weights come back after."""
        # Only the averaged (trainable) parameters are swapped: frozen ones such as LPIPS need no copy.
        swapped = [p for p in self.parameters() if p.requires_grad]
        if self.use_ema:
            self.model_ema.store(swapped)
            self.model_ema.copy_to(self)
            if context is not None:
                log.debug(f"{context}: switched to EMA weights")
        try:
            yield None
        finally:
            if self.use_ema:
                self.model_ema.restore(swapped)
                if context is not None:
                    log.debug(f"{context}: restored training weights")

    def on_fit_start(self) -> None:
        wrapped = self.trainer.strategy.model
        if isinstance(wrapped, DistributedDataParallel) and not wrapped.find_unused_parameters:
            # Each backward pass leaves one side of the GAN without gradients, which DDP's default
            # reducer treats as an error (raised only at the next step, with a less specific message).
            raise RuntimeError(
                f"{self.__class__.__name__} trains the autoencoder and the discriminator with separate backward "
                "passes, so each leaves some parameters without gradients; DDP needs "
                "strategy='ddp_find_unused_parameters_true' (or DDPStrategy(find_unused_parameters=True))"
            )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.use_ema:
            self.model_ema(self)

    # ------------------------------------------------------------------------------------------ inputs

    def get_input(self, batch: Mapping[str, Any], k: str) -> torch.Tensor:
        """`batch[k]`, channels-last (b, h, w[, c]) as datasets give it, as contiguous float NCHW."""
        if k not in batch:
            raise KeyError(f"batch has no key {k!r} (the model's image_key); it has {sorted(batch)}")
        x = batch[k]
        if x.dim() == 3:
            x = x[..., None]
        channels = self.encoder.in_channels
        if x.dim() != 4 or x.shape[-1] != channels:
            raise ValueError(
                f"batch[{k!r}] has shape {tuple(x.shape)}; expected channels-last images (batch, height, width, "
                f"{channels}) matching ddconfig.in_channels={channels}"
            )
        return x.permute(0, 3, 1, 2).to(memory_format=torch.contiguous_format).float()

    @property
    def batch_step(self) -> int:
        """Training batches processed so far: the step the loss schedules (`disc_start`) count in.

        Under manual optimisation `global_step` counts optimiser steps, and every batch steps both the
        autoencoder and the discriminator optimiser (the latter a no-op before `disc_start`), so it grows
        by two per batch.
        """
        return self.global_step // 2

    def get_last_layer(self) -> torch.Tensor:
        """The decoder's output conv weight: where the loss balances reconstruction and GAN gradients."""
        return self.decoder.conv_out.weight

    # ---------------------------------------------------------------------------------------- training

    def configure_optimizers(self) -> Any:
        if not hasattr(self, "learning_rate"):
            raise AttributeError(
                f"{self.__class__.__name__}.learning_rate is not set; main.py sets it from "
                "model.base_learning_rate, otherwise assign model.learning_rate before fitting"
            )
        lr = self.learning_rate
        opt_ae = torch.optim.Adam(self._autoencoder_parameters(), lr=self.lr_g_factor * lr, betas=(0.5, 0.9))
        opt_disc = torch.optim.Adam(self.loss.discriminator.parameters(), lr=lr, betas=(0.5, 0.9))
        if self.scheduler_config is None:
            return [opt_ae, opt_disc]
        schedule = instantiate_from_config(self.scheduler_config).schedule
        return [opt_ae, opt_disc], [LambdaLR(opt_ae, lr_lambda=schedule), LambdaLR(opt_disc, lr_lambda=schedule)]

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        opt_ae, opt_disc = self.optimizers()
        x = self.get_input(batch, self.image_key)
        xrec, extras = self._reconstruct(x)

        # Autoencoder (generator) step; the discriminator's weights take no gradient from it.
        self.toggle_optimizer(opt_ae)
        aeloss, log_ae = self._loss(x, xrec, extras, 0, "train")
        self._raise_if_not_finite(aeloss, log_ae, "autoencoder")
        opt_ae.zero_grad(set_to_none=True)
        self.manual_backward(aeloss)
        opt_ae.step()
        self.untoggle_optimizer(opt_ae)
        batch_size = x.shape[0]
        self.log("aeloss", aeloss.detach(), prog_bar=True, on_step=True, on_epoch=True, batch_size=batch_size)
        self.log_dict(log_ae, on_step=True, on_epoch=False, batch_size=batch_size)

        # Discriminator step on the detached reconstructions; before disc_start nothing runs and the step
        # is a no-op (no gradients), taken anyway so that `batch_step` stays global_step // 2.
        self.toggle_optimizer(opt_disc)
        opt_disc.zero_grad(set_to_none=True)
        if self.loss.discriminator_active(self.batch_step):
            discloss, log_disc = self._loss(x, xrec.detach(), extras, 1, "train")
            self._raise_if_not_finite(discloss, log_disc, "discriminator")
            self.manual_backward(discloss)
            self.log("discloss", discloss.detach(), prog_bar=True, on_step=True, on_epoch=True, batch_size=batch_size)
            self.log_dict(log_disc, on_step=True, on_epoch=False, batch_size=batch_size)
        elif getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            # fp16 GradScaler refuses to step an optimiser that has no gradients; zero gradients leave
            # Adam's weights unchanged (its update is m / (sqrt(v) + eps) with m = 0).
            for p in self.loss.discriminator.parameters():
                p.grad = torch.zeros_like(p)
        opt_disc.step()
        self.untoggle_optimizer(opt_disc)

        # Manual optimisation leaves scheduler stepping to us: once per batch, as `schedule(step)` expects.
        schedulers = self.lr_schedulers()
        if schedulers is not None:
            for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
                scheduler.step()

    def _raise_if_not_finite(self, loss: torch.Tensor, log: Mapping[str, Any], which: str) -> None:
        raise_if_not_finite(loss, log, f"the {which} step of batch step {self.batch_step} (global_step "
                                       f"{self.global_step})")

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._log_validation_losses(batch, suffix="")
        if self.use_ema:
            with self.ema_scope():
                self._log_validation_losses(batch, suffix="_ema")

    def _log_validation_losses(self, batch: Mapping[str, Any], suffix: str) -> None:
        split = "val" + suffix
        x = self.get_input(batch, self.image_key)
        xrec, extras = self._reconstruct(x)
        _, logs = self._loss(x, xrec, extras, 0, split)
        logs = dict(logs)
        if self.loss.discriminator_active(self.batch_step):
            logs.update(self._loss(x, xrec, extras, 1, split)[1])
        rec_key = f"{split}/rec_loss"
        batch_size = x.shape[0]
        self.log(rec_key, logs.pop(rec_key), prog_bar=True, on_epoch=True, sync_dist=True, batch_size=batch_size)
        self.log_dict(logs, on_step=False, on_epoch=True, sync_dist=True, batch_size=batch_size)

    # ----------------------------------------------------------------------------------------- images

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], N: int = 8, only_inputs: bool = False, plot_ema: bool = False,
                   **kwargs: Any) -> dict[str, torch.Tensor]:
        """`inputs`, `reconstructions` and prior `samples` (+ `*_ema` with `plot_ema`), NCHW in [-1, 1].

        Images with other than 3 channels are shown through `to_rgb`.
        """
        x = self.get_input(batch, self.image_key)[:N].to(self.device)
        log = {"inputs": x}
        if not only_inputs:
            log.update(self._reconstructions_and_samples(x, suffix=""))
            if plot_ema and self.use_ema:
                with self.ema_scope():
                    log.update(self._reconstructions_and_samples(x, suffix="_ema"))
        return {k: (v if v.shape[1] == 3 else self.to_rgb(v)).clamp(-1.0, 1.0) for k, v in log.items()}

    def _reconstructions_and_samples(self, x: torch.Tensor, suffix: str) -> dict[str, torch.Tensor]:
        xrec, _ = self._reconstruct(x)
        factor = 2 ** (self.encoder.num_resolutions - 1)
        generator = torch.Generator(device=self.device).manual_seed(SAMPLE_SEED)
        samples = self._sample_prior(x.shape[0], x.shape[2] // factor, x.shape[3] // factor, generator)
        return {f"reconstructions{suffix}": xrec, f"samples{suffix}": samples}

    def to_rgb(self, x: torch.Tensor) -> torch.Tensor:
        """Show a non-RGB image: grey for 1 channel, else a fixed random projection to 3 channels."""
        if x.shape[1] == 1:
            return x.repeat(1, 3, 1, 1)
        if not hasattr(self, "colorize"):
            # Not persistent: a buffer appearing mid-training must not change the checkpoint's keys.
            self.register_buffer("colorize", torch.randn(3, x.shape[1], 1, 1).to(x), persistent=False)
        x = F.conv2d(x, weight=self.colorize.to(x))
        return 2.0 * (x - x.min()) / (x.max() - x.min()) - 1.0

    # ------------------------------------------------------------------------------ subclass interface

    def _reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """(reconstruction, what the loss needs besides it: the posterior, or quantisation loss and codes)."""
        raise NotImplementedError

    def _loss(self, x: torch.Tensor, xrec: torch.Tensor, extras: Any, optimizer_idx: int,
              split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss module's (loss, log) for the autoencoder (0) or the discriminator (1)."""
        raise NotImplementedError

    def _autoencoder_parameters(self) -> list[nn.Parameter]:
        """Everything the autoencoder optimiser updates."""
        raise NotImplementedError

    def _sample_prior(self, n: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        """`n` images decoded from latents of spatial size (height, width) drawn from the prior."""
        raise NotImplementedError


def _trainable(*modules: nn.Module) -> list[nn.Parameter]:
    return [p for m in modules for p in m.parameters() if p.requires_grad]


class AutoencoderKL(FirstStageModule):
    """Autoencoder with a diagonal Gaussian posterior and a KL penalty towards N(0, I).

    `ddconfig` builds `Encoder`/`Decoder` (needs `double_z: true`), `lossconfig` the loss
    (`LPIPSWithDiscriminator`, or `torch.nn.Identity` for inference only). Latents have `embed_dim`
    channels. `ema_decay` keeps an EMA of the weights (`model_ema.*`), used for the `val_ema/*` metrics
    and `plot_ema` images. `learn_logvar` (default on) optimises the loss's output log-variance.

    Two options make a decoder for latents a diffusion model generated rather than encoded: `decoder_noise`
    adds Gaussian noise to z in training, of standard deviation drawn per image uniformly from
    [0, decoder_noise] × the batch's latent std (the noise augmentation of cascaded diffusion, Ho et al. 2021,
    sec. 4.1, put on the decoder: a sample's latent is off the encoder's by errors of that kind, and a decoder
    that only saw exact encodings turns them into ragged outlines); `train_decoder_only` freezes the encoder
    and `quant_conv`, so the latent space, and every diffusion model trained on it, stays as it was.

    `init_from` starts from a trained first stage (configs/autoencoder/decoder_finetune.yaml fine-tunes the shipped
    one's decoder on a user's images): see `_finish_setup`.
    """

    def __init__(self, ddconfig: dict, lossconfig: dict, embed_dim: int, ckpt_path: Optional[str] = None,
                 ignore_keys: Sequence[str] = (), image_key: str = "image", colorize_nlabels: Optional[int] = None,
                 monitor: Optional[str] = None, ema_decay: Optional[float] = None, learn_logvar: bool = True,
                 decoder_noise: float = 0.0, train_decoder_only: bool = False,
                 init_from: Optional[str] = None) -> None:
        super().__init__(image_key=image_key, colorize_nlabels=colorize_nlabels, monitor=monitor)
        if decoder_noise < 0:
            raise ValueError(f"decoder_noise must be >= 0 (a fraction of the latent std), got {decoder_noise}")
        self.decoder_noise = decoder_noise
        self.train_decoder_only = train_decoder_only
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig.double_z: true (the encoder emits mean and log-variance)")
        self.ddconfig = dict(ddconfig)  # the architecture, for conversions (ldm.diffusers_bridge)
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig)
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.embed_dim = embed_dim
        logvar = getattr(self.loss, "logvar", None)
        # Inference-only configs use `torch.nn.Identity` as the loss: nothing to learn there.
        self.learn_logvar = learn_logvar and isinstance(logvar, nn.Parameter)
        if isinstance(logvar, nn.Parameter):
            logvar.requires_grad_(learn_logvar)  # a fixed logvar stays out of the optimiser and the EMA
        self._finish_setup(ema_decay, ckpt_path, ignore_keys, init_from)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, input: torch.Tensor, sample_posterior: bool = True
                ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        posterior = self.encode(input)
        z = posterior.sample() if sample_posterior else posterior.mode()
        if self.training and self.decoder_noise > 0:
            level = self.decoder_noise * torch.rand(len(z), 1, 1, 1, device=z.device) * z.detach().std()
            z = z + level * torch.randn_like(z)
        return self.decode(z), posterior

    def _reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        return self(x)

    def _loss(self, x: torch.Tensor, xrec: torch.Tensor, extras: DiagonalGaussianDistribution, optimizer_idx: int,
              split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.loss(x, xrec, extras, optimizer_idx, self.batch_step, last_layer=self.get_last_layer(),
                         split=split)

    def _autoencoder_parameters(self) -> list[nn.Parameter]:
        trained = (self.decoder, self.post_quant_conv)
        if self.train_decoder_only:
            for module in (self.encoder, self.quant_conv):
                module.requires_grad_(False)
        else:
            trained = (self.encoder, self.quant_conv, *trained)
        params = _trainable(*trained)
        if self.learn_logvar:
            params.append(self.loss.logvar)
        return params

    def _sample_prior(self, n: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        z = torch.randn(n, self.embed_dim, height, width, generator=generator, device=self.device)
        return self.decode(z)


class VQModel(FirstStageModule):
    """Vector-quantised autoencoder (VQGAN, Esser et al. 2021) with `n_embed` codes of size `embed_dim`.

    As the reference: `batch_resize_range` = [low, high] trains on batches resized to a random multiple of
    16 in that range; `scheduler_config` builds an object whose `.schedule(step)` scales both learning
    rates per batch; `lr_g_factor` scales the autoencoder's rate; `remap`/`sane_index_shape` are passed to
    the quantizer; `use_ema` keeps an EMA of the weights. Added: `quantizer_ema_decay` (EMA codebook) and
    `restart_unused_codes`/`restart_after_steps` (dead-code restarts), see `VectorQuantizer2`.
    """

    def __init__(self, ddconfig: dict, lossconfig: dict, n_embed: int, embed_dim: int, ckpt_path: Optional[str] = None,
                 ignore_keys: Sequence[str] = (), image_key: str = "image", colorize_nlabels: Optional[int] = None,
                 monitor: Optional[str] = None, batch_resize_range: Optional[Sequence[int]] = None,
                 scheduler_config: Optional[dict] = None, lr_g_factor: float = 1.0, remap: Optional[str] = None,
                 sane_index_shape: bool = False, use_ema: bool = False, quantizer_ema_decay: Optional[float] = None,
                 restart_unused_codes: bool = False, restart_after_steps: int = 100) -> None:
        super().__init__(image_key=image_key, colorize_nlabels=colorize_nlabels, monitor=monitor,
                         lr_g_factor=lr_g_factor, scheduler_config=scheduler_config)
        if batch_resize_range is not None:
            if len(batch_resize_range) != 2 or not 0 < batch_resize_range[0] <= batch_resize_range[1]:
                raise ValueError(f"batch_resize_range must be [low, high] with 0 < low <= high, got "
                                 f"{list(batch_resize_range)}")
            log.info(f"{self.__class__.__name__}: using per-batch resizing in range {list(batch_resize_range)}")
        self.batch_resize_range = batch_resize_range
        self.embed_dim = embed_dim
        self.n_embed = n_embed
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig)
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta=0.25, remap=remap, sane_index_shape=sane_index_shape,
                                        ema_decay=quantizer_ema_decay, restart_unused_codes=restart_unused_codes,
                                        restart_after_steps=restart_after_steps)
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self._finish_setup(0.9999 if use_ema else None, ckpt_path, ignore_keys)

    def encode_to_prequant(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """(quantised latent, codebook loss, (perplexity, min_encodings, indices)) as the quantizer returns."""
        return self.quantize(self.encode_to_prequant(x))

    def _decode_quantized(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        return self._decode_quantized(quant)

    def decode_code(self, code_b: torch.Tensor) -> torch.Tensor:
        """Images from code indices of shape (b, h, w) (in the remapped index space when `remap` is set)."""
        if code_b.dim() != 3:
            raise ValueError(f"decode_code expects code indices of shape (batch, height, width), got "
                             f"{tuple(code_b.shape)}")
        b, h, w = code_b.shape
        quant = self.quantize.get_codebook_entry(code_b.reshape(-1), shape=(b, h, w, self.embed_dim))
        return self._decode_quantized(quant)

    def forward(self, input: torch.Tensor, return_pred_indices: bool = False) -> tuple[torch.Tensor, ...]:
        # Built from the quantizer and `_decode_quantized` rather than encode/decode, which
        # VQModelInterface redefines.
        quant, diff, (_, _, ind) = self.quantize(self.encode_to_prequant(input))
        dec = self._decode_quantized(quant)
        return (dec, diff, ind) if return_pred_indices else (dec, diff)

    def get_input(self, batch: Mapping[str, Any], k: str) -> torch.Tensor:
        x = super().get_input(batch, k)
        if self.batch_resize_range is None or not self.training:
            return x
        low, high = self.batch_resize_range
        if self.batch_step <= 4:
            size = high  # the first batches at the largest size, so running out of memory shows at once
        else:
            sizes = range(low, high + 16, 16)
            size = sizes[int(torch.randint(len(sizes), ()))]
        if size != x.shape[2]:
            x = F.interpolate(x, size=size, mode="bicubic")
        return x.detach()

    def _reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        xrec, qloss, ind = self(x, return_pred_indices=True)
        return xrec, (qloss, ind)

    def _loss(self, x: torch.Tensor, xrec: torch.Tensor, extras: tuple[torch.Tensor, torch.Tensor],
              optimizer_idx: int, split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        qloss, ind = extras
        # Code usage is logged once, with the autoencoder's terms.
        return self.loss(qloss, x, xrec, optimizer_idx, self.batch_step, last_layer=self.get_last_layer(),
                         split=split, predicted_indices=ind if optimizer_idx == 0 else None)

    def _autoencoder_parameters(self) -> list[nn.Parameter]:
        # An EMA codebook takes no gradient and is left out by `_trainable`.
        return _trainable(self.encoder, self.decoder, self.quantize, self.quant_conv, self.post_quant_conv)

    def _sample_prior(self, n: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        # Uniform over the codes the quantizer can emit: a crude prior, but it shows what the decoder
        # makes of the codebook (an autoregressive or diffusion prior is what makes real samples).
        num_codes = self.quantize.used.numel() if self.quantize.remap is not None else self.n_embed
        codes = torch.randint(num_codes, (n, height, width), generator=generator, device=self.device)
        return self.decode_code(codes)


class VQModelInterface(VQModel):
    """`VQModel` as the LDM first stage: `encode` returns the pre-quantisation latent h, and `decode`
    quantises it first (unless `force_not_quantize`), so the diffusion model works in continuous space."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_to_prequant(x)

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        quant = h if force_not_quantize else self.quantize(h)[0]
        return self._decode_quantized(quant)


class IdentityFirstStage(nn.Module):
    """A first stage that does nothing: the diffusion model then works in pixel space.

    With `vq_interface`, `quantize` returns the reference's VQ triple so code written for VQ first stages
    runs unchanged.
    """

    def __init__(self, vq_interface: bool = False) -> None:
        super().__init__()
        self.vq_interface = vq_interface

    def encode(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x

    def decode(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x

    def quantize(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.vq_interface:
            return x, None, [None, None, None]
        return x

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x
