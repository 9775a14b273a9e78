"""Exact denoisers for Gaussian-mixture data, and statistics that compare sample sets, for sampler tests.

For data x_0 ~ Σ_k w_k N(μ_k, Σ_k) and x_t = a·x_0 + s·ε (a = √ᾱ_t, s = √(1 − ᾱ_t)), everything the
reverse process needs is closed form: given component k, x_t ~ N(a μ_k, C_k) with C_k = a²Σ_k + s²I, and
  E_k[x_0 | x_t] = μ_k + a Σ_k C_k⁻¹ (x_t − a μ_k)                      (Gaussian conditioning)
  E[x_0 | x_t]   = Σ_k r_k(x_t) E_k[x_0 | x_t],  r_k ∝ w_k N(x_t; a μ_k, C_k)  (posterior responsibilities).
Any noise process's input x = α·x_0 + σ·ε is this with x_t = x/√(α² + σ²) and ᾱ = α²/(α² + σ²).
`ExactModel` wraps this as a ``model_fn(x, time)`` for any process and prediction, so a sampler run with it
has no model error left: what remains is the sampler's own discretisation error, which the statistics measure.
A single Gaussian is the mixture with one component.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cached_property
from typing import Optional

import torch

from ldm.modules.diffusionmodules.denoiser import Prediction, as_prediction
from ldm.modules.diffusionmodules.noise_process import EDM, DiscreteVP, NoiseProcess
from ldm.modules.diffusionmodules.schedule import NoiseSchedule

# Size of the Monte Carlo sample the standard errors and the energy-distance floor are estimated from:
# large enough that their own relative error (~1/√n ≈ 0.3 %) is negligible next to the tolerances.
REFERENCE_SAMPLE_SIZE = 200_000


class GaussianMixture:
    """Σ_k w_k N(μ_k, Σ_k) in d dimensions (float64): weights (K,), means (K, d), covariances (K, d, d)."""

    def __init__(self, weights: Sequence[float], means: Sequence[Sequence[float]],
                 covariances: Sequence[Sequence[Sequence[float]]]) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.covariances = torch.as_tensor(covariances, dtype=torch.float64)
        k, d = self.means.shape
        if self.weights.shape != (k,) or self.covariances.shape != (k, d, d):
            raise ValueError(f"need weights (K,), means (K, d), covariances (K, d, d); got "
                             f"{tuple(self.weights.shape)}, {tuple(self.means.shape)}, {tuple(self.covariances.shape)}")
        if (self.weights <= 0).any() or not math.isclose(float(self.weights.sum()), 1.0, abs_tol=1e-9):
            raise ValueError(f"weights must be positive and sum to 1, got {self.weights.tolist()}")
        self.cholesky = torch.linalg.cholesky(self.covariances)  # raises if a covariance is not positive definite

    @classmethod
    def gaussian(cls, mean: Sequence[float], covariance: Sequence[Sequence[float]]) -> "GaussianMixture":
        """The single Gaussian N(mean, covariance)."""
        return cls([1.0], [mean], [covariance])

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def mean(self) -> torch.Tensor:
        return self.weights @ self.means

    @property
    def covariance(self) -> torch.Tensor:
        """Law of total covariance: Σ_k w_k (Σ_k + μ_k μ_kᵀ) − μ μᵀ."""
        second_moment = torch.einsum("k,kij->ij", self.weights,
                                     self.covariances + self.means[:, :, None] * self.means[:, None, :])
        return second_moment - torch.outer(self.mean, self.mean)

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """n independent draws, shape (n, d)."""
        component = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[component] + torch.einsum("nij,nj->ni", self.cholesky[component], z)

    def posterior_mean(self, x_t: torch.Tensor, alpha_cumprod: torch.Tensor) -> torch.Tensor:
        """E[x_0 | x_t] for x_t (B, d) drawn at ᾱ = `alpha_cumprod` (B,); float64."""
        x_t = x_t.to(torch.float64)
        alpha_cumprod = alpha_cumprod.to(torch.float64)
        if bool((alpha_cumprod == alpha_cumprod[0]).all()):  # how samplers call it: one timestep per batch
            return self._posterior_mean_at(x_t, float(alpha_cumprod[0]))
        result = torch.empty_like(x_t)
        for alpha in alpha_cumprod.unique():
            rows = alpha_cumprod == alpha
            result[rows] = self._posterior_mean_at(x_t[rows], float(alpha))
        return result

    def denoise(self, x_sigma: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """E[x_0 | x_σ] for x_σ = x_0 + σ·ε (B, d), σ (B,): the exact continuous-σ denoiser, in x_σ's dtype.
        (x_σ is x_t/√ᾱ with ᾱ = 1/(1 + σ²).)"""
        alpha_cumprod = 1 / (1 + sigma.to(torch.float64) ** 2)
        return self.posterior_mean(x_sigma * alpha_cumprod.sqrt()[:, None], alpha_cumprod).to(x_sigma.dtype)

    def _posterior_mean_at(self, x_t: torch.Tensor, alpha_cumprod: float) -> torch.Tensor:
        a = math.sqrt(alpha_cumprod)
        eye = torch.eye(self.dim, dtype=torch.float64)
        chol = torch.linalg.cholesky(a ** 2 * self.covariances + (1 - a ** 2) * eye)  # of C_k
        log_dets = 2 * torch.diagonal(chol, dim1=-2, dim2=-1).log().sum(-1)
        log_resp, component_means = [], []
        # A loop over the few components keeps every product a plain (B, d) @ (d, d) matmul, the fast path.
        for weight, mean, covariance, factor, log_det in zip(self.weights, self.means, self.covariances, chol,
                                                             log_dets):
            residual = x_t - a * mean  # x_t − a μ_k
            solved = residual @ torch.cholesky_inverse(factor)  # C_k⁻¹ (x_t − a μ_k); C_k is symmetric
            log_resp.append(weight.log() - 0.5 * (log_det + (residual * solved).sum(-1)))
            component_means.append(mean + a * solved @ covariance)  # Σ_k is symmetric
        resp = torch.softmax(torch.stack(log_resp), dim=0)  # (K, B)
        return (resp[:, :, None] * torch.stack(component_means)).sum(0)

    def most_likely_component(self, x0: torch.Tensor) -> torch.Tensor:
        """argmax_k w_k N(x0; μ_k, Σ_k) for each row of x0 (N, d): which mode a sample landed in."""
        return self.posterior_component_log_probs(x0.to(torch.float64)).argmax(dim=1)

    def posterior_component_log_probs(self, x0: torch.Tensor) -> torch.Tensor:
        """log w_k + log N(x0; μ_k, Σ_k) up to a shared constant, (N, K)."""
        residual = x0[:, None, :] - self.means
        solved = torch.cholesky_solve(residual[..., None], self.cholesky.expand(x0.shape[0], -1, -1, -1))[..., 0]
        log_det = 2 * torch.diagonal(self.cholesky, dim1=-2, dim2=-1).log().sum(-1)
        return self.weights.log() - 0.5 * (log_det + (residual * solved).sum(-1))

    def noised(self, alpha_cumprod: float) -> "GaussianMixture":
        """The law q(x_t) of x_t = √ᾱ x_0 + √(1 − ᾱ) ε at ᾱ = `alpha_cumprod` (DDPM eq. 4): again a mixture."""
        a = math.sqrt(alpha_cumprod)
        eye = torch.eye(self.dim, dtype=torch.float64)
        return GaussianMixture(self.weights, a * self.means, a ** 2 * self.covariances + (1 - a ** 2) * eye)

    @cached_property
    def reference_sample(self) -> torch.Tensor:
        """A large fixed sample for Monte Carlo estimates of standard errors and noise floors."""
        return self.sample(REFERENCE_SAMPLE_SIZE, torch.Generator().manual_seed(12345))


class ExactModel:
    """``model_fn(x, time) -> output`` of the Bayes-optimal network for `data` under a noise process.

    `process` is a `NoiseProcess` or a `NoiseSchedule` (its discrete VP process); `time` is what the process
    gives the network (`model_time`). The output is E[F | x] for the prediction F (ε, x_0, v, flow, EDM):
    each is linear in x_0 given x, so it is `output_from_x0` of the posterior mean. x may have any shape
    (B, d, ...) whose trailing dims flatten to d, e.g. (B, d, 1, 1) for samplers that expect images.
    Computed in float64, returned in x's dtype. `calls` counts evaluations (network function evaluations).
    """

    def __init__(self, data: GaussianMixture, process, parameterization) -> None:
        self.data = data
        self.process: NoiseProcess = DiscreteVP(process) if isinstance(process, NoiseSchedule) else process
        self.prediction: Prediction = as_prediction(parameterization)
        self.calls = 0

    def level_of_time(self, time: torch.Tensor) -> torch.Tensor:
        """The process's level from the network's time input (the inverse of `model_time`)."""
        if self.process.discrete:
            if time.dtype != torch.long:
                raise TypeError(f"the discrete process gives integer timesteps; got time of dtype {time.dtype}")
            return time
        if isinstance(self.process, EDM):
            return (4 * time.double()).exp()
        return time.double() / self.process.time_scale

    def __call__(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        if flat.shape[1] != self.data.dim:
            raise ValueError(f"x of shape {tuple(x.shape)} does not flatten to the data's {self.data.dim} dims")
        self.calls += 1
        alpha, sigma = (c.to(torch.float64) for c in self.process.coefficients(self.level_of_time(time)))
        norm = (alpha ** 2 + sigma ** 2).sqrt()
        x0 = self.data.posterior_mean(flat / norm[:, None], (alpha / norm) ** 2)
        return self.prediction.output_from_x0(x0, flat, alpha, sigma).to(x.dtype).reshape(x.shape)


# ---------------------------------------------------------------------------------------------- statistics

def moment_z_scores(samples: torch.Tensor, data: GaussianMixture) -> dict[str, torch.Tensor]:
    """Errors of the sample mean and covariance of `samples` (N, d), in units of their standard errors.

    The standard error of the mean of coordinate i is sd(x_i)/√N; that of covariance entry (i, j) is
    sd((x_i − μ_i)(x_j − μ_j))/√N, both taken from the true distribution (its reference sample), so a
    broken sampler cannot widen its own tolerance. For a correct sampler each z is ≈ N(0, 1).
    Returns {"mean": (d,), "covariance": (d(d+1)/2,) upper-triangle entries}.
    """
    samples = samples.reshape(samples.shape[0], -1).to(torch.float64)
    n = samples.shape[0]
    mean, cov = data.mean, data.covariance
    reference = data.reference_sample - mean
    rows, cols = torch.triu_indices(data.dim, data.dim)
    mean_se = reference.std(dim=0) / math.sqrt(n)
    cov_se = (reference[:, rows] * reference[:, cols]).std(dim=0) / math.sqrt(n)
    sample_cov = torch.cov(samples.T).reshape(data.dim, data.dim)
    return {"mean": (samples.mean(dim=0) - mean) / mean_se,
            "covariance": (sample_cov[rows, cols] - cov[rows, cols]) / cov_se}


def component_fraction_z_scores(samples: torch.Tensor, data: GaussianMixture) -> torch.Tensor:
    """(fraction of samples in mode k − w_k) / √(w_k(1 − w_k)/N) for each component: the mixture weights
    a sampler recovered, as binomial z-scores. Modes are assigned by `most_likely_component`, exact for
    components separated by many standard deviations (the misassigned mass is then negligible)."""
    samples = samples.reshape(samples.shape[0], -1)
    n = samples.shape[0]
    fractions = torch.bincount(data.most_likely_component(samples), minlength=len(data.weights)) / n
    return (fractions - data.weights) / (data.weights * (1 - data.weights) / n).sqrt()


def _mean_distance(x: torch.Tensor, y: torch.Tensor, chunk: int = 2048) -> float:
    """Mean Euclidean distance over all len(x)·len(y) pairs, in chunks to bound memory."""
    total = sum(float(torch.cdist(part, y).sum(dtype=torch.float64)) for part in x.split(chunk))
    return total / (x.shape[0] * y.shape[0])


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Székely's energy distance 2E|X − Y| − E|X − X'| − E|Y − Y'| between sample sets x (n, d) and y (m, d).

    The V-statistic (the within-set means include the zero self-distances), so it is never below 0 and
    estimates the population distance (0 iff the distributions are equal) plus the floor of
    `energy_distance_noise_floor`.
    """
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    y = y.reshape(y.shape[0], -1).to(torch.float64)
    return 2 * _mean_distance(x, y) - _mean_distance(x, x) - _mean_distance(y, y)


def energy_distance_noise_floor(data: GaussianMixture, n: int, m: int) -> float:
    """E[energy_distance(X, Y)] for independent true sample sets of sizes n and m: δ·(1/n + 1/m), δ = E|X − X'|.

    Each within-set mean has n zero self-distances among its n² pairs, so its expectation is (1 − 1/n)·δ,
    while E|X − Y| = δ; 2δ − (1 − 1/n)δ − (1 − 1/m)δ = δ(1/n + 1/m). δ is estimated from the reference sample.
    """
    reference = data.reference_sample
    half = reference.shape[0] // 2
    delta = float((reference[:half] - reference[half:2 * half]).norm(dim=1).mean())
    return delta * (1 / n + 1 / m)


class ExactDiffusionModel:
    """The part of `LatentDiffusion` that DDIMSampler/PLMSSampler use, around an `ExactModel`:
    `apply_model(x, t, cond)`, `schedule`, `process`, `prediction`, `num_timesteps` and `device`."""

    def __init__(self, model_fn: ExactModel) -> None:
        self.model_fn = model_fn
        self.process = model_fn.process
        self.schedule = model_fn.process.schedule
        self.prediction = model_fn.prediction
        self.num_timesteps = self.schedule.num_timesteps
        self.device = self.schedule.alphas_cumprod.device

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: object = None) -> torch.Tensor:
        if cond is not None:
            raise ValueError("the exact model is unconditional; pass conditioning=None")
        return self.model_fn(x_noisy, t)
