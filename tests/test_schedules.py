"""Learning-rate schedules: warm-up, cosine by steps or by the clock, step and plateau decay."""

import math

import pytest

from neurallm import config
from neurallm.train import Progress, end_of_epoch_decay, learning_rate


def cfg(**train):
    return config.build({"train": train}).train


def test_constant_with_warmup():
    c = cfg(schedule="constant", lr=2.0, warmup_steps=4)
    rates = [learning_rate(c, Progress(step=s), 100) for s in range(6)]
    assert rates == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]  # step s runs at (s + 1) / warmup of the rate


def test_cosine_by_steps():
    c = cfg(schedule="cosine", lr=1.0)
    assert learning_rate(c, Progress(step=0), 100) == 1.0
    assert learning_rate(c, Progress(step=50), 100) == pytest.approx(0.5)
    assert learning_rate(c, Progress(step=25), 100) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert learning_rate(c, Progress(step=100), 100) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate(c, Progress(step=150), 100) == pytest.approx(0.0, abs=1e-12)  # past the end: stays at 0


def test_cosine_with_warmup_multiplies_both():
    c = cfg(schedule="cosine", lr=1.0, warmup_steps=10)
    assert learning_rate(c, Progress(step=4), 20) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 4 / 20)))


def test_time_bounded_cosine_follows_whichever_bound_is_nearer():
    c = cfg(schedule="cosine", lr=1.0, max_minutes=1.0)
    # 10 of 1,000 steps done, but half the minute spent: the clock sets the rate
    assert learning_rate(c, Progress(step=10, elapsed=30.0), 1000) == pytest.approx(0.5)
    # 900 of 1,000 steps done after 6 s: the steps set it
    assert learning_rate(c, Progress(step=900, elapsed=6.0), 1000) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 0.9)))
    assert learning_rate(c, Progress(step=10, elapsed=90.0), 1000) == pytest.approx(0.0, abs=1e-12)


def test_step_schedule_decays_after_each_epoch_from_decay_start():
    c = cfg(schedule="step", lr=1.0, decay_start=2, decay_factor=0.5)
    p = Progress()
    scales = []
    for epoch in range(1, 5):
        p.epoch, p.valid_loss = epoch, 5.0 - epoch  # improving: no effect on the step schedule
        end_of_epoch_decay(c, p)
        scales.append(p.lr_scale)
    assert scales == [1.0, 0.5, 0.25, 0.125]
    assert learning_rate(c, p, 100) == 0.125


def test_plateau_schedule_decays_when_validation_does_not_improve():
    c = cfg(schedule="plateau", lr=20.0, decay_factor=0.25)
    p = Progress()
    scales = []
    for loss in (5.0, 4.0, 4.5, 3.9, 3.9):
        p.valid_loss = loss
        end_of_epoch_decay(c, p)
        scales.append(p.lr_scale)
    assert scales == [1.0, 1.0, 0.25, 0.25, 0.0625]  # 4.5 and the repeated 3.9 are no better than the best
    assert p.plateau_best == 3.9
    assert learning_rate(c, p, 100) == 20.0 * 0.0625


def test_constant_and_cosine_ignore_epoch_ends():
    for schedule in ("constant", "cosine"):
        p = Progress(valid_loss=9.0, plateau_best=1.0)
        end_of_epoch_decay(cfg(schedule=schedule), p)
        assert p.lr_scale == 1.0
