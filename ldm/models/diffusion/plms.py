"""PLMS sampling (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds") with the CompVis
reference's API: a facade over the registry's ``plms`` (`ldm.models.diffusion.samplers.sample_plms`)."""
from __future__ import annotations

from ldm.models.diffusion.ddim import DDIMSampler


class PLMSSampler(DDIMSampler):
    """The reference's PLMS sampler; the same calls as `DDIMSampler` (its schedule, masks, guidance and
    options), but deterministic: eta must be 0. `decode` (img2img, not in the reference's PLMS) takes PLMS steps."""

    name = "PLMS"
    sampler = "plms"

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        if ddim_eta != 0:
            raise ValueError(f"PLMS is deterministic: eta must be 0, got {ddim_eta} (use DDIMSampler for eta > 0)")
        super().make_schedule(ddim_num_steps, ddim_discretize=ddim_discretize, ddim_eta=ddim_eta, verbose=verbose)
