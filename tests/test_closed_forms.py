"""The three formulations' closed-form minimisers on a discrete space: they are the constrained optima, the
duality gap is ~0, and the dual gradient is the constraint slack."""

import numpy as np
import pytest
from scipy.optimize import minimize

N = 12


def kl(a, b):
    return float(np.sum(a * (np.log(a) - np.log(b))))


@pytest.fixture(scope="module")
def dists():
    rng = np.random.default_rng(3)
    p0 = rng.uniform(0.5, 1.5, N)
    p0 /= p0.sum()
    q = rng.uniform(0.05, 1.0, N) ** 3
    q /= q.sum()
    r = np.log(q) - np.log(p0)  # LU's log-ratio reward
    return p0, q, r


# the closed forms, written from the Lagrangian's stationarity conditions
def p_ru(p0, q, lam):
    logp = (np.log(p0) - lam * np.log(q)) / (1 - lam)
    p = np.exp(logp - logp.max())
    return p / p.sum()


def p_fu(p0, q, lam):
    return (p0 - lam * q) / (1 - lam)


def p_lu(p0, r, lam):
    p = p0 * np.exp(-lam * r)
    return p / p.sum()


PROBLEMS = {
    # name: (objective(p), constraint g(p), sense, p_λ, λ range)
    "ru": (lambda p, d: kl(p, d[0]), lambda p, d: kl(p, d[1]), "lower", lambda d, lam: p_ru(d[0], d[1], lam), 0.9),
    "fu": (lambda p, d: kl(d[0], p), lambda p, d: kl(d[1], p), "lower", lambda d, lam: p_fu(d[0], d[1], lam), None),
    "lu": (lambda p, d: kl(p, d[0]), lambda p, d: float(p @ d[2]), "upper", lambda d, lam: p_lu(d[0], d[2], lam), 5.0),
}


def lagrangian(name, p, lam, b, d):
    obj, g, sense, _, _ = PROBLEMS[name]
    slack = (b - g(p, d)) if sense == "lower" else (g(p, d) - b)
    return obj(p, d) + lam * slack


def solve_lambda_star(name, b, d):
    _, g, sense, p_lam, hi = PROBLEMS[name]
    hi = hi if hi is not None else 0.999 * float(np.min(d[0] / d[1]))
    lo = 0.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        val = g(p_lam(d, mid), d)
        violated = val < b if sense == "lower" else val > b
        lo, hi = (mid, hi) if violated else (lo, mid)
    return 0.5 * (lo + hi)


def threshold(name, d):
    _, g, _, p_lam, _ = PROBLEMS[name]
    lam = {"ru": 0.3, "fu": 0.5 * float(np.min(d[0] / d[1])), "lu": 0.8}[name]
    return g(p_lam(d, lam), d)


def brute_force(name, b, d, starts=8):
    """Constrained optimum by SLSQP over the simplex (softmax-free: bounds + equality), best of several starts."""
    obj, g, sense, _, _ = PROBLEMS[name]
    rng = np.random.default_rng(0)
    cons = [{"type": "eq", "fun": lambda p: p.sum() - 1},
            {"type": "ineq", "fun": (lambda p: g(p, d) - b) if sense == "lower" else (lambda p: b - g(p, d))}]
    best = None
    for _ in range(starts):
        x0 = rng.dirichlet(np.ones(N))
        res = minimize(lambda p: obj(p, d), x0, method="SLSQP", bounds=[(1e-9, 1)] * N, constraints=cons,
                       options={"maxiter": 500, "ftol": 1e-12})
        if res.success and cons[1]["fun"](res.x) > -1e-7 and (best is None or res.fun < best.fun):
            best = res
    assert best is not None, "brute force found no feasible optimum"
    return best


@pytest.mark.parametrize("name", ["ru", "fu", "lu"])
def test_closed_form_is_the_constrained_optimum(name, dists):
    b = threshold(name, dists)
    lam = solve_lambda_star(name, b, dists)
    obj, g, *_ = PROBLEMS[name]
    p_star = PROBLEMS[name][3](dists, lam)
    bf = brute_force(name, b, dists)
    assert abs(g(p_star, dists) - b) < 1e-8 * max(1, abs(b))  # active constraint
    assert obj(p_star, dists) == pytest.approx(bf.fun, rel=1e-4, abs=1e-6)
    assert np.abs(bf.x - p_star).max() < 2e-3


@pytest.mark.parametrize("name", ["ru", "fu", "lu"])
def test_duality_gap_is_zero(name, dists):
    b = threshold(name, dists)
    lam_star = solve_lambda_star(name, b, dists)
    p_lam = PROBLEMS[name][3]
    hi = lam_star * 2
    lams = np.linspace(0, min(hi, 0.999 * (PROBLEMS[name][4] or np.min(dists[0] / dists[1]))), 401)
    dual = [lagrangian(name, p_lam(dists, x), x, b, dists) for x in lams]
    primal = PROBLEMS[name][0](p_lam(dists, lam_star), dists)
    assert max(dual) == pytest.approx(primal, rel=1e-4, abs=1e-6)
    assert lams[int(np.argmax(dual))] == pytest.approx(lam_star, abs=2 * (lams[1] - lams[0]))


@pytest.mark.parametrize("name", ["ru", "fu", "lu"])
def test_dual_gradient_is_the_constraint_slack(name, dists):
    b = threshold(name, dists)
    _, g, sense, p_lam, _ = PROBLEMS[name]
    for lam in (0.05, 0.1, 0.2):
        h = 1e-5
        fd = (lagrangian(name, p_lam(dists, lam + h), lam + h, b, dists)
              - lagrangian(name, p_lam(dists, lam - h), lam - h, b, dists)) / (2 * h)
        p = p_lam(dists, lam)
        slack = (b - g(p, dists)) if sense == "lower" else (g(p, dists) - b)
        assert fd == pytest.approx(slack, rel=1e-4, abs=1e-6)


def test_lambda_zero_when_already_far_enough(dists):
    """Strong duality's corner: a threshold the reference already meets needs no push (λ* = 0)."""
    b = 0.5 * kl(dists[0], dists[1])  # KL(p0‖q) already exceeds it
    assert solve_lambda_star("ru", b, dists) < 1e-12
