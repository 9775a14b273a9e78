"""Learning-rate multipliers of the reference, for `torch.optim.lr_scheduler.LambdaLR` (stepped per batch).

Configs name them under `model.params.scheduler_config`; the module builds
``LambdaLR(optimizer, lr_lambda=scheduler.schedule)``, so each returns a factor on the base learning rate.
"""
from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence

log = logging.getLogger(__name__)


class LambdaWarmUpCosineScheduler:
    """Linear warm-up from `lr_start` to `lr_max` over `warm_up_steps`, then a half cosine down to `lr_min`
    at `max_decay_steps` (SGDR, Loshchilov & Hutter 2017, eq. 5, one cycle), constant after."""

    def __init__(self, warm_up_steps: int, lr_min: float, lr_max: float, lr_start: float, max_decay_steps: int,
                 verbosity_interval: int = 0) -> None:
        if max_decay_steps <= warm_up_steps:
            raise ValueError(f"max_decay_steps ({max_decay_steps}) must exceed warm_up_steps ({warm_up_steps})")
        self.lr_warm_up_steps = warm_up_steps
        self.lr_start = lr_start
        self.lr_min = lr_min
        self.lr_max = lr_max
        self.lr_max_decay_steps = max_decay_steps
        self.verbosity_interval = verbosity_interval

    def schedule(self, n: int, **kwargs: object) -> float:
        if self.verbosity_interval > 0 and n % self.verbosity_interval == 0:
            log.info(f"current step: {n}, recent lr-multiplier: {self(n):.3g}")
        return self(n)

    def __call__(self, n: int) -> float:
        if n < self.lr_warm_up_steps:
            return (self.lr_max - self.lr_start) / self.lr_warm_up_steps * n + self.lr_start
        t = min((n - self.lr_warm_up_steps) / (self.lr_max_decay_steps - self.lr_warm_up_steps), 1.0)
        return self.lr_min + 0.5 * (self.lr_max - self.lr_min) * (1 + math.cos(t * math.pi))


class LambdaWarmUpCosineScheduler2:
    """Repeated cycles: in cycle i, a linear warm-up from `f_start[i]` to `f_max[i]` over `warm_up_steps[i]`,
    then a decay to `f_min[i]` at the end of the cycle (`cycle_lengths[i]` steps); cosine here, linear in
    `LambdaLinearScheduler`. All lists have one entry per cycle."""

    def __init__(self, warm_up_steps: Sequence[int], f_min: Sequence[float], f_max: Sequence[float],
                 f_start: Sequence[float], cycle_lengths: Sequence[int], verbosity_interval: int = 0) -> None:
        lengths = {len(x) for x in (warm_up_steps, f_min, f_max, f_start, cycle_lengths)}
        if len(lengths) != 1:
            raise ValueError("warm_up_steps, f_min, f_max, f_start and cycle_lengths need one entry per cycle; "
                             f"got lengths {[len(x) for x in (warm_up_steps, f_min, f_max, f_start, cycle_lengths)]}")
        self.lr_warm_up_steps = list(warm_up_steps)
        self.f_start = list(f_start)
        self.f_min = list(f_min)
        self.f_max = list(f_max)
        self.cycle_lengths = list(cycle_lengths)
        # Python ints: a numpy scalar would reach the optimizer's lr and make checkpoints unloadable with
        # torch.load(weights_only=True).
        self.cum_cycles = [0, *itertools.accumulate(int(n) for n in cycle_lengths)]
        self.verbosity_interval = verbosity_interval

    def find_in_interval(self, n: int) -> int:
        """Index of the cycle that step `n` falls in (the last one for steps past the end)."""
        for interval, end in enumerate(self.cum_cycles[1:]):
            if n <= end:
                return interval
        return len(self.cycle_lengths) - 1

    def schedule(self, n: int, **kwargs: object) -> float:
        if self.verbosity_interval > 0 and n % self.verbosity_interval == 0:
            log.info(f"current step: {n}, recent lr-multiplier: {self(n):.3g}")
        return self(n)

    def __call__(self, n: int) -> float:
        cycle = self.find_in_interval(n)
        n = n - self.cum_cycles[cycle]
        warm_up = self.lr_warm_up_steps[cycle]
        if n < warm_up:
            return (self.f_max[cycle] - self.f_start[cycle]) / warm_up * n + self.f_start[cycle]
        return self._decay(cycle, n)

    def _decay(self, cycle: int, n: int) -> float:
        t = min((n - self.lr_warm_up_steps[cycle]) / (self.cycle_lengths[cycle] - self.lr_warm_up_steps[cycle]), 1.0)
        return self.f_min[cycle] + 0.5 * (self.f_max[cycle] - self.f_min[cycle]) * (1 + math.cos(t * math.pi))


class LambdaLinearScheduler(LambdaWarmUpCosineScheduler2):
    """As `LambdaWarmUpCosineScheduler2`, with a linear decay from `f_max` towards `f_min` over the cycle.

    The reference's formula is kept: the factor is f_min + (f_max − f_min)·(L − n)/L with n counted from the
    cycle start (warm-up included), so the decay starts below f_max. The usual configs set f_min = f_max = 1
    (warm-up, then constant), where this does not matter."""

    def _decay(self, cycle: int, n: int) -> float:
        # Held at f_min past the end of the last cycle (training longer than the schedule): the reference's
        # formula would go on down through zero to a negative learning rate.
        length = self.cycle_lengths[cycle]
        return self.f_min[cycle] + (self.f_max[cycle] - self.f_min[cycle]) * max(length - n, 0) / length
