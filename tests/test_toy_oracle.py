"""End to end on the paper's Gaussian-mixture toy: primal–dual meets the requested threshold, measured
independently of the training-time estimator, and λ lands near the oracle's λ* — over 3 seeds.

Thresholds are increases over the frozen model in the estimator's own units (the estimator's bias, shared by the
frozen and the adapted model, cancels). "Achieved" is measured from 20k samples with exact densities: kNN entropy
and exact log q (RU), exact E[log q − log p0] (LU), k-NN estimates of log p at q's samples (FU). λ* for RU/LU comes from the
exact *composed* sampler (what training targets), for FU from the exact closed form.

Slow (≈ 1–2 min per run on one thread); the whole file takes ~15 minutes.
"""

import functools

import pytest

from unlearn_core import toy

SEEDS = [0, 1, 2]
CASES = {"ru": 10.0, "lu": 10.0, "fu": 0.5}
STEPS = {"ru": 1200, "lu": 1200, "fu": 3000}
OBJECTIVE = {"ru": "reverse_kl", "lu": "likelihood_ratio", "fu": "forward_kl"}


@functools.cache
def oracle(method: str, base_offset: float = 0.0) -> float:
    return toy.lambda_star(OBJECTIVE[method], CASES[method], base_offset=base_offset)


@functools.cache
def run(method: str, seed: int, **kw) -> dict:
    return toy.run_toy(method, CASES[method], seed=seed, oracle=False, steps=STEPS[method], **kw)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("method", list(CASES))
def test_primal_dual_meets_the_threshold_and_finds_lambda_star(method, seed):
    out = run(method, seed)
    # FU's p_λ is built from the retain data, so its λ* depends on where the frozen network starts (see lambda_star)
    offset = toy.forward_kl_increase_of_weight(out["forget_weight_base"]) if method == "fu" else 0.0
    lam_star = oracle(method, round(offset, 6))
    assert out["lambda"] == pytest.approx(lam_star, rel=0.20), (out, lam_star)
    assert out["achieved"] == pytest.approx(out["requested"], rel=0.15), out
    lo, hi = out["lambda_last_quarter"]
    assert 0 < lo and hi < 0.95, "λ must settle strictly inside its bounds"


def test_a_fixed_weight_baseline_does_not_adapt():
    """ESD with a hand-set η lands wherever η puts it; RU (same loop, λ learned) meets the request."""
    esd = toy.run_toy("esd", CASES["ru"], seed=0, fixed_weight=0.05, oracle=False, steps=STEPS["ru"])
    assert esd["lambda"] == pytest.approx(0.05 / 1.05)
    assert esd["achieved"] < 0.6 * CASES["ru"], esd
    assert run("ru", 0)["achieved"] == pytest.approx(CASES["ru"], rel=0.15)
