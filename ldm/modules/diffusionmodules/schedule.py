"""The DDPM forward process: beta schedules and the closed-form quantities derived from them.

Notation follows Ho et al. 2020 ("Denoising Diffusion Probabilistic Models", DDPM): β_t is the noise
variance added at step t, α_t = 1 − β_t and ᾱ_t = Π_{s≤t} α_s. Timesteps are 0-based indices into the
schedule arrays, so index t here is step t+1 of the paper.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import nn

BETA_SCHEDULES = ("linear", "cosine", "sqrt_linear", "sqrt")

# Floor under the posterior variance before its log: entry 0 is exactly 0 (x_0 is known given x_1 and
# x_0), and the reference keeps log(1e-20) there instead of -inf.
POSTERIOR_VARIANCE_FLOOR = 1e-20


def make_beta_schedule(schedule: str, n_timestep: int, linear_start: float = 1e-4, linear_end: float = 2e-2,
                       cosine_s: float = 8e-3) -> np.ndarray:
    """β_1..β_T as a float64 array of length `n_timestep`, with the reference's exact numbers.

    - ``linear``: despite the name, linear in **sqrt(β)**: ``linspace(√start, √end, T)²`` (the latent-diffusion
      convention; DDPM's own linear schedule is what is called ``sqrt_linear`` here).
    - ``cosine``: Nichol & Dhariwal 2021, eq. 17: ᾱ(t) = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s) · π/2), and
      β_t = 1 − ᾱ(t+1)/ᾱ(t) clipped to [0, 0.999] so the last steps do not reach β = 1.
    - ``sqrt_linear``: β linear from `linear_start` to `linear_end` (DDPM's schedule, despite the name).
    - ``sqrt``: sqrt of a linspace from `linear_start` to `linear_end`.

    torch ops in float64 are used (not numpy) because they are what the reference ran, which makes the
    float32 buffers bit-identical to its checkpoints. They run on the CPU explicitly, so the numbers exist
    even while a model is built under ``with torch.device("meta")``.
    """
    if isinstance(n_timestep, bool) or not isinstance(n_timestep, (int, np.integer)) or n_timestep < 1:
        raise ValueError(f"n_timestep must be a positive int, got {n_timestep!r}")
    if schedule == "linear":
        betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep, dtype=torch.float64, device="cpu") ** 2
    elif schedule == "cosine":
        steps = torch.arange(n_timestep + 1, dtype=torch.float64, device="cpu") / n_timestep + cosine_s
        alphas_cumprod = torch.cos(steps / (1 + cosine_s) * math.pi / 2).pow(2)
        alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
        betas = torch.clamp(1 - alphas_cumprod[1:] / alphas_cumprod[:-1], min=0.0, max=0.999)
    elif schedule == "sqrt_linear":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64, device="cpu")
    elif schedule == "sqrt":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64, device="cpu") ** 0.5
    else:
        raise ValueError(f"unknown beta schedule {schedule!r}; choose one of {', '.join(BETA_SCHEDULES)}")
    return betas.numpy()


def rescale_zero_terminal_snr(betas: ArrayLike) -> np.ndarray:
    """β rescaled so that ᾱ_T = 0 (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are
    Flawed", Algorithm 1): √ᾱ_t is shifted so its last entry is 0 and scaled so its first is unchanged.

    The usual schedules end at ᾱ_T > 0 (0.0047 for Stable Diffusion's), so training never shows the model
    pure noise while sampling starts from it. The returned β_T is exactly 1 (α_T = 0), so ᾱ_T is exactly 0;
    ε-prediction cannot recover x_0 there, so such a schedule needs v- or x_0-prediction (paper sec. 3.2).
    """
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size < 2:
        raise ValueError(f"zero_terminal_snr needs at least 2 timesteps (it keeps the first ᾱ), got {betas.shape}")
    sqrt_alphas_cumprod = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_alphas_cumprod[0], sqrt_alphas_cumprod[-1]
    sqrt_alphas_cumprod = (sqrt_alphas_cumprod - last) * (first / (first - last))
    alphas_cumprod = sqrt_alphas_cumprod ** 2
    alphas = np.append(alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1])
    return 1.0 - alphas


def extract(a: torch.Tensor, t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """a[t] reshaped to (B, 1, ..., 1) so it broadcasts against a tensor of `shape` = (B, ...)."""
    if t.dim() != 1 or t.shape[0] != shape[0]:
        raise ValueError(f"t must be a 1-D tensor of length batch={shape[0]}, got shape {tuple(t.shape)}")
    return a.gather(0, t.to(a.device, torch.long)).reshape(shape[0], *((1,) * (len(shape) - 1)))


class NoiseSchedule(nn.Module):
    """The fixed forward process q of DDPM and its posterior, as buffers indexed by timestep.

    The 12 buffers have the reference's names and order, so they load from (and save to) its
    checkpoints. They are computed in float64 and cast to `dtype` once (float32 by default, the
    reference's state_dict dtype); float64 keeps full precision, e.g. for likelihood evaluation.

    `v_posterior` mixes the posterior variance with β: σ_t² = (1 − v)·β̃_t + v·β_t, where β̃_t is the true
    posterior variance (DDPM sec. 3.2 names the two ends, σ² = β̃ and σ² = β).
    """

    BUFFER_NAMES = (
        "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
        "posterior_mean_coef1", "posterior_mean_coef2",
    )

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    log_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor

    def __init__(self, betas: ArrayLike, v_posterior: float = 0.0, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if isinstance(betas, torch.Tensor):
            betas = betas.detach().cpu().numpy()
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0:
            raise ValueError(f"betas must be a non-empty 1-D array (one β per timestep), got shape {betas.shape}")
        # β_T = 1 (ᾱ_T = 0) is zero terminal SNR (`rescale_zero_terminal_snr`); 1 anywhere else would
        # zero ᾱ before the end, and the posterior of the steps after it would divide by 0.
        valid = np.isfinite(betas) & (betas > 0) & (betas < 1)
        valid[-1] = np.isfinite(betas[-1]) and 0 < betas[-1] <= 1
        if not np.all(valid):
            raise ValueError(f"every beta must lie in the open interval (0, 1) (the last may be 1: zero terminal "
                             f"SNR); got {betas[~valid][:5].tolist()}")
        if not 0.0 <= v_posterior <= 1.0:
            raise ValueError(f"v_posterior mixes two variances and must lie in [0, 1], got {v_posterior}")
        self.num_timesteps = int(betas.shape[0])
        self.v_posterior = float(v_posterior)
        # A plain bool, known even when the buffers live on the meta device (models built without memory).
        self.zero_terminal_snr = bool(betas[-1] == 1.0)

        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas, axis=0)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        # DDPM eq. 7: β̃_t = (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · β_t.
        posterior_variance = ((1 - self.v_posterior) * betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
                              + self.v_posterior * betas)
        # ᾱ_T = 0 makes 1/ᾱ_T infinite: those two entries are +inf (x_0 cannot be read from ε at pure noise).
        with np.errstate(divide="ignore"):
            sqrt_recip_alphas_cumprod = np.sqrt(1.0 / alphas_cumprod)
            sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / alphas_cumprod - 1)
        values = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": sqrt_recip_alphas_cumprod,
            "sqrt_recipm1_alphas_cumprod": sqrt_recipm1_alphas_cumprod,
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, POSTERIOR_VARIANCE_FLOOR)),
            # DDPM eq. 7: μ̃_t = coef1 · x_0 + coef2 · x_t.
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
        }
        for name in self.BUFFER_NAMES:
            self.register_buffer(name, torch.tensor(values[name], dtype=dtype))
        # Outside the buffers, in float64 on the CPU (so they exist for models built on the meta device): σ_t for
        # the σ-space samplers (+inf at ᾱ = 0) and the last √ᾱ (0 under zero terminal SNR).
        self.sigma_table = torch.tensor(sqrt_recipm1_alphas_cumprod, dtype=torch.float64, device="cpu")
        self.final_sqrt_alpha = float(np.sqrt(alphas_cumprod[-1]))

    @classmethod
    def from_config(cls, given_betas: Optional[ArrayLike] = None, beta_schedule: str = "linear",
                    timesteps: int = 1000, linear_start: float = 1e-4, linear_end: float = 2e-2,
                    cosine_s: float = 8e-3, v_posterior: float = 0.0,
                    zero_terminal_snr: bool = False) -> "NoiseSchedule":
        """The schedule the reference's `register_schedule` builds: `given_betas` if set, else `make_beta_schedule`;
        with `zero_terminal_snr`, those β rescaled by `rescale_zero_terminal_snr` (Lin et al. 2024)."""
        if given_betas is not None:
            betas = np.asarray(given_betas, dtype=np.float64)
        else:
            betas = make_beta_schedule(beta_schedule, timesteps, linear_start=linear_start,
                                       linear_end=linear_end, cosine_s=cosine_s)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas, v_posterior=v_posterior)

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(√ᾱ_t, √(1 − ᾱ_t)), each (B,): x_t = α·x_0 + σ·ε (DDPM eq. 4), the form every prediction reads."""
        t = t.to(self.betas.device, torch.long)
        return self.sqrt_alphas_cumprod[t], self.sqrt_one_minus_alphas_cumprod[t]

    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and log-variance of q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I) (DDPM eq. 4)."""
        mean = extract(self.sqrt_alphas_cumprod, t, x0.shape) * x0
        # (√(1−ᾱ))² rather than 1 − ᾱ: both were computed in float64, the latter would cancel in float32.
        variance = extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape) ** 2
        log_variance = extract(self.log_one_minus_alphas_cumprod, t, x0.shape)
        return mean, variance, log_variance

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε, a draw from q(x_t | x_0) (DDPM eq. 4, reparameterised as in eq. 9)."""
        return (extract(self.sqrt_alphas_cumprod, t, x0.shape) * x0
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise)

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor,
                    t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t−1} | x_t, x_0) = N(μ̃_t, β̃_t I) (DDPM eqs. 6-7)."""
        mean = (extract(self.posterior_mean_coef1, t, x_t.shape) * x0
                + extract(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        variance = extract(self.posterior_variance, t, x_t.shape)
        log_variance = extract(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    def extra_repr(self) -> str:
        return f"num_timesteps={self.num_timesteps}, v_posterior={self.v_posterior}"
