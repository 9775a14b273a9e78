"""PLMS sampling: DDIM steps driven by a pseudo linear multistep ε (Liu et al. 2022, "Pseudo Numerical
Methods for Diffusion Models on Manifolds", PNDM sec. 3-4), with the CompVis reference's API and numbers.

Each step makes one model call; the ε used in the DDIM update (eq. 12) extrapolates from the current and
up to three earlier ε (Adams-Bashforth). The first step has no history: it takes a pseudo improved-Euler
(Heun) step, averaging ε at the start and at a trial DDIM step's end (two model calls).

A step from ᾱ_t = 0 (zero terminal SNR, Lin et al. 2024) is a plain DDIM step with the model's own x̂_0:
the DDIM update from a combined ε reads x̂_0 = (x_t − √(1 − ᾱ_t) ε')/√ᾱ_t, undefined there (x_t = ε
exactly, so only the model's x̂_0 can say anything about x_0). Its ε = x_t starts the history.
"""
from __future__ import annotations

from typing import Optional

import torch

from ldm.models.diffusion.ddim import DDIMSampler, ModelFn, StepFn, X0Fn, ddim_update

# Adams-Bashforth coefficients of ε_t, ε_{t−1}, ε_{t−2}, ε_{t−3} by the number of earlier ε known (PNDM sec. 3).
ADAMS_BASHFORTH = {1: ((3, -1), 2), 2: ((23, -16, 5), 12), 3: ((55, -59, 37, -9), 24)}


class PLMSSampler(DDIMSampler):
    """The reference's PLMS sampler; the same calls as `DDIMSampler` (its schedule, masks, guidance and
    options), but deterministic: eta must be 0. `decode` (img2img, not in the reference's PLMS) takes PLMS steps."""

    name = "PLMS"

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        if ddim_eta != 0:
            raise ValueError(f"PLMS is deterministic: eta must be 0, got {ddim_eta} (use DDIMSampler for eta > 0)")
        super().make_schedule(ddim_num_steps, ddim_discretize=ddim_discretize, ddim_eta=ddim_eta, verbose=verbose)

    def _make_step(self, model_output: ModelFn, x0_fn: Optional[X0Fn]) -> StepFn:
        schedule, prediction = self.model.schedule, self.model.prediction
        old_eps: list[torch.Tensor] = []  # the raw (guided) ε of the last steps, oldest first

        def eps_at(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return prediction.eps(model_output(x, t), x, *schedule.coefficients(t))

        def step(x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, alpha_prev: torch.Tensor,
                 sigma: torch.Tensor, noise: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            if bool((schedule.alphas_cumprod[t.to(schedule.alphas_cumprod.device)] == 0).any()):
                output = model_output(x, t)
                old_eps.append(prediction.eps(output, x, *schedule.coefficients(t)))
                return ddim_update(schedule, prediction, output, x, t, alpha_prev, sigma, noise, x0_fn)
            eps = eps_at(x, t)
            if not old_eps:
                x_trial, _ = ddim_update(schedule, "eps", eps, x, t, alpha_prev, sigma, None, x0_fn)
                eps_prime = (eps + eps_at(x_trial, t_next)) / 2
            else:
                weights, denominator = ADAMS_BASHFORTH[len(old_eps)]
                history = [eps, *reversed(old_eps)]
                eps_prime = sum(w * e for w, e in zip(weights, history)) / denominator
            old_eps.append(eps)
            del old_eps[:-3]
            return ddim_update(schedule, "eps", eps_prime, x, t, alpha_prev, sigma, noise, x0_fn)
        return step
