"""Samplers: each a short function of (denoiser, x, sigmas), the registry the scripts and benches read, and the
one way a run is started, kept on known latents and ended (`start_state`, `run_sampler`).

Every sampler here works in the variance-exploding view x_σ = x_0 + σ·ε that all noise processes share
(`ldm.modules.diffusionmodules.noise_process`), with a denoiser D(x_σ, σ) ≈ E[x_0 | x_σ]
(`ldm.modules.diffusionmodules.denoiser.Denoiser`), in the style of k-diffusion (Karras et al. 2022, EDM).
The reference's samplers are among them: ``ddim`` (DDIM eq. 12, with η), ``plms`` (Liu et al. 2022) and ``ddpm``
(DDPM Algorithm 2) step over the trained timesteps of the discrete table, through the same `Denoiser`, which
snaps each σ to its trained level as k-diffusion's `CompVisDenoiser` does. Their noise levels come with their
registry entry (`SamplerInfo.levels`); the others take any σ spacing (`spacing.make_sigmas`) on any process.

Signature: ``sampler(denoiser, x, sigmas, *, generator=None, eta=..., callback=None, disable=False)``; it returns
x_σ at sigmas[-1]. `callback(i, x, sigma_i, denoised)` sees the state before step i and the x̂_0 the step uses
(the denoiser's, or for PLMS the one its multistep slope implies). Samplers that take no noise ignore
`generator` and `eta`; each stochastic one has its own default η (0 for DDIM, 1 for the ancestral samplers).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

from ldm.models.diffusion.noise import Generators, randn
from ldm.models.diffusion.spacing import ddim_levels, ddpm_levels, make_ddim_timesteps, make_sigmas
from ldm.modules.diffusionmodules.noise_process import NoiseProcess, ODEClock, sigma_clock

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# callback(i, x, sigma_i, denoised): the state x_σ before step i, its σ and the x̂_0 the step uses.
Callback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]
SamplerFn = Callable[..., torch.Tensor]
# Noise levels of a sampler that steps over the trained timesteps: (process, steps) -> σ, descending.
Levels = Callable[[NoiseProcess, int], torch.Tensor]


@dataclass(frozen=True)
class SamplerInfo:
    """A registered sampler and what the code around it needs to know about it.

    `evals(steps, num_timesteps)` is the number of model evaluations a run of `steps` steps costs on a model of
    `num_timesteps` training timesteps (with guidance, each is one batched pass over both halves). `stochastic`:
    it draws fresh noise at its default η. `starts_midway`: it can run the tail of its noise levels from a noised
    state (img2img, interpolation). `levels`: its own noise levels over the trained timesteps, for the samplers
    that need the discrete table (`needs_discrete_levels`); None for those that take any σ spacing.
    """

    name: str
    fn: SamplerFn
    description: str
    evals: Callable[[int, int], int]
    stochastic: bool = False
    starts_midway: bool = True
    levels: Optional[Levels] = None

    @property
    def needs_discrete_levels(self) -> bool:
        return self.levels is not None


SAMPLERS: dict[str, SamplerInfo] = {}


def _one_per_step(steps: int, num_timesteps: int) -> int:
    return steps


def register(name: str, description: str, evals: Callable[[int, int], int] = _one_per_step, *,
             stochastic: bool = False, starts_midway: bool = True,
             levels: Optional[Levels] = None) -> Callable[[SamplerFn], SamplerFn]:
    """Add a sampler function to `SAMPLERS` under `name` (its fields: `SamplerInfo`)."""
    def add(fn: SamplerFn) -> SamplerFn:
        SAMPLERS[name] = SamplerInfo(name, fn, description, evals, stochastic=stochastic,
                                     starts_midway=starts_midway, levels=levels)
        return fn
    return add


def get_sampler(name: str) -> SamplerInfo:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: use one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def sampler_help() -> str:
    """One line per sampler for the scripts' --help."""
    return "; ".join(f"{info.name}: {info.description}" for info in SAMPLERS.values())


def sampler_sigmas(info: SamplerInfo, process: NoiseProcess, steps: int, spacing: Optional[str] = None,
                   device: Optional[torch.device] = None) -> torch.Tensor:
    """The noise levels a `steps`-step run of `info` visits on `process`: its own trained levels, or `spacing`."""
    if not info.needs_discrete_levels:
        return make_sigmas(spacing, steps, process, device=device)
    if not process.discrete:
        others = ", ".join(name for name, entry in SAMPLERS.items() if not entry.needs_discrete_levels)
        raise ValueError(f"the {info.name} sampler steps over the discrete DDPM table; this model's noise process is "
                         f"{process.name}: use {others}")
    if spacing is not None:
        raise ValueError(f"a sigma spacing ({spacing}) applies to the σ-space samplers, not to {info.name}")
    return info.levels(process, steps).to(device)


def start_state(info: SamplerInfo, denoiser: Any, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The state x_σ a run starting at `sigma` begins from, given the standard normal `noise`.

    The samplers over the trained levels take `noise` as x_T, the network's input at that level (DDPM, DDIM):
    x_σ = x_T / c_in(σ). The others start from k-diffusion's noise·σ, the data's variance neglected next to σ².
    """
    return noise / denoiser.input_scale(sigma) if info.needs_discrete_levels else noise * sigma


def run_sampler(info: SamplerInfo, denoiser: Any, x: torch.Tensor, sigmas: torch.Tensor, *,
                known: Optional[torch.Tensor] = None, known_mask: Optional[torch.Tensor] = None,
                paste_known: bool = True, **options: Any) -> torch.Tensor:
    """`info`'s sampler from the state x_σ at sigmas[0], returned in the model's space: x_σ itself when the run ends
    at σ = 0, else the network's input there, c_in·x_σ (DDIM's last step lands on ᾱ_0, the reference's x at t = 0).

    Known latents (inpainting with any model; `known_mask` is 1 where known) are kept one way for every sampler:
    the start holds them plus the run's noise there, the denoiser returns them there (`keep_known`), so that region
    follows known + σ·noise down the levels, and the result is `known` there exactly unless `paste_known` is False.
    """
    if (known is None) != (known_mask is None):
        raise ValueError("keeping known latents needs both `known` and `known_mask` (1 = keep)")
    if known is not None:
        denoiser = keep_known(denoiser, known, known_mask)
        x = x + known_mask * known
    z = info.fn(denoiser, x, sigmas, **options)
    if sigmas[-1] > 0:
        z = z * denoiser.input_scale(sigmas[-1])
    if known is not None and paste_known:
        z = known_mask * known + (1.0 - known_mask) * z
    return z


class EditedDenoiser:
    """A denoiser whose x̂_0 goes through `edit` (known latents, clipping, thresholding), so every sampler sees the
    edited x̂_0 and the slope (x − D)/σ it implies; everything else (its process, clock, scales) is the wrapped one's."""

    def __init__(self, denoiser: Denoiser, edit: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.denoiser, self.edit = denoiser, edit

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.edit(self.denoiser(x, sigma))

    def __getattr__(self, name: str) -> Any:
        if name in ("denoiser", "edit"):  # not set yet (copy, unpickling)
            raise AttributeError(name)
        return getattr(self.denoiser, name)


def keep_known(denoiser: Denoiser, x0: torch.Tensor, mask: torch.Tensor) -> Denoiser:
    """Inpainting for any sampler: the denoiser's x̂_0 is x0 wherever **mask == 1 (known)**.

    The samplers step along d = (x − D)/σ; with D = x0 on the known region, x − x0 there shrinks in proportion
    to σ (it stays the known latents plus noise of the current level, as RePaint's and the reference's
    re-noising of the known region aims for), and equals x0 exactly when σ reaches 0.
    """
    if x0.shape[1:] != mask.shape[1:] and mask.shape[1] != 1:
        raise ValueError(f"mask {tuple(mask.shape)} does not fit the known latents {tuple(x0.shape)}")
    return EditedDenoiser(denoiser, lambda denoised: mask * x0 + (1.0 - mask) * denoised)


def ode_clock_of(denoiser: Denoiser) -> Callable[[torch.Tensor], ODEClock]:
    """The denoiser's `ode_clock` (its process's); a plain function D(x, σ) steps along σ (`sigma_clock`)."""
    return getattr(denoiser, "ode_clock", sigma_clock)


def check_sigmas(sigmas: torch.Tensor, repeats: bool = False) -> None:
    """A 1-D grid of at least 2 non-negative levels, strictly decreasing (non-increasing with `repeats`: the
    reference's ``quad`` timesteps repeat for many steps, and such a step leaves x unchanged)."""
    if sigmas.dim() != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"sigmas must be a 1-D tensor of at least 2 noise levels, got shape {tuple(sigmas.shape)}")
    rising = sigmas[1:] > sigmas[:-1] if repeats else sigmas[1:] >= sigmas[:-1]
    if bool(rising.any()) or bool((sigmas < 0).any()):
        raise ValueError("sigmas must be non-negative and strictly decreasing (see ldm.models.diffusion.spacing)")


def _steps(sigmas: torch.Tensor, desc: str, disable: bool, repeats: bool = False) -> tqdm:
    check_sigmas(sigmas, repeats)
    return tqdm(range(len(sigmas) - 1), desc=desc, disable=disable, leave=False)


def _evaluate(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, i: int,
              callback: Optional[Callback]) -> torch.Tensor:
    """D(x, σ_i) for the whole batch, reported to `callback` with the state it was evaluated at."""
    denoised = denoiser(x, sigmas[i] * x.new_ones(x.shape[0]))
    if callback is not None:
        callback(i, x, sigmas[i], denoised)
    return denoised


def _noise(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    return randn(x.shape, generator, device=x.device, dtype=x.dtype)


def to_derivative(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """dx/dσ of the probability-flow ODE, (x − D(x, σ))/σ (EDM eq. 3 with σ(t) = t, s(t) = 1); on the discrete
    table this is the ε̂ the network implies (x_σ = x_t/√ᾱ_t, σ = √(1 − ᾱ_t)/√ᾱ_t)."""
    return (x - denoised) / sigma


def ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor,
                   eta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ_down, σ_up) for an ancestral step from σ_from to σ_to: a deterministic move to σ_down, then fresh
    noise of std σ_up, with σ_down² + σ_up² = σ_to². σ_up² = η²·σ_to²(σ_from² − σ_to²)/σ_from² is DDIM's η-noise
    (eq. 16) in σ units, and at η = 1 between consecutive timesteps DDPM's posterior variance β̃_t; η = 0 is the
    deterministic ODE step."""
    if not eta:
        return sigma_to, torch.zeros_like(sigma_to)
    # In float64: between close levels (DDPM's consecutive timesteps) σ_from² − σ_to² and σ_to² − σ_up² cancel.
    dtype, sigma_from, sigma_to = sigma_to.dtype, sigma_from.double(), sigma_to.double()
    posterior_variance = sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2
    sigma_up = torch.minimum(sigma_to, eta * posterior_variance ** 0.5)
    return (sigma_to ** 2 - sigma_up ** 2).to(dtype) ** 0.5, sigma_up.to(dtype)


def _heun_evals(steps: int, num_timesteps: int) -> int:
    return 2 * steps - 1  # the step to σ = 0 is Euler


# ---------------------------------------------------------------------------------------------- first order


def _ancestral(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, eta: float,
               noise: Callable[[torch.Tensor], torch.Tensor], callback: Optional[Callback], disable: bool,
               desc: str) -> torch.Tensor:
    """Euler steps to σ_down along (x − D)/σ, then fresh noise of std σ_up (`ancestral_step`); a step to σ = 0
    lands on D itself, without noise. The one loop of euler, euler_a, ddim and ddpm: in σ, DDIM eq. 12 is exactly
    this step (Karras et al. 2022, sec. 4), with η-noise σ_up, and DDPM's ancestral step is it at η = 1 between
    consecutive levels."""
    for i in _steps(sigmas, desc, disable, repeats=True):
        denoised = _evaluate(denoiser, x, sigmas, i, callback)
        if sigmas[i + 1] == 0:
            x = denoised  # x + (x − D)/σ·(0 − σ), without its rounding
            continue
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + to_derivative(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if eta > 0:
            x = x + noise(x) * sigma_up
    return x


@register("euler", "Euler steps of the probability-flow ODE (EDM Alg. 1 without its correction; ddim at eta 0)")
@torch.no_grad()
def sample_euler(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Optional[Callback] = None,
                 disable: bool = False, **_: object) -> torch.Tensor:
    return _ancestral(denoiser, x, sigmas, 0.0, lambda _: None, callback, disable, "Euler")


@register("euler_a", "Euler ancestral: Euler to σ_down, then fresh noise of std σ_up (eta scales it)",
          stochastic=True)
@torch.no_grad()
def sample_euler_ancestral(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
                           generator: Generators = None, eta: float = 1.0,
                           callback: Optional[Callback] = None, disable: bool = False) -> torch.Tensor:
    """An Euler–Maruyama discretisation of the reverse SDE (k-diffusion's Euler ancestral). No noise is added
    on the step to σ = 0."""
    return _ancestral(denoiser, x, sigmas, eta, lambda x: _noise(x, generator), callback, disable, "Euler ancestral")


# ---------------------------------------------------------------------------------------------- second order


@register("heun", "Heun's 2nd-order method (EDM Algorithm 1, S_churn = 0); 2 evaluations a step", _heun_evals)
@torch.no_grad()
def sample_heun(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Optional[Callback] = None,
                disable: bool = False, **_: object) -> torch.Tensor:
    """An Euler predictor, then the trapezoid of the two slopes, along the process's own time and scale
    (`ODEClock`: σ itself on the discrete table and EDM, t on the continuous processes); the step to σ = 0 is
    plain Euler (the slope there would divide by 0), which lands on D whatever the clock."""
    ones = x.new_ones(x.shape[0])
    clock = ode_clock_of(denoiser)
    for i in _steps(sigmas, "Heun", disable):
        denoised = _evaluate(denoiser, x, sigmas, i, callback)
        if sigmas[i + 1] == 0:
            x = x + to_derivative(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
            continue
        here, there = clock(sigmas[i]), clock(sigmas[i + 1])
        dt = there.time - here.time
        y = here.scale * x
        slope = here.slope(y, denoised)
        y_euler = y + slope * dt
        slope_next = there.slope(y_euler, denoiser(y_euler / there.scale, sigmas[i + 1] * ones))
        x = (y + (slope + slope_next) / 2 * dt) / there.scale
    return x


@register("dpm2", "DPM-Solver-2 as k-diffusion's DPM2: a midpoint step in log σ; 2 evaluations a step", _heun_evals)
@torch.no_grad()
def sample_dpm2(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Optional[Callback] = None,
                disable: bool = False, **_: object) -> torch.Tensor:
    """The slope at the geometric midpoint σ_mid = √(σ_i σ_{i+1}) (reached by an Euler half step) drives the
    whole step (Lu et al. 2022, "DPM-Solver", Algorithm 1 at r = 1/2, in k-diffusion's σ form); the step to
    σ = 0 is Euler."""
    ones = x.new_ones(x.shape[0])
    for i in _steps(sigmas, "DPM2", disable):
        denoised = _evaluate(denoiser, x, sigmas, i, callback)
        d = to_derivative(x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            sigma_mid = (sigmas[i] * sigmas[i + 1]).sqrt()
            x_mid = x + d * (sigma_mid - sigmas[i])
            d_mid = to_derivative(x_mid, sigma_mid, denoiser(x_mid, sigma_mid * ones))
            x = x + d_mid * (sigmas[i + 1] - sigmas[i])
    return x


# ---------------------------------------------------------------------------------------------- multistep


def lms_coefficients(sigmas: np.ndarray, i: int, order: int) -> list[float]:
    """∫_{σ_i}^{σ_{i+1}} ℓ_j(σ) dσ for the Lagrange basis ℓ_j through σ_i, σ_{i−1}, …, σ_{i−order+1}: the
    weights of the last `order` slopes in a linear multistep (Adams–Bashforth) step. Exact: the basis
    polynomials are integrated in closed form."""
    nodes = [sigmas[i - k] for k in range(order)]
    weights = []
    for j in range(order):
        basis = np.poly1d([1.0])
        for k in range(order):
            if k != j:
                basis *= np.poly1d([1.0, -nodes[k]]) / (nodes[j] - nodes[k])
        integral = basis.integ()
        weights.append(float(integral(sigmas[i + 1]) - integral(sigmas[i])))
    return weights


@register("lms", "linear multistep (Adams–Bashforth in σ, up to 4th order; k-diffusion's LMS)")
@torch.no_grad()
def sample_lms(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Optional[Callback] = None,
               disable: bool = False, order: int = 4, **_: object) -> torch.Tensor:
    """x_{i+1} = x_i + Σ_j c_j d_{i−j}, the slopes of the last `order` steps weighted by the integrals of their
    Lagrange basis over the step (`lms_coefficients`); the order grows from 1 as slopes accumulate."""
    sigmas_np = sigmas.detach().double().cpu().numpy()
    slopes: list[torch.Tensor] = []
    for i in _steps(sigmas, "LMS", disable):
        denoised = _evaluate(denoiser, x, sigmas, i, callback)
        slopes.insert(0, to_derivative(x, sigmas[i], denoised))
        del slopes[order:]
        coefficients = lms_coefficients(sigmas_np, i, len(slopes))
        x = x + sum(c * d for c, d in zip(coefficients, slopes))
    return x


@register("dpmpp_2m", "DPM-Solver++(2M): 2nd-order multistep in log σ (Lu et al. 2022, Algorithm 2)")
@torch.no_grad()
def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
                    callback: Optional[Callback] = None, disable: bool = False, **_: object) -> torch.Tensor:
    """In λ = −log σ, with h = λ_{i+1} − λ_i, the data-prediction ODE's exact solution step is
    x_{i+1} = (σ_{i+1}/σ_i)·x_i − (e^{−h} − 1)·x̂_0 (DPM-Solver++ eq. 9 with α = 1); the multistep variant
    replaces x̂_0 by a linear extrapolation from the previous step's x̂_0, D = (1 + 1/(2r))·x̂_0^i − 1/(2r)·x̂_0^{i−1}
    with r = h_{i−1}/h_i. The first step and the step to σ = 0 are first order (DDIM)."""
    old_denoised: Optional[torch.Tensor] = None
    for i in _steps(sigmas, "DPM-Solver++(2M)", disable):
        denoised = _evaluate(denoiser, x, sigmas, i, callback)
        if sigmas[i + 1] == 0:
            x = denoised  # the limit of the update as σ_{i+1} → 0: ratio 0, −(e^{−∞} − 1) = 1
        else:
            h = math.log(sigmas[i] / sigmas[i + 1])
            if old_denoised is None:
                estimate = denoised
            else:
                r = math.log(sigmas[i - 1] / sigmas[i]) / h
                estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigmas[i + 1] / sigmas[i]) * x - math.expm1(-h) * estimate
        old_denoised = denoised
    return x


@register("dpmpp_2m_sde", "DPM-Solver++(2M) SDE: the 2M update on the reverse SDE, fresh noise each step (eta)",
          stochastic=True)
@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
                        generator: Generators = None, eta: float = 1.0,
                        callback: Optional[Callback] = None, disable: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M) for the SDE (Lu et al. 2022, "DPM-Solver++", sec. 4 and appendix; k-diffusion's
    midpoint form). With h = log(σ_i/σ_{i+1}) and η·h of it given to noise, the first-order exact step is
    x_{i+1} = (σ_{i+1}/σ_i)·e^{−ηh}·x_i + (1 − e^{−(1+η)h})·x̂_0 + σ_{i+1}·√(1 − e^{−2ηh})·z; the second-order
    term adds ½(1 − e^{−(1+η)h})·(x̂_0^i − x̂_0^{i−1})/r with r = h_{i−1}/h. η = 0 is an ODE solver."""
    old_denoised: Optional[torch.Tensor] = None
    h_last: Optional[float] = None
    for i in _steps(sigmas, "DPM-Solver++(2M) SDE", disable):
        denoised = _evaluate(denoiser, x, sigmas, i, callback)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = math.log(sigmas[i] / sigmas[i + 1])
            eta_h = eta * h
            x = (sigmas[i + 1] / sigmas[i]) * math.exp(-eta_h) * x - math.expm1(-h - eta_h) * denoised
            if old_denoised is not None:
                r = h_last / h
                x = x - 0.5 * math.expm1(-h - eta_h) * (1 / r) * (denoised - old_denoised)
            if eta:
                x = x + _noise(x, generator) * sigmas[i + 1] * math.sqrt(-math.expm1(-2 * eta_h))
            h_last = h
        old_denoised = denoised
    return x


@register("dpmpp_3m_sde", "DPM-Solver++(3M) SDE: 3rd-order multistep on the reverse SDE (eta)", stochastic=True)
@torch.no_grad()
def sample_dpmpp_3m_sde(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
                        generator: Generators = None, eta: float = 1.0,
                        callback: Optional[Callback] = None, disable: bool = False) -> torch.Tensor:
    """The exponential-integrator step of `sample_dpmpp_2m_sde` with x̂_0 expanded to second order in λ from
    the last three x̂_0 (first and second divided differences d1, d2), weighted by φ_2(h') = (e^{−h'} − 1)/h' + 1
    and φ_3 = φ_2/h' − ½ with h' = (1 + η)h (Lu et al. 2022, DPM-Solver++(3M); k-diffusion's form)."""
    denoised_1 = denoised_2 = None
    h_1 = h_2 = None
    for i in _steps(sigmas, "DPM-Solver++(3M) SDE", disable):
        denoised = _evaluate(denoiser, x, sigmas, i, callback)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        h = math.log(sigmas[i] / sigmas[i + 1])
        h_eta = h * (eta + 1)
        x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
        phi_2 = math.expm1(-h_eta) / h_eta + 1
        if h_2 is not None:
            r0, r1 = h_1 / h, h_2 / h
            d1_0 = (denoised - denoised_1) / r0
            d1_1 = (denoised_1 - denoised_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_3 = phi_2 / h_eta - 0.5
            x = x + phi_2 * d1 - phi_3 * d2
        elif h_1 is not None:
            x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
        if eta:
            x = x + _noise(x, generator) * sigmas[i + 1] * math.sqrt(-math.expm1(-2 * h * eta))
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


def _unipc_coefficients(rks: list[float], hh: float, order: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(R, b, B(h)) of UniPC's linear system for the data prediction with B(h) = e^{hh} − 1 ("bh2"; Zhao et
    al. 2023, sec. 3.2 and appendix): R[k, j] = r_j^k, b_k = k!·φ_{k+1}(hh)/B(h), where φ_1 = (e^{hh} − 1)/hh
    and φ_{k+1} = (φ_k − 1/k!)/hh."""
    b_h = math.expm1(hh)
    h_phi_k = math.expm1(hh) / hh - 1
    factorial = 1
    rows, b = [], []
    for k in range(1, order + 1):
        rows.append([r ** (k - 1) for r in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return torch.tensor(rows, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), b_h


@register("unipc", "UniPC (bh2): a 2nd-order predictor with a corrector that reuses the next evaluation")
@torch.no_grad()
def sample_unipc(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Optional[Callback] = None,
                 disable: bool = False, order: int = 2, **_: object) -> torch.Tensor:
    """UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework"), data prediction, B(h) = e^h − 1.

    In λ = −log σ with h = λ_{i+1} − λ_i, the predictor UniP-p is the DPM-Solver++ step x_{i+1} =
    (σ_{i+1}/σ_i)·x_i − (e^{−h} − 1)·x̂_0^i − B(h)·Σ_k ρ_k D_k with divided differences D_k = (x̂_0^{i−k} −
    x̂_0^i)/r_k of earlier x̂_0, r_k = (λ_{i−k} − λ_i)/h. The corrector UniC recomputes the step from x_i once
    x̂_0 at the new point is known, adding that point's difference; the evaluation it needs is the next
    step's own, so UniPC costs one evaluation per step. Orders start at 1 and the last steps lower theirs;
    the step to σ = 0 returns x̂_0.
    """
    lambdas = [-math.log(float(s)) if s > 0 else math.inf for s in sigmas]
    history: list[tuple[int, torch.Tensor]] = []  # (step index, x̂_0 there), newest last
    x_prev: Optional[torch.Tensor] = None  # the state the last predictor step started from
    n = len(sigmas) - 1
    for i in _steps(sigmas, "UniPC", disable):
        denoised = _evaluate(denoiser, x, sigmas, i, callback)
        if x_prev is not None:  # UniC: correct the step just taken, now that x̂_0 at its end is known
            x = _unipc_step(x_prev, history, lambdas, sigmas, i, len(history), corrector=denoised)
        history.append((i, denoised))
        del history[:-order]
        if sigmas[i + 1] == 0:
            x = denoised
            break
        step_order = min(len(history), order, n - i)
        x_prev = x
        x = _unipc_step(x, history[-step_order:], lambdas, sigmas, i + 1, step_order)
    return x


def _unipc_step(x: torch.Tensor, history: list[tuple[int, torch.Tensor]], lambdas: list[float],
                sigmas: torch.Tensor, target: int, order: int, corrector: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One UniP step (or, given the x̂_0 at the target, UniC) from the newest point of `history` to `target`."""
    source, m0 = history[-1]
    h = lambdas[target] - lambdas[source]
    hh = -h
    rks, differences = [], []
    for index, m in history[-order:-1][::-1]:
        rk = (lambdas[index] - lambdas[source]) / h
        rks.append(rk)
        differences.append((m - m0) / rk)
    R, b, b_h = _unipc_coefficients([*rks, 1.0], hh, order if corrector is None else len(rks) + 1)
    x_next = (sigmas[target] / sigmas[source]) * x - math.expm1(hh) * m0
    if corrector is None:
        if differences:
            rhos = [0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
            x_next = x_next - b_h * sum(rho * d for rho, d in zip(rhos, differences))
        return x_next
    rhos = [0.5] if not differences else torch.linalg.solve(R, b).tolist()
    correction = sum((rho * d for rho, d in zip(rhos[:-1], differences)), torch.zeros_like(x))
    return x_next - b_h * (correction + rhos[-1] * (corrector - m0))


# ---------------------------------------------------------------------------------------------- the reference's samplers
# They step over the trained timesteps (`levels`), through the same denoiser: on the discrete table it snaps σ to
# the level whose σ it is, so each step sees exactly the network input and timestep the reference's loop does.


def _ddim_evals(steps: int, num_timesteps: int) -> int:
    # The reference's uniform subsequence visits every T // steps timesteps: more than `steps` when steps
    # does not divide T (`make_ddim_timesteps`).
    return len(make_ddim_timesteps("uniform", steps, num_timesteps))


@register("ddim", "DDIM over the DDPM table (eta 0 = deterministic), the reference's DDIMSampler", _ddim_evals,
          levels=ddim_levels)
@torch.no_grad()
def sample_ddim(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generators = None,
                eta: float = 0.0, noise: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                callback: Optional[Callback] = None, disable: bool = False) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12): x_{t−1} = √ᾱ_{t−1}·x̂_0 + √(1 − ᾱ_{t−1} − s²)·ε̂ + s·z with s = η·(eq. 16).
    Divided by √ᾱ_{t−1} this is x_σ' = x̂_0 + σ_down·ε̂ + σ_up·z, the Euler ancestral step in σ (`_ancestral`).
    The reference's levels (`spacing.ddim_levels`) end on σ of ᾱ_0, not on 0. `noise(x)` replaces the standard
    normal draw (the reference's temperature and noise dropout)."""
    noise = noise or (lambda x: _noise(x, generator))
    return _ancestral(denoiser, x, sigmas, eta, noise, callback, disable, "DDIM")


# Adams–Bashforth coefficients of the newest slope and up to three earlier ones, by how many earlier ones are known
# (PNDM eq. 12, fixed weights as for equal steps).
ADAMS_BASHFORTH = {1: ((3, -1), 2), 2: ((23, -16, 5), 12), 3: ((55, -59, 37, -9), 24)}


@register("plms", "PLMS over the DDPM table, the reference's PLMSSampler (its first step takes 2 evaluations)",
          lambda steps, t: _ddim_evals(steps, t) + 1, levels=ddim_levels)
@torch.no_grad()
def sample_plms(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Optional[Callback] = None,
                disable: bool = False, **_: object) -> torch.Tensor:
    """PLMS (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds", sec. 3-4) as the
    reference runs it. Its DDIM step driven by a combined ε' is, in σ, x + (σ_{i+1} − σ_i)·d' with d' a combination
    of the slopes d = (x − D)/σ (= ε̂): the newest and up to three earlier ones with the fixed Adams–Bashforth
    weights; the first step, with no history, averages the slopes at both ends of a trial Euler step (PNDM's pseudo
    improved Euler: Heun in σ, two evaluations). The x̂_0 reported is the one d' implies, x − σ·d' (the
    reference's pred_x0).

    A step from pure noise (zero terminal SNR, Lin et al. 2024) is a plain Euler step with the model's own x̂_0:
    there x − σ·d' would multiply any difference between the slopes by σ's stand-in. Its slope starts the history.
    """
    ones = x.new_ones(x.shape[0])
    at_pure_noise = getattr(denoiser, "at_pure_noise", lambda sigma: False)  # the `Denoiser`'s, for zero terminal SNR
    slopes: list[torch.Tensor] = []  # the last slopes, newest first
    for i in _steps(sigmas, "PLMS", disable, repeats=True):
        d = to_derivative(x, sigmas[i], denoiser(x, sigmas[i] * ones))
        if at_pure_noise(sigmas[i]) or sigmas[i + 1] == 0:
            slope = d
        elif not slopes:
            x_trial = x + d * (sigmas[i + 1] - sigmas[i])
            slope = (d + to_derivative(x_trial, sigmas[i + 1], denoiser(x_trial, sigmas[i + 1] * ones))) / 2
        else:
            weights, denominator = ADAMS_BASHFORTH[len(slopes)]
            slope = sum(w * s for w, s in zip(weights, [d, *slopes])) / denominator
        slopes.insert(0, d)
        del slopes[3:]
        if callback is not None:
            callback(i, x, sigmas[i], x - sigmas[i] * slope)
        x = x + slope * (sigmas[i + 1] - sigmas[i])
    return x


@register("ddpm", "DDPM's ancestral sampler over all T steps of the table (steps is ignored)",
          lambda steps, t: t, stochastic=True, levels=ddpm_levels)
@torch.no_grad()
def sample_ddpm(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generators = None,
                callback: Optional[Callback] = None, disable: bool = False, **_: object) -> torch.Tensor:
    """DDPM's ancestral sampling (Ho et al. 2020, Algorithm 2: x_{t−1} = μ_θ(x_t, t) + σ_t z with eq. 11's mean and
    σ_t² = β̃_t) over every trained level. Its step is the posterior q(x_{t−1} | x_t, x̂_0), which is DDIM's at η = 1
    between consecutive timesteps (DDIM eq. 16), so it runs as `_ancestral` at η = 1; the last step, to σ = 0,
    lands on x̂_0 without noise, as Algorithm 2 does."""
    return _ancestral(denoiser, x, sigmas, 1.0, lambda x: _noise(x, generator), callback, disable, "DDPM")
