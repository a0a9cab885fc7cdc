"""Closed-form ε-targets and losses of the three formulations and of the weight-based baselines.

Notation (ε-space, at one (x_t, t)): ``eps_anchor`` = frozen model at the anchor (the distribution p0 to stay
close to), ``eps_concept`` = frozen model at the concept (q, what must be forgotten), ``eps_ref`` = frozen model
at the reference of the likelihood ratio (the unconditional branch ∅), λ the dual variable. A linear
combination of scores is the same combination of ε-predictions, because ε = −√(1−ᾱ_t) · score.

RU  min KL(p‖p0)  s.t. KL(p‖q) ≥ b      p_λ ∝ (p0 / q^λ)^{1/(1−λ)}   ε* = (ε0 − λ ε_q)/(1 − λ)
FU  min KL(p0‖p)  s.t. KL(q‖p) ≥ b      p_λ = (p0 − λ q)/(1 − λ)      loss = DSM(p0 data) − λ DSM(q data)
LU  min KL(p‖p0)  s.t. E_p[r] ≤ b       p_λ ∝ p0 exp(−λ r)
      r = log q − log ref (log-ratio):  ε* = ε0 − λ (ε_q − ε_ref)
      r = q / ref (likelihood ratio):   ε* = ε0 − λ r̂ (ε_q − ε_ref), r̂ the per-sample ratio at x̂0

Baselines are these objectives with λ frozen: ESD's target ε(∅) − η(ε(c) − ε(∅)) ... in its "negative guidance"
form ε0 + η(ε0 − ε_q) is RU at λ = η/(1+η); NegGrad/EraseDiff's "retain loss − w · forget loss" is FU at λ = w;
SISS is FU at λ = k/n with importance-sampled x_t (its "retrain without the forget set" target).
"""

from __future__ import annotations

import torch

__all__ = [
    "reverse_kl_target",
    "esd_target",
    "eta_to_lambda",
    "lambda_to_eta",
    "likelihood_ratio_target",
    "likelihood_target",
    "forward_kl_loss",
    "siss_loss",
    "check_finite",
]


def check_finite(name: str, x: torch.Tensor) -> torch.Tensor:
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise FloatingPointError(f"{name} has {bad} non-finite values (NaN/Inf); the frozen model or the inputs are broken")
    return x


def _check_lambda(lam: float, hi: float | None, name: str) -> None:
    if not (lam >= 0.0) or (hi is not None and not lam < hi):
        rng = f"[0, {hi})" if hi is not None else "[0, inf)"
        raise ValueError(f"{name}: λ = {lam!r} is outside its range {rng}")


def reverse_kl_target(eps_anchor: torch.Tensor, eps_concept: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """RU: the ε of p_λ ∝ (p0 / q^λ)^{1/(1−λ)}, i.e. (ε0 − λ ε_q)/(1 − λ) = ε0 + η (ε0 − ε_q) with η = λ/(1−λ).

    ``lam`` may be a tensor broadcastable to the ε's (one λ per sample, for several concepts at once).
    """
    if isinstance(lam, torch.Tensor):
        if not bool(((lam >= 0) & (lam < 1)).all()):
            raise ValueError("reverse_kl_target: every λ must lie in [0, 1)")
    else:
        _check_lambda(lam, 1.0, "reverse_kl_target")
    return (eps_anchor - lam * eps_concept) / (1 - lam)


def eta_to_lambda(eta: float) -> float:
    """ESD's guidance scale η ↦ the RU dual variable with the same target, λ = η/(1+η)."""
    if not eta >= 0:
        raise ValueError(f"ESD η must be >= 0, got {eta!r}")
    return eta / (1.0 + eta)


def lambda_to_eta(lam: float) -> float:
    _check_lambda(lam, 1.0, "lambda_to_eta")
    return lam / (1.0 - lam)


def esd_target(eps_null: torch.Tensor, eps_concept: torch.Tensor, eta: float) -> torch.Tensor:
    """ESD's published target ε(∅) − η (ε(c) − ε(∅)) (Gandikota et al. 2023), written independently of RU."""
    if not eta >= 0:
        raise ValueError(f"ESD η must be >= 0, got {eta!r}")
    return eps_null - eta * (eps_concept - eps_null)


def likelihood_ratio_target(eps_anchor: torch.Tensor, eps_concept: torch.Tensor, eps_ref: torch.Tensor,
                            lam: float | torch.Tensor) -> torch.Tensor:
    """LU with the log-ratio reward r = log q − log ref: the ε of p0 · exp(−λ r) is ε0 − λ (ε_q − ε_ref)."""
    if not isinstance(lam, torch.Tensor):
        _check_lambda(lam, None, "likelihood_ratio_target")
    return eps_anchor - lam * (eps_concept - eps_ref)


def likelihood_target(eps_anchor: torch.Tensor, eps_concept: torch.Tensor, eps_ref: torch.Tensor,
                      lam: float | torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """LU with the likelihood reward r = q / ref: ∇(−λ r) = −λ r ∇log r, so each sample's push is weighted by its
    ratio ``ratio`` (shape (B,), ≥ 0) — samples that no longer look like the concept are no longer pushed."""
    if not isinstance(lam, torch.Tensor):
        _check_lambda(lam, None, "likelihood_target")
    if bool((ratio < 0).any()):
        raise ValueError("likelihood ratios must be >= 0")
    w = ratio.reshape(ratio.shape + (1,) * (eps_anchor.dim() - ratio.dim()))
    return eps_anchor - lam * w * (eps_concept - eps_ref)


def _per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred - target).pow(2).flatten(1).mean(1)


def forward_kl_loss(pred_retain: torch.Tensor, noise_retain: torch.Tensor, pred_forget: torch.Tensor,
                    noise_forget: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """FU: the Lagrangian's primal part, DSM(retain) − λ DSM(forget).

    Its minimiser is the exact ε of (p0 − λ q)/(1 − λ): at each (x_t, t) it is the posterior-mean ε under the
    signed data measure p0 − λ q, which stays a density while λ ≤ min p0/q (hence FU's λmax).
    """
    return _per_sample_mse(pred_retain, noise_retain).mean() - lam * _per_sample_mse(pred_forget, noise_forget).mean()


def siss_loss(pred: torch.Tensor, noise_retain: torch.Tensor, noise_forget: torch.Tensor, w_retain: torch.Tensor,
              w_forget: torch.Tensor, lam: float) -> torch.Tensor:
    """SISS (Alberti et al. 2025): one x_t per pair (x, a), drawn from the mixture of their noising kernels; each
    term is importance-weighted by kernel / mixture density, so one forward serves both.

    ``pred`` is ε_θ at that x_t; ``noise_retain``/``noise_forget`` the ε that x_t implies for x resp. a.
    Equals FU's ``(DSM(retain) − λ DSM(forget)) / (1 − λ)`` in expectation.
    """
    _check_lambda(lam, 1.0, "siss_loss")
    lr = w_retain * _per_sample_mse(pred, noise_retain)
    lf = w_forget * _per_sample_mse(pred, noise_forget)
    return (lr.mean() - lam * lf.mean()) / (1 - lam)
