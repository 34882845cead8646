"""The log line's timing and loss averaging (IntervalMeter) against a fake clock."""

from __future__ import annotations

import math

import pytest

from megatron_hybrid.training.metrics import IntervalMeter, memory_line


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def run_steps(meter, clock, first, last, losses=None, seconds=0.5, applied=True):
    for it in range(first, last + 1):
        clock.t += seconds
        meter.add(losses or {"lm loss": float(it)}, applied)


def test_partial_intervals_divide_by_the_steps_that_ran():
    clock = Clock()
    # resumed at iteration 1899 with --log-interval 214: the first line comes at 1926 (27 steps)
    meter = IntervalMeter(1899, clock=clock)
    run_steps(meter, clock, 1900, 1926)
    dt, _ = meter.take(1926, {})
    assert dt == pytest.approx(0.5)
    run_steps(meter, clock, 1927, 2140)  # a full interval
    assert meter.take(2140, {})[0] == pytest.approx(0.5)
    run_steps(meter, clock, 2141, 2145)  # the run's last, short interval
    assert meter.take(2145, {})[0] == pytest.approx(0.5)


def test_eval_and_save_time_is_left_out():
    clock = Clock()
    meter = IntervalMeter(0, clock=clock)
    run_steps(meter, clock, 1, 2)
    clock.t += 30.0  # a checkpoint save
    meter.pause(30.0)
    run_steps(meter, clock, 3, 4)
    assert meter.take(4, {})[0] == pytest.approx(0.5)


def test_losses_are_the_mean_of_applied_steps():
    clock = Clock()
    meter = IntervalMeter(0, clock=clock)
    run_steps(meter, clock, 1, 3)  # losses 1, 2, 3
    meter.add({"lm loss": math.nan}, applied=False)  # a skipped step is not averaged in
    _, means = meter.take(4, {"lm loss": math.nan})
    assert means == {"lm loss": pytest.approx(2.0)}
    # an interval of only skipped steps shows the last step's (non-finite) loss
    meter.add({"lm loss": math.inf}, applied=False)
    _, means = meter.take(5, {"lm loss": math.inf})
    assert means == {"lm loss": math.inf}


def test_memory_line_has_megatrons_form():
    stats = {"allocated": 3 * 2**20, "max allocated": 5.5 * 2**20}
    line = memory_line(20, rank=0, stats=stats)
    assert (
        line == "[Rank 0] (after 20 iterations) memory (MB) | allocated: 3.0 | max allocated: 5.5"
    )
    import torch

    if not torch.cuda.is_available():  # without CUDA the trainer logs no memory line
        assert memory_line(20) is None
