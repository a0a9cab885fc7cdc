"""ε-targets: the RU/ESD identity, LU's forms, FU's and SISS's losses, and clear errors for bad λ / NaN."""

import math

import pytest
import torch

from unlearn_core import targets
from unlearn_core.toy import GMM, toy_schedule


@pytest.fixture
def eps():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(16, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("eta", [0.0, 0.25, 1.0, 3.0, 19.0])
def test_ru_target_equals_esd_target_at_eta(eps, eta):
    e_null, e_c, _ = eps
    lam = targets.eta_to_lambda(eta)
    assert lam == pytest.approx(eta / (1 + eta))
    assert targets.lambda_to_eta(lam) == pytest.approx(eta)
    torch.testing.assert_close(targets.reverse_kl_target(e_null, e_c, lam), targets.esd_target(e_null, e_c, eta),
                               rtol=1e-12, atol=1e-12)


def test_ru_target_is_the_score_of_the_tilted_gaussian():
    """For Gaussians with equal covariance the composed ε is exact: (p0/q^λ)^{1/(1−λ)} is Gaussian again."""
    sched = toy_schedule()
    m0, mq, lam = torch.tensor([[1.0, 0.0]], dtype=torch.float64), torch.tensor([[-1.0, 0.5]], dtype=torch.float64), 0.3
    p0, q = GMM(m0, torch.ones(1), 0.7), GMM(mq, torch.ones(1), 0.7)
    # p_λ ∝ exp(−((1)|x−m0|² − λ|x−mq|²)/(2σ²(1−λ))) = N((m0 − λ mq)/(1 − λ), σ²)
    p_lam = GMM((m0 - lam * mq) / (1 - lam), torch.ones(1), 0.7)
    x = torch.randn(64, 2, dtype=torch.float64)
    t = torch.zeros(64, dtype=torch.long)  # at t = 0 noising is negligible but exactness holds for any t here
    for tt in (t, t + 40, t + 99):
        got = targets.reverse_kl_target(p0.eps(x, tt, sched), q.eps(x, tt, sched), lam)
        # the noised tilted Gaussian differs from the tilt of noised Gaussians only through the variance map,
        # which is identical for equal covariances; its mean is √ᾱ (m0 − λ mq)/(1 − λ)
        torch.testing.assert_close(got, p_lam.eps(x, tt, sched), rtol=1e-9, atol=1e-9)


def test_lu_log_ratio_target(eps):
    e0, eq, eref = eps
    torch.testing.assert_close(targets.likelihood_ratio_target(e0, eq, eref, 0.4), e0 - 0.4 * (eq - eref))


def test_lu_likelihood_weights_each_sample_by_its_ratio(eps):
    e0, eq, eref = eps
    ratio = torch.linspace(0, 2, 16, dtype=torch.float64)
    out = targets.likelihood_target(e0, eq, eref, 0.5, ratio)
    torch.testing.assert_close(out[0], e0[0])  # ratio 0: a sample that no longer looks like the concept
    torch.testing.assert_close(out[-1], e0[-1] - 1.0 * (eq[-1] - eref[-1]))


def test_fu_loss_is_retain_minus_lambda_forget(eps):
    a, b, c = eps
    n1, n2 = torch.zeros_like(a), torch.zeros_like(b)
    got = targets.forward_kl_loss(a, n1, b, n2, 0.25)
    assert float(got) == pytest.approx(float(a.pow(2).mean() - 0.25 * b.pow(2).mean()))


def test_siss_with_unit_weights_matches_fu_scaled(eps):
    a, n1, n2 = eps
    w = torch.ones(16, dtype=torch.float64)
    got = targets.siss_loss(a, n1, n2, w, w, 0.2)
    ref = targets.forward_kl_loss(a, n1, a, n2, 0.2) / 0.8
    assert float(got) == pytest.approx(float(ref))


@pytest.mark.parametrize("lam", [-0.1, 1.0, 1.5, math.nan])
def test_ru_rejects_lambda_outside_0_1(eps, lam):
    with pytest.raises(ValueError, match="outside its range"):
        targets.reverse_kl_target(eps[0], eps[1], lam)


def test_negative_eta_is_refused():
    with pytest.raises(ValueError, match="η must be >= 0"):
        targets.eta_to_lambda(-1.0)


def test_nan_in_a_target_names_the_frozen_model():
    x = torch.tensor([1.0, float("nan")])
    with pytest.raises(FloatingPointError, match="frozen model's ε has 1 non-finite"):
        targets.check_finite("the frozen model's ε", x)
