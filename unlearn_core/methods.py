"""The methods as data: which target or loss, which constraint (and its sense), which λ range, frozen or learned.

One trainer loop (``trainer.py``) runs all of them; a baseline is its constrained counterpart with λ frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MethodSpec", "METHODS", "get_method"]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    kind: str  # "concept": targets on the model's own trajectories; "data": denoising losses on forget/retain data
    objective: str  # "reverse_kl" | "likelihood_ratio" | "likelihood" | "forward_kl" | "siss"
    constraint: str  # "path_kl" (≥) | "log_ratio" (≤) | "forget_nelbo" (≥)
    sense: str
    lam_hi: float  # upper bound of λ (exclusive for RU: λ < 1)
    frozen: bool
    summary: str


METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in [
        MethodSpec("ru", "concept", "reverse_kl", "path_kl", "lower", 0.95, False,
                   "reverse-KL constrained concept unlearning: min KL(p||p0) s.t. KL(p||q) >= b"),
        MethodSpec("esd", "concept", "reverse_kl", "path_kl", "lower", 0.95, True,
                   "ESD: RU's target with a fixed guidance eta (lambda = eta / (1 + eta))"),
        MethodSpec("lu", "concept", "likelihood_ratio", "log_ratio", "upper", 50.0, False,
                   "likelihood-constrained unlearning, log-ratio reward: min KL(p||p0) s.t. E_p[log q/ref] <= b"),
        MethodSpec("lu-lik", "concept", "likelihood", "log_ratio", "upper", 50.0, False,
                   "likelihood-constrained unlearning, likelihood reward r = q/ref: per-sample pushes fade once "
                   "a sample no longer looks like the concept"),
        MethodSpec("fu", "data", "forward_kl", "forget_nelbo", "lower", 0.95, False,
                   "forward-KL constrained data unlearning: min KL(p0||p) s.t. KL(q||p) >= b"),
        MethodSpec("neggrad", "data", "forward_kl", "forget_nelbo", "lower", 0.95, True,
                   "NegGrad / EraseDiff-style: retain loss - w * forget loss with a fixed weight w"),
        MethodSpec("siss", "data", "siss", "forget_nelbo", "lower", 0.95, True,
                   "SISS: importance-sampled mixture of retain and forget noising, fixed lambda (k/n retrains without "
                   "the forget set)"),
    ]
}


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}") from None
