"""Dual variables: projected ascent in the right direction, bounds, smoothing, frozen baselines, bad settings."""

import math

import pytest

from unlearn_core.dual import Constraint, DualVariable


def test_lower_bound_constraint_raises_lambda_while_violated_and_lowers_it_when_overshot():
    c = Constraint("forget", "lower", threshold=10.0, dual=DualVariable(value=0.2, lr=0.1, hi=0.95))
    assert c.update(8.0) == pytest.approx(0.2 + 0.1 * 2.0)
    assert c.update(12.0) == pytest.approx(0.4 - 0.1 * 2.0)


def test_upper_bound_constraint_moves_the_other_way():
    c = Constraint("lu", "upper", threshold=-20.0, dual=DualVariable(value=1.0, lr=0.1))
    assert c.update(-15.0) == pytest.approx(1.5)  # E[r] too high: push harder
    assert c.update(-25.0) == pytest.approx(1.0)


def test_projection_keeps_lambda_inside_its_bounds():
    d = DualVariable(value=0.9, lr=1.0, hi=0.95)
    assert d.ascend(10.0) == 0.95
    assert d.ascend(-100.0) == 0.0


def test_scale_makes_the_step_unitless():
    d = DualVariable(value=0.0, lr=0.05, scale=20.0)
    assert d.ascend(10.0) == pytest.approx(0.025)


def test_smoothing_is_an_exponential_moving_average():
    d = DualVariable(smoothing=0.75)
    assert d.smooth(4.0) == 4.0
    assert d.smooth(8.0) == pytest.approx(0.75 * 4 + 0.25 * 8)


def test_frozen_dual_is_a_fixed_weight():
    d = DualVariable(value=0.2, frozen=True)
    assert d.ascend(100.0) == 0.2


@pytest.mark.parametrize("kwargs, msg", [
    (dict(lo=0.5, hi=0.4), "bounds"),
    (dict(value=2.0, hi=1.0), "outside its bounds"),
    (dict(smoothing=1.0), "smoothing"),
    (dict(lr=0.0), "step size"),
    (dict(scale=math.inf), "scale"),
])
def test_bad_dual_settings_are_refused(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        DualVariable(**kwargs)


def test_non_finite_estimate_is_refused():
    c = Constraint("x", "lower", 1.0, DualVariable())
    with pytest.raises(FloatingPointError, match="not finite"):
        c.update(float("nan"))


def test_bad_sense_is_refused():
    with pytest.raises(ValueError, match="sense"):
        Constraint("x", "sideways", 1.0, DualVariable())
