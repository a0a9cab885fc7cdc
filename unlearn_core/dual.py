"""Dual variables: projected dual ascent on the Lagrangian, one variable per constraint.

By strong duality the dual gradient at λ is the constraint slack of the Lagrangian's minimiser p_λ, so the
ascent step is

    lower-bound constraint  g(p) ≥ b:   λ ← Π[λ + α (b − ĝ) / scale]      (RU, FU, "forget at least b")
    upper-bound constraint  g(p) ≤ b:   λ ← Π[λ + α (ĝ − b) / scale]      (LU, retention "stay within ρ")

with Π the projection onto [lo, hi]. ``scale`` makes α unitless (e.g. the calibrated separation). The primal
(the LoRA) answers a change of λ only after tens of steps, so the loop is a controller with dead time: ĝ may be
smoothed (an exponential moving average) and updates happen every M primal steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["DualVariable", "Constraint"]


@dataclass
class DualVariable:
    """A projected-ascent dual variable. ``frozen=True`` turns it into a fixed weight (the baselines)."""

    value: float = 0.0
    lr: float = 0.05
    lo: float = 0.0
    hi: float = math.inf
    frozen: bool = False
    smoothing: float = 0.0  # EMA factor on the constraint estimate, in [0, 1)
    scale: float = 1.0
    _smoothed: float | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not (0.0 <= self.lo < self.hi):
            raise ValueError(f"dual bounds must satisfy 0 <= lo < hi, got lo={self.lo}, hi={self.hi}")
        if not (self.lo <= self.value <= self.hi):
            raise ValueError(f"initial λ = {self.value} is outside its bounds [{self.lo}, {self.hi}]")
        if not (0.0 <= self.smoothing < 1.0):
            raise ValueError(f"smoothing must be in [0, 1), got {self.smoothing}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"dual step size must be a positive number, got {self.lr}")
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"dual scale must be a positive number, got {self.scale}")

    def smooth(self, estimate: float) -> float:
        if not math.isfinite(estimate):
            raise FloatingPointError(f"constraint estimate is not finite ({estimate})")
        if self._smoothed is None or self.smoothing == 0.0:
            self._smoothed = estimate
        else:
            self._smoothed = self.smoothing * self._smoothed + (1 - self.smoothing) * estimate
        return self._smoothed

    def ascend(self, slack: float) -> float:
        """One projected step along the dual gradient ``slack`` (positive = constraint violated)."""
        if not self.frozen:
            self.value = min(max(self.value + self.lr * slack / self.scale, self.lo), self.hi)
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "smoothed": self._smoothed}

    def load_state_dict(self, state: dict) -> None:
        self.value, self._smoothed = float(state["value"]), state["smoothed"]


@dataclass
class Constraint:
    """``g(p) ≥ threshold`` (sense "lower") or ``g(p) ≤ threshold`` (sense "upper"), with its dual variable."""

    name: str
    sense: str
    threshold: float
    dual: DualVariable
    last_estimate: float | None = None

    def __post_init__(self) -> None:
        if self.sense not in ("lower", "upper"):
            raise ValueError(f"constraint sense must be 'lower' or 'upper', got {self.sense!r}")
        if not math.isfinite(self.threshold):
            raise ValueError(f"constraint {self.name!r}: threshold must be finite, got {self.threshold}")

    def slack(self, estimate: float) -> float:
        """The dual gradient: positive when the constraint is violated."""
        return self.threshold - estimate if self.sense == "lower" else estimate - self.threshold

    def update(self, estimate: float) -> float:
        self.last_estimate = estimate
        smoothed = self.dual.smooth(estimate)
        return self.dual.ascend(self.slack(smoothed))

    def satisfied(self, estimate: float, rel_tol: float = 0.0) -> bool:
        return self.slack(estimate) <= rel_tol * abs(self.threshold)
