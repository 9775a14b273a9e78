"""The denoiser: what the network predicts, how x̂_0 is read from its output, and D(x_σ, σ) for the samplers.

Every noise process (`noise_process.py`) gives the network an input x = α·x_0 + σ·ε, with α and σ per
example. A *prediction* names what the network output F is trained to equal; x̂_0 is then linear in the
input and the output, x̂_0 = c_skip·x + c_out·F (the preconditioning of EDM, Karras et al. 2022, Table 1,
written on the network's input rather than on x/α):

  ``eps``   F ≈ ε               c_skip = 1/α,             c_out = −σ/α           (DDPM eq. 15)
  ``x0``    F ≈ x_0             c_skip = 0,               c_out = 1
  ``v``     F ≈ αε − σx_0       c_skip = α/(α² + σ²),     c_out = −σ/(α² + σ²)   (Salimans & Ho 2022, sec. 4)
  ``flow``  F ≈ ε − x_0         c_skip = 1/(α + σ),       c_out = −σ/(α + σ)     (the velocity of rectified
            flow, x_t = (1 − t)x_0 + tε: Liu et al. 2023, Lipman et al. 2023)
  ``edm``   F ≈ (x_0 − c_skip·x)/c_out with s = σ/α, c_skip = σ_d²/(α(s² + σ_d²)), c_out = sσ_d/√(s² + σ_d²)
            (EDM Table 1: unit-variance target at every noise level for data of std σ_d)

The training target is (x_0 − c_skip·x)/c_out, written in closed form for each. The squared error of F is
the x_0 error divided by c_out², which is what loss weightings (`loss_weighting.py`) convert through.
"""
from __future__ import annotations

from typing import Callable, Union

import torch

from ldm.modules.diffusionmodules.noise_process import NoiseProcess, ODEClock

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def per_example(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (B,) tensor reshaped to (B, 1, ..., 1) to broadcast against x (a scalar passes through)."""
    value = torch.as_tensor(value, device=x.device)
    return value if value.dim() == 0 else value.reshape(x.shape[0], *((1,) * (x.dim() - 1)))


class Prediction:
    """What the network predicts; subclasses give `scalings` and the closed-form `target`."""

    name = ""

    def scalings(self, alpha: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_skip, c_out) with x̂_0 = c_skip·x + c_out·F for the input x = α·x_0 + σ·ε."""
        raise NotImplementedError

    def target(self, x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor,
               sigma: torch.Tensor) -> torch.Tensor:
        """What F should be for x = α·x_0 + σ·noise."""
        raise NotImplementedError

    def x0(self, output: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x̂_0 from the network's `output` at input x; α, σ of shape (B,) or scalars."""
        c_skip, c_out = self.scalings(per_example(alpha, x), per_example(sigma, x))
        return c_skip * x + c_out * output

    def eps(self, output: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """ε̂ = (x − α·x̂_0)/σ, the noise the output implies (σ > 0)."""
        alpha, sigma = per_example(alpha, x), per_example(sigma, x)
        return (x - alpha * self.x0(output, x, alpha, sigma)) / sigma

    def output_from_x0(self, x0: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor,
                       sigma: torch.Tensor) -> torch.Tensor:
        """The output that gives x̂_0 = `x0` at input x: the inverse of `x0`."""
        c_skip, c_out = self.scalings(per_example(alpha, x), per_example(sigma, x))
        return (x0 - c_skip * x) / c_out

    def check_alpha(self, alpha_min: float) -> None:
        """Refuse a process whose input reaches α = 0 when this prediction cannot read x_0 there."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class EpsPrediction(Prediction):
    name = "eps"

    def scalings(self, alpha, sigma):
        return 1.0 / alpha, -sigma / alpha

    def target(self, x0, noise, alpha, sigma):
        return noise

    def eps(self, output, x, alpha, sigma):
        return output

    def check_alpha(self, alpha_min: float) -> None:
        # Zero terminal SNR (Lin et al. 2024, sec. 3.2): at α = 0 the input is ε itself, an ε-model's output
        # says nothing about x_0, and x̂_0 = (x − σε̂)/α divides by 0.
        if alpha_min <= 0:
            raise ValueError("this noise process reaches pure noise (α = 0, zero terminal SNR), where ε-prediction "
                             "cannot recover x_0: use parameterization 'v', 'x0' or 'flow'")


class X0Prediction(Prediction):
    name = "x0"

    def scalings(self, alpha, sigma):
        return torch.zeros_like(alpha), torch.ones_like(sigma)

    def target(self, x0, noise, alpha, sigma):
        return x0

    def x0(self, output, x, alpha, sigma):
        return output


class VPrediction(Prediction):
    name = "v"

    def scalings(self, alpha, sigma):
        norm = alpha ** 2 + sigma ** 2
        return alpha / norm, -sigma / norm

    def target(self, x0, noise, alpha, sigma):
        return per_example(alpha, x0) * noise - per_example(sigma, x0) * x0


class FlowPrediction(Prediction):
    name = "flow"

    def scalings(self, alpha, sigma):
        norm = alpha + sigma
        return 1.0 / norm, -sigma / norm

    def target(self, x0, noise, alpha, sigma):
        return noise - x0


class EDMPrediction(Prediction):
    """EDM's F-prediction (Table 1) for data of standard deviation `sigma_data` (0.5 in EDM for pixels; 1 for
    latents scaled to unit variance)."""

    name = "edm"

    def __init__(self, sigma_data: float = 1.0) -> None:
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        self.sigma_data = float(sigma_data)

    def scalings(self, alpha, sigma):
        s = sigma / alpha
        norm = s ** 2 + self.sigma_data ** 2
        return self.sigma_data ** 2 / (norm * alpha), s * self.sigma_data / norm.sqrt()

    def target(self, x0, noise, alpha, sigma):
        alpha, sigma = per_example(alpha, x0), per_example(sigma, x0)
        c_skip, c_out = self.scalings(alpha, sigma)
        return (x0 - c_skip * (alpha * x0 + sigma * noise)) / c_out

    def check_alpha(self, alpha_min: float) -> None:
        if alpha_min <= 0:
            raise ValueError("EDM's preconditioning needs a finite noise level σ/α; this process reaches α = 0")

    def __repr__(self) -> str:
        return f"EDMPrediction(sigma_data={self.sigma_data})"


PREDICTIONS = {cls.name: cls for cls in (EpsPrediction, X0Prediction, VPrediction, FlowPrediction, EDMPrediction)}


def make_prediction(name: str, **params: float) -> Prediction:
    """The prediction called `name` (the config's `parameterization`)."""
    if name not in PREDICTIONS:
        raise ValueError(f"unknown parameterization {name!r}; choose one of {', '.join(map(repr, PREDICTIONS))}")
    return PREDICTIONS[name](**params)


def as_prediction(prediction: Union[str, Prediction]) -> Prediction:
    """A `Prediction`, given one or its name."""
    return prediction if isinstance(prediction, Prediction) else make_prediction(prediction)


class Denoiser:
    """D(x_σ, σ) ≈ E[x_0 | x_σ] for every sampler (`samplers.py`), from a network `model_fn(x, time)`.

    x_σ = x_0 + σ·ε is the variance-exploding view every process shares (EDM eq. 1 with s(t) = 1): the
    process maps σ to its own noise level and to the network's input x = c_in·x_σ and time input c_noise; the
    prediction reads x̂_0. On the discrete table the level is the nearest trained timestep t, whose σ is then used
    (k-diffusion's `DiscreteEpsDDPMDenoiser`/`CompVisDenoiser`), and the network is told t itself: at a σ of the
    table, D sees exactly the input and timestep of the reference's DDIM, PLMS and DDPM loops.
    """

    def __init__(self, model_fn: ModelFn, process: NoiseProcess, prediction: Prediction) -> None:
        self.model_fn = model_fn
        self.process = process
        self.prediction = prediction

    @property
    def sigma_min(self) -> float:
        return self.process.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.process.sigma_max

    def input_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        """c_in(σ): the network's input is c_in·x_σ (√ᾱ_t on the discrete table, where x_σ = x_t/√ᾱ_t)."""
        return self.process.c_in(sigma)

    def at_pure_noise(self, sigma: torch.Tensor) -> bool:
        """Whether σ is the process's finite stand-in for σ = ∞, where its input is ε (zero terminal SNR)."""
        return self.process.alpha_min == 0 and float(sigma) >= self.sigma_max

    def ode_clock(self, sigma: torch.Tensor) -> ODEClock:
        """The time and state scale second-order samplers step along (`NoiseProcess.ode_clock`)."""
        return self.process.ode_clock(sigma)

    def __call__(self, x_sigma: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if sigma.dim() != 1 or sigma.shape[0] != x_sigma.shape[0]:
            raise ValueError(f"sigma must have shape (batch,) = ({x_sigma.shape[0]},), got {tuple(sigma.shape)}; "
                             "pass sigma * x.new_ones(x.shape[0]) for one noise level")
        level, sigma = self.process.level_of_sigma(sigma)
        c_in = self.process.c_in(sigma).to(x_sigma.dtype)
        x = x_sigma * per_example(c_in, x_sigma)
        output = self.model_fn(x, self.process.model_time(level))
        return self.prediction.x0(output, x, c_in, sigma.to(x_sigma.dtype) * c_in)

