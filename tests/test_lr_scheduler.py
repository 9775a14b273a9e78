"""The reference's learning-rate multipliers, at the steps where their formulas change, and under LambdaLR."""
import logging
import math

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from ldm.lr_scheduler import LambdaLinearScheduler, LambdaWarmUpCosineScheduler, LambdaWarmUpCosineScheduler2


def cosine(f_min: float, f_max: float, fraction: float) -> float:
    """SGDR's half cosine (Loshchilov & Hutter 2017, eq. 5) from f_max at fraction 0 to f_min at 1."""
    return f_min + 0.5 * (f_max - f_min) * (1 + math.cos(fraction * math.pi))


def test_warm_up_cosine_single_cycle():
    scheduler = LambdaWarmUpCosineScheduler(warm_up_steps=10, lr_min=0.1, lr_max=1.0, lr_start=0.01,
                                            max_decay_steps=110)
    assert scheduler(0) == pytest.approx(0.01)  # warm-up start
    assert scheduler(5) == pytest.approx(0.01 + 0.5 * (1.0 - 0.01))  # linear warm-up
    assert scheduler(9) == pytest.approx(0.01 + 0.9 * (1.0 - 0.01))
    assert scheduler(10) == pytest.approx(1.0)  # warm-up end = top of the cosine
    assert scheduler(35) == pytest.approx(cosine(0.1, 1.0, 0.25))
    assert scheduler(60) == pytest.approx(0.55)  # midpoint: halfway between lr_max and lr_min
    assert scheduler(110) == pytest.approx(0.1)
    assert scheduler(10_000) == pytest.approx(0.1)  # constant after max_decay_steps


def test_warm_up_cosine_cycles():
    scheduler = LambdaWarmUpCosineScheduler2(warm_up_steps=[10, 5], f_min=[0.1, 0.0], f_max=[1.0, 0.5],
                                             f_start=[0.0, 0.2], cycle_lengths=[100, 50])
    # Cycle 0: steps 0..100 (the boundary step belongs to the earlier cycle, as in the reference).
    assert scheduler(0) == pytest.approx(0.0)
    assert scheduler(4) == pytest.approx(0.4)
    assert scheduler(10) == pytest.approx(1.0)
    assert scheduler(55) == pytest.approx(0.55)
    assert scheduler(100) == pytest.approx(0.1)
    # Cycle 1 restarts its own warm-up, counted from the cycle start.
    assert scheduler.find_in_interval(100) == 0 and scheduler.find_in_interval(101) == 1
    assert scheduler(101) == pytest.approx(0.2 + (0.5 - 0.2) / 5 * 1)
    assert scheduler(105) == pytest.approx(0.5)
    assert scheduler(105 + 45 / 3) == pytest.approx(cosine(0.0, 0.5, 1 / 3))
    assert scheduler(150) == pytest.approx(0.0)
    # Past the last cycle: the last cycle's end value.
    assert scheduler.find_in_interval(500) == 1
    assert scheduler(500) == pytest.approx(0.0)


def test_linear_cycles():
    scheduler = LambdaLinearScheduler(warm_up_steps=[10, 20], f_min=[0.0, 0.5], f_max=[1.0, 1.0],
                                      f_start=[1e-6, 0.0], cycle_lengths=[100, 200])
    assert scheduler(0) == pytest.approx(1e-6)
    assert scheduler(5) == pytest.approx(1e-6 + (1.0 - 1e-6) / 10 * 5)
    # The reference's decay counts n from the cycle start, warm-up included: (L - n) / L.
    assert scheduler(10) == pytest.approx(0.9)
    assert scheduler(55) == pytest.approx(0.45)
    assert scheduler(100) == pytest.approx(0.0)
    assert scheduler(110) == pytest.approx(0.0 + 1.0 / 20 * 10)  # cycle 1 warm-up from f_start 0
    assert scheduler(120) == pytest.approx(0.5 + 0.5 * (200 - 20) / 200)
    assert scheduler(300) == pytest.approx(0.5)


def test_linear_warm_up_then_constant():
    # The usual config (lsun_churches256, cin256-v2): warm up from 1e-6 to 1 over 10000 steps, then flat.
    scheduler = LambdaLinearScheduler(warm_up_steps=[10_000], f_min=[1.0], f_max=[1.0], f_start=[1e-6],
                                      cycle_lengths=[10_000_000_000_000])
    assert scheduler(0) == pytest.approx(1e-6)
    assert scheduler(5_000) == pytest.approx(0.5, rel=1e-5)
    assert scheduler(10_000) == 1.0
    assert scheduler(3_000_000) == 1.0


@pytest.mark.parametrize("scheduler", [
    LambdaWarmUpCosineScheduler(warm_up_steps=3, lr_min=0.05, lr_max=1.0, lr_start=0.0, max_decay_steps=8),
    LambdaWarmUpCosineScheduler2(warm_up_steps=[2, 1], f_min=[0.1, 0.2], f_max=[1.0, 0.8], f_start=[0.0, 0.3],
                                 cycle_lengths=[5, 5]),
    LambdaLinearScheduler(warm_up_steps=[2], f_min=[0.1], f_max=[1.0], f_start=[0.0], cycle_lengths=[12]),
], ids=["cosine", "cosine-cycles", "linear"])
def test_lambda_lr_applies_the_factor_each_step(scheduler):
    base_lr = 0.5
    parameter = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([parameter], lr=base_lr)
    lr_scheduler = LambdaLR(optimizer, lr_lambda=scheduler.schedule)
    for step in range(12):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(base_lr * scheduler(step)), step
        parameter.grad = torch.ones(2)
        optimizer.step()
        lr_scheduler.step()


def test_verbosity_interval_logs_the_factor(caplog):
    scheduler = LambdaWarmUpCosineScheduler(warm_up_steps=4, lr_min=0.1, lr_max=1.0, lr_start=0.0,
                                            max_decay_steps=10, verbosity_interval=2)
    with caplog.at_level(logging.INFO, logger="ldm"):
        for step in range(4):
            scheduler.schedule(step)
    lines = [record.getMessage() for record in caplog.records]
    assert lines == ["current step: 0, recent lr-multiplier: 0", "current step: 2, recent lr-multiplier: 0.5"]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="max_decay_steps"):
        LambdaWarmUpCosineScheduler(warm_up_steps=10, lr_min=0.1, lr_max=1.0, lr_start=0.0, max_decay_steps=10)
    with pytest.raises(ValueError, match="one entry per cycle"):
        LambdaLinearScheduler(warm_up_steps=[10, 10], f_min=[1.0], f_max=[1.0], f_start=[0.0], cycle_lengths=[100])


def test_factors_are_python_floats_so_checkpoints_stay_weights_only_loadable(tmp_path):
    """A numpy scalar factor would become the optimizer's lr and break torch.load(weights_only=True)."""
    scheduler = LambdaLinearScheduler(warm_up_steps=[3], f_min=[1.0], f_max=[1.0], f_start=[1e-6], cycle_lengths=[10**13])
    parameter = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([parameter], lr=1e-3)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=scheduler.schedule)
    for _ in range(5):
        parameter.grad = torch.ones(2)
        optimizer.step()
        lr_scheduler.step()
    assert all(type(scheduler(n)) is float for n in (0, 2, 5, 10**6))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": lr_scheduler.state_dict()}, tmp_path / "state.pt")
    torch.load(tmp_path / "state.pt", weights_only=True)


def test_linear_schedule_holds_f_min_past_its_last_cycle():
    # The built-in txt2img.yaml schedule: 10,500 steps at 1.0, then 6,000 decaying from 0.3 to 0.01.
    schedule = LambdaLinearScheduler(warm_up_steps=[300, 1], cycle_lengths=[10500, 6000], f_start=[1e-6, 0.3],
                                     f_max=[1.0, 0.3], f_min=[1.0, 0.01])
    assert schedule(5000) == 1.0
    assert schedule(10501) == pytest.approx(0.3, abs=1e-3)
    assert schedule(16500) == pytest.approx(0.01)
    assert schedule(30000) == pytest.approx(0.01)  # training past the schedule: never below f_min
