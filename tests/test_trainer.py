"""The one trainer loop: determinism, callbacks, cancel, the NaN guard, frozen baselines, and clear errors."""

import dataclasses
import math

import pytest
import torch

from unlearn_core import ConceptSpec, DataSpec, Problem, TrainConfig, Trainer
from unlearn_core.estimate import path_kl_terms
from unlearn_core.targets import reverse_kl_target
from unlearn_core.toy import ToyNet, toy_denoiser, toy_mixtures

TINY = dict(steps=12, batch=64, dual_every=4, rollouts=16, refresh_every=4, estimate_samples=64, lr=1e-3)


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return ToyNet()  # untrained is fine for loop mechanics


def concept_problem(method="ru", **kw):
    return Problem(method, concepts=[ConceptSpec("q", "p0")], threshold=kw.pop("threshold", 1.0), **kw)


def data_problem(method="fu", **kw):
    p0, q = toy_mixtures()
    g = torch.Generator().manual_seed(0)
    return Problem(method, data=DataSpec(q.sample(128, g), p0.sample(128, g), "p0"), lam_max=0.28, **kw)


def run(base, problem, seed=0, **kw):
    torch.manual_seed(seed)
    den = toy_denoiser(base)
    events = []
    res = Trainer(den, problem, TrainConfig(seed=seed, **{**TINY, **kw}), callbacks=[events.append]).run()
    return den, res, events


@pytest.mark.parametrize("make", [lambda: concept_problem("ru"), lambda: concept_problem("lu"),
                                  lambda: concept_problem("lu-lik"), lambda: data_problem("fu"),
                                  lambda: data_problem("siss", fixed_weight=0.2)])
def test_same_seed_same_result(base, make):
    d1, r1, _ = run(base, make())
    d2, r2, _ = run(base, make())
    assert r1.lambdas == r2.lambdas
    for k, v in d1.adapter_state().items():
        torch.testing.assert_close(v, d2.adapter_state()[k], rtol=0, atol=0)


def test_callbacks_report_step_loss_lambda_and_slack(base):
    _, res, events = run(base, concept_problem())
    kinds = [e["type"] for e in events]
    assert kinds[0] == "calibration" and kinds[-1] == "done"
    assert sum(k == "step" for k in kinds) == TINY["steps"]
    duals = [e for e in events if e["type"] == "dual"]
    assert len(duals) == TINY["steps"] // TINY["dual_every"]
    for e in duals:
        assert set(e) >= {"step", "loss", "lambda", "estimate", "slack"}
        assert e["slack"][0] == pytest.approx(res.thresholds[0] - e["estimate"][0])


def test_cancel_stops_the_loop_and_returns_a_partial_result(base):
    torch.manual_seed(0)
    seen = []
    trainer = Trainer(toy_denoiser(base), concept_problem(), TrainConfig(**TINY), callbacks=[seen.append],
                      should_stop=lambda: sum(e["type"] == "step" for e in seen) >= 5)
    res = trainer.run()
    assert res.cancelled and res.steps_done == 5


def test_esd_is_ru_with_lambda_frozen(base):
    _, res, _ = run(base, concept_problem("esd", fixed_weight=1.0))
    assert res.lambdas == [pytest.approx(0.5)]


def test_nan_guard_restores_the_last_good_state_and_reports_it(base):
    torch.manual_seed(0)
    den = toy_denoiser(base)
    events = []
    trainer = Trainer(den, concept_problem(), TrainConfig(**TINY), callbacks=[events.append])
    real_predict = den.predict
    calls = {"n": 0}

    def flaky(x, t, cond, adapted=True):
        out = real_predict(x, t, cond, adapted)
        if adapted and torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 7:  # one poisoned training forward
                return out * float("nan")
        return out

    den.predict = flaky
    res = trainer.run()
    nans = [e for e in events if e["type"] == "nan"]
    assert len(nans) == 1 and nans[0]["step"] == 6 and nans[0]["restored_to_step"] == 3
    assert all(torch.isfinite(v).all() for v in den.adapter_state().values())
    assert all(math.isfinite(x) for x in res.lambdas)


def test_persistent_nan_gives_up_with_advice(base):
    torch.manual_seed(0)
    den = toy_denoiser(base)
    real_predict = den.predict
    poison = lambda adapted: float("nan") if adapted and torch.is_grad_enabled() else 1.0  # noqa: E731
    den.predict = lambda x, t, c, adapted=True: real_predict(x, t, c, adapted) * poison(adapted)
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        Trainer(den, concept_problem(), TrainConfig(**{**TINY, "max_bad_steps": 3})).run()


def test_nan_in_the_frozen_model_is_a_clear_error(base):
    torch.manual_seed(0)
    den = toy_denoiser(base)
    real_predict = den.predict
    den.predict = lambda x, t, c, adapted=True: real_predict(x, t, c, adapted) * (1.0 if adapted else float("nan"))
    with pytest.raises(FloatingPointError, match="frozen model"):
        Trainer(den, concept_problem(), TrainConfig(**TINY)).run()


@pytest.mark.parametrize("kwargs, msg", [
    (dict(method="nope"), "unknown method 'nope'"),
    (dict(threshold=0.0), "threshold must be a positive number"),
    (dict(threshold=-2.0), "threshold must be a positive number"),
    (dict(lam_max=1.0), r"must be in \(0, 1\)"),
    (dict(lam_max=1.5), r"must be in \(0, 1\)"),
    (dict(method="esd"), "needs fixed_weight"),
    (dict(lam_init=0.99), "outside"),
])
def test_bad_problem_settings_are_refused(kwargs, msg):
    method = kwargs.pop("method", "ru")
    with pytest.raises(ValueError, match=msg):
        concept_problem(method, **kwargs)


def test_empty_concept_and_concept_equal_to_anchor_are_refused():
    with pytest.raises(ValueError, match="empty"):
        Problem("ru", concepts=[ConceptSpec("  ")])
    with pytest.raises(ValueError, match="equals its anchor"):
        Problem("ru", concepts=[ConceptSpec("cat", "cat")])


def test_data_method_without_data_is_refused():
    with pytest.raises(ValueError, match="unlearns data"):
        Problem("fu")
    with pytest.raises(ValueError, match="forget set is empty"):
        Problem("fu", data=DataSpec(torch.zeros(0, 2), torch.zeros(4, 2)))


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="dual_estimate"):
        TrainConfig(dual_estimate="psychic")


def test_several_wordings_share_one_constraint_and_one_lambda(base):
    torch.manual_seed(0)
    den = toy_denoiser(base)
    prob = Problem("ru", concepts=[ConceptSpec(["q", "concept"], "p0")], threshold=1.0)
    trainer = Trainer(den, prob, TrainConfig(**TINY))
    res = trainer.run()
    assert len(trainer.terms) == 2 and {t["ci"] for t in trainer.terms} == {0}
    assert len(res.lambdas) == 1 and len(res.final_estimates) == 1
    # both wordings name the same toy prompt, so the shared calibration equals a single wording's
    torch.manual_seed(0)
    big = {**TINY, "estimate_samples": 2048}  # 512 trajectories per wording: the estimates' noise is a few %
    pair = Trainer(toy_denoiser(base), prob, TrainConfig(**big)).calibrate()[0]
    single = Trainer(toy_denoiser(base), Problem("ru", concepts=[ConceptSpec("q", "p0")], threshold=1.0),
                     TrainConfig(**big, seed=1))
    assert pair == pytest.approx(single.calibrate()[0], rel=0.1)


def test_an_empty_wording_is_refused():
    with pytest.raises(ValueError, match="empty"):
        Problem("ru", concepts=[ConceptSpec(["three", ""])])


def test_rollout_many_draws_like_rollout_for_one_prompt_and_batches_several(base):
    from unlearn_core.denoiser import predict_groups, rollout, rollout_many

    den = toy_denoiser(base)
    cond = den.encode(["q"])
    one, ts1 = rollout(den, cond, 5, 10, torch.Generator().manual_seed(3), guidance=2.0, uncond=den.encode(["p0"]))
    (many,), ts2 = rollout_many(den, [cond], [5], 10, torch.Generator().manual_seed(3), guidance=2.0,
                                uncond=den.encode(["p0"]))
    torch.testing.assert_close(one, many, rtol=0, atol=0)
    assert torch.equal(ts1, ts2)
    parts, ts = rollout_many(den, [den.encode(["q"]), den.encode(["p0"])], [3, 4], 10, torch.Generator().manual_seed(3))
    assert [p.shape[:2] for p in parts] == [(11, 3), (11, 4)]
    # each trajectory follows its own prompt: a batched jump equals the per-prompt jump from the same state
    x, t = parts[1][4], torch.full((4,), int(ts[4]))
    grouped = predict_groups(den, [(parts[0][4], t[:3], den.encode(["q"])), (x, t, den.encode(["p0"]))], adapted=True)
    torch.testing.assert_close(grouped[1], den.predict(x, t, den.encode(["p0"])), rtol=1e-5, atol=1e-6)


def test_rollouts_start_where_asked_and_a_dominant_first_jump_is_reported():
    from unlearn_core.schedule import NoiseSchedule

    s = NoiseSchedule.cosine(1000)
    ts = s.rollout_timesteps(50)
    assert int(ts[0]) == 999 and s.first_jump_dominance(ts) > 1e4  # ᾱ ≈ 2e-9 at the capped last step
    ts = s.rollout_timesteps(50, t_max=925)
    assert int(ts[0]) == 925 and int(ts[-1]) == -1 and s.first_jump_dominance(ts) < 10
    with pytest.raises(ValueError, match="t_max"):
        s.rollout_timesteps(10, t_max=1000)


def test_trainer_warns_when_the_first_jump_dominates_the_path_kl(base):
    from unlearn_core.schedule import NoiseSchedule
    from unlearn_core.toy import toy_denoiser as make

    den = make(base)
    den.schedule = NoiseSchedule.cosine(100)
    events = []
    Trainer(den, concept_problem("ru"), TrainConfig(**{**TINY, "steps": 4}), callbacks=[events.append]).run()
    assert any(e["type"] == "warning" and "first jump" in e["message"] for e in events)
    events.clear()
    Trainer(den, concept_problem("ru"), TrainConfig(**{**TINY, "steps": 4, "rollout_t_max": 90}),
            callbacks=[events.append]).run()
    assert not any(e["type"] == "warning" for e in events)


def test_dual_warmup_holds_lambda_then_updates_and_polish_records_are_marked(base):
    _, res, _ = run(base, concept_problem("ru", threshold=5.0), steps=20, dual_every=2, dual_warmup=0.4,
                    polish_fraction=0.2)
    duals = [h for h in res.history if "lambda" in h]
    assert duals and min(h["step"] for h in duals) >= 8  # no dual update during the first 40 % of the steps
    assert all(h.get("polished") for h in res.history if h["step"] >= 16)
    assert not any(h.get("polished") for h in res.history if h["step"] < 16)
    with pytest.raises(ValueError, match="dual_warmup"):
        TrainConfig(dual_warmup=0.9, polish_fraction=0.2)


def test_lu_reads_nothing_while_the_polish_holds_its_lambda_and_trains_as_if_it_had(base, monkeypatch):
    """LU's dual read (a NELBO sum per state under two prompts) would move nothing in the polish, where λ and μ are
    frozen: it is skipped there — no dual record — and the run is otherwise the one that reads (to the bit)."""
    import unlearn_core.trainer as trainer_module

    reads = []
    real = trainer_module.log_ratio
    monkeypatch.setattr(trainer_module, "log_ratio", lambda *a, **k: reads.append(1) or real(*a, **k))

    class ReadsInThePolish(Trainer):  # the loop before the skip: every dual update past the warm-up reads
        def _dual_update(self, stats, rec):
            polished = rec.pop("polished", None)
            super()._dual_update(stats, rec)
            if polished:
                rec["polished"] = polished

    cfg = TrainConfig(seed=0, **{**TINY, "steps": 20, "dual_every": 2, "dual_warmup": 0.2, "polish_fraction": 0.2})
    out = {}
    for cls in (Trainer, ReadsInThePolish):
        torch.manual_seed(0)
        den, n0 = toy_denoiser(base), len(reads)
        res = cls(den, concept_problem("lu", threshold=2.0), cfg).run()
        out[cls] = den, res, len(reads) - n0
    (d_skip, r_skip, n_skip), (d_read, r_read, n_read) = out.values()
    assert not any("lambda" in h for h in r_skip.history if h.get("polished"))  # steps 16–19: two updates, no read
    assert sum("estimate" in h for h in r_read.history if h.get("polished")) == 2
    assert n_read - n_skip == 2
    assert [h for h in r_skip.history if not h.get("polished")] == [h for h in r_read.history if not h.get("polished")]
    assert r_skip.lambdas == r_read.lambdas and r_skip.final_estimates == r_read.final_estimates
    for k, v in d_skip.adapter_state().items():
        torch.testing.assert_close(v, d_read.adapter_state()[k], rtol=0, atol=0)


def test_closed_form_initial_lambda_puts_the_target_on_the_threshold(base):
    """lam_init="closed": λ0 = 1 − 1/√x for a threshold of x × the separation. On any anchor states the RU target
    at λ0 is then exactly x times as far (in path KL) from the concept as the anchor's ε is."""
    torch.manual_seed(0)
    prob = Problem("ru", concepts=[ConceptSpec("q", "p0"), ConceptSpec("concept", "p0")], threshold=[2.25, 0.8],
                   threshold_mode="multiple", lam_init="closed")
    tr = Trainer(toy_denoiser(base), prob, TrainConfig(seed=0, **TINY))
    tr.calibrate()
    tr._make_constraints()
    lam0 = [c.dual.value for c in tr.constraints]
    assert lam0 == [pytest.approx(1 / 3), 0.0]  # x = 0.8 ≤ 1: λ = 0 already meets it
    term = tr.terms[0]
    states, ts, w = tr._rollout_many([term["anchor"]], [32], adapted=False)
    t = ts[:-1].repeat_interleave(32)
    x = states[0][:-1].reshape(-1, *states[0].shape[2:])
    e0, eq = tr._frozen(x, t, [term["anchor"], term["concept"]])
    c = w.repeat_interleave(32)
    sep = float(path_kl_terms(e0, eq, c).sum())
    at_target = float(path_kl_terms(reverse_kl_target(e0, eq, lam0[0]), eq, c).sum())
    assert at_target == pytest.approx(2.25 * sep, rel=1e-5)
    # a run starts there: the dual warm-up holds λ at λ0
    _, res, _ = run(base, prob, steps=8, dual_every=2, dual_warmup=0.5, polish_fraction=0.0)
    first = min((h for h in res.history if "lambda" in h), key=lambda h: h["step"])
    expect = [min(max(lam + 0.05 * sl / sep, 0.0), prob.lam_hi)  # one dual step (TrainConfig's dual_lr) from λ0
              for lam, sl, sep in zip(lam0, first["slack"], res.separation)]
    assert first["step"] == 5 and first["lambda"] == pytest.approx(expect, rel=1e-9)
    with pytest.raises(ValueError, match="'closed' is the reverse-KL target's"):
        concept_problem("lu", lam_init="closed")
    with pytest.raises(ValueError, match="a number, 'closed' or 'target'"):
        concept_problem("ru", lam_init="warm")


class PathKLSpy(Trainer):
    """Records (step, value, states read, whether autograd tracked the adapted ε) of every path-KL read."""

    def _concept_loss(self, step, stats):
        self.now = step
        return super()._concept_loss(step, stats)

    def _path_kl(self, buf, eps_a, eps_b, t, c):
        v = super()._path_kl(buf, eps_a, eps_b, t, c)
        self.seen.append((self.now, v, len(t), eps_a.requires_grad))
        return v


@pytest.mark.parametrize("fresh_steps", [1, 2])
def test_fresh_dual_estimate_reads_only_states_the_adapter_has_not_trained_on(base, fresh_steps):
    """dual_estimate "fresh": λ steps on the mean path KL of the first ``fresh_steps`` steps after each refresh
    (draws from trajectories the adapter has not, or barely, been trained on); a window without a refresh reuses the
    latest such value."""

    torch.manual_seed(0)
    cfg = TrainConfig(seed=0, **{**TINY, "steps": 24, "dual_every": 3, "refresh_every": 6, "dual_estimate": "fresh",
                                 "fresh_steps": fresh_steps})
    spy = PathKLSpy(toy_denoiser(base), concept_problem("ru", threshold=3.0), cfg)
    spy.seen = []
    res = spy.run()
    per_step = {s: v for s, v, _n, _g in spy.seen}  # one wording, one constraint, no kept prompts: one value per step
    assert sorted(per_step) == list(range(24))
    duals = [h for h in res.history if "lambda" in h]
    assert len(duals) == 8
    latest = None
    for h in duals:
        window = [h["step"] - 2, h["step"] - 1, h["step"]]
        fresh = [per_step[s] for s in window if s % 6 < fresh_steps]
        latest = sum(fresh) / len(fresh) if fresh else latest
        assert h["estimate"][0] == pytest.approx(latest, rel=1e-12)
        assert h["stale_estimate"][0] == pytest.approx(sum(per_step[s] for s in window) / 3)
    assert len({h["estimate"][0] for h in duals}) == 4  # four refreshes, each estimate used by two windows
    with pytest.raises(ValueError, match="fresh_steps must be an integer in"):
        TrainConfig(refresh_every=6, fresh_steps=7)


def test_fresh_samples_add_unseen_states_to_the_fresh_estimate_weighted_by_count(base):
    """fresh_samples: at each refresh the path KL is also read on that many more states of the new trajectories
    (no gradient step); the fresh estimate is the count-weighted mean of those and the refresh step's own draws."""
    torch.manual_seed(0)
    cfg = TrainConfig(seed=0, **{**TINY, "steps": 24, "dual_every": 3, "refresh_every": 6, "dual_estimate": "fresh",
                                 "fresh_samples": 5})
    spy = PathKLSpy(toy_denoiser(base), concept_problem("ru", threshold=3.0), cfg)
    spy.seen = []
    res = spy.run()
    extra = {s: v for s, v, n, grad in spy.seen if n == 5}
    own = {s: v for s, v, n, _ in spy.seen if n == 64}
    assert sorted(extra) == [0, 6, 12, 18] and sorted(own) == list(range(24))
    assert not any(grad for s, v, n, grad in spy.seen if n == 5)  # read without autograd
    duals = [h for h in res.history if "lambda" in h]
    for h in duals:
        r = h["step"] // 6 * 6
        assert h["estimate"][0] == pytest.approx((5 * extra[r] + 64 * own[r]) / 69, rel=1e-12)
    # the extra draws are not the step's own: the two reads differ once the adapter has moved (at step 0 both are 0)
    assert all(extra[r] != own[r] for r in extra if r > 0)
    with pytest.raises(ValueError, match="fresh_samples must be an integer >= 0"):
        TrainConfig(fresh_samples=-1)


def test_fresh_samples_are_not_read_where_no_dual_step_uses_them_and_the_run_is_the_same(base):
    """Inside the dual warm-up the extra fresh reads feed no dual step (their window closes before it ends): they
    are skipped, their draws still taken, so the run is the one that read them (the same λ's, the same adapter)."""
    cfg = TrainConfig(seed=0, **{**TINY, "steps": 24, "dual_every": 3, "refresh_every": 6, "dual_estimate": "fresh",
                                 "fresh_samples": 5, "dual_warmup": 0.5, "polish_fraction": 0.0})  # warm-up: 12 steps
    runs = []
    for always in (False, True):
        torch.manual_seed(0)
        spy = PathKLSpy(toy_denoiser(base), concept_problem("ru", threshold=3.0), cfg)
        if always:  # every refresh reads, as if its window closed after the warm-up
            spy._fresh_extra = lambda stats, step, _f=spy._fresh_extra: _f(stats, cfg.steps)
        spy.seen = []
        runs.append((spy, spy.run()))
    (skip, r1), (read, r2) = runs
    assert sorted(s for s, _, n, _ in skip.seen if n == 5) == [12, 18]  # refreshes 0 and 6 close at 3 and 9
    assert sorted(s for s, _, n, _ in read.seen if n == 5) == [0, 6, 12, 18]
    assert [h.get("lambda") for h in r1.history] == [h.get("lambda") for h in r2.history]
    assert any(h.get("lambda", [0])[0] > 0 for h in r1.history)
    for k, v in skip.d.adapter_state().items():
        torch.testing.assert_close(v, read.d.adapter_state()[k], rtol=0, atol=0)


@pytest.mark.parametrize("make", [lambda: concept_problem("ru"), lambda: concept_problem("lu"),
                                  lambda: concept_problem("lu", lam_init="target"), lambda: data_problem("fu")])
def test_a_run_resumed_from_a_checkpoint_through_a_file_reproduces_the_uninterrupted_run(base, make, tmp_path):
    cfg = dict(TINY, steps=16, checkpoint_every=4, polish_fraction=0.25)
    d_full, r_full, _ = run(base, make(), **cfg)
    # the interrupted run: checkpoints every 4 steps, cancelled at step 10 (the last checkpoint is step 8)
    torch.manual_seed(0)
    saved, seen = [], []

    def keep(state):
        torch.save(state, tmp_path / "ckpt.pt")
        saved.append(state["step"])

    t1 = Trainer(toy_denoiser(base), make(), TrainConfig(seed=0, **cfg), callbacks=[seen.append], on_checkpoint=keep,
                 should_stop=lambda: sum(e["type"] == "step" for e in seen) >= 10)
    assert t1.run().cancelled
    assert saved == [4, 8]
    # a fresh process: new denoiser (other random init), new trainer; only the file carries the state
    torch.manual_seed(123)
    d2 = toy_denoiser(base)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    events2 = []
    r2 = Trainer(d2, make(), TrainConfig(seed=0, **cfg), callbacks=[events2.append]).run(resume=state)
    assert r2.steps_done == 16 and not r2.cancelled
    assert not any(e["type"] == "target_solve" for e in events2)  # LU's solved start comes with the checkpoint
    assert r2.lambdas == r_full.lambdas
    assert [h["step"] for h in r2.history] == list(range(16))
    for k, v in d_full.adapter_state().items():
        torch.testing.assert_close(d2.adapter_state()[k], v, rtol=0, atol=0)


def test_checkpoint_interval_rounds_up_to_whole_dual_and_refresh_periods():
    assert TrainConfig(**{**TINY, "dual_every": 5, "refresh_every": 20, "checkpoint_every": 7}).checkpoint_interval == 20
    assert TrainConfig(**{**TINY, "dual_every": 5, "refresh_every": 20, "checkpoint_every": 0}).checkpoint_interval == 0
    with pytest.raises(ValueError, match="checkpoint_every"):
        TrainConfig(**{**TINY, "checkpoint_every": -1})


def test_resume_refuses_a_checkpoint_of_another_run(base):
    states = []
    cfg = dict(TINY, checkpoint_every=4)
    torch.manual_seed(0)
    Trainer(toy_denoiser(base), concept_problem(), TrainConfig(**cfg), on_checkpoint=states.append).run()
    state = states[-1]
    with pytest.raises(ValueError, match="other training options: lr"):
        Trainer(toy_denoiser(base), concept_problem(), TrainConfig(**{**cfg, "lr": 5e-3})).run(resume=state)
    with pytest.raises(ValueError, match="method 'ru'"):
        Trainer(toy_denoiser(base), concept_problem("lu"), TrainConfig(**cfg)).run(resume=state)
    with pytest.raises(ValueError, match="threshold"):
        Trainer(toy_denoiser(base), concept_problem(threshold=2.0), TrainConfig(**cfg)).run(resume=state)
    with pytest.raises(ValueError, match="not a ComfyUI-Unlearn trainer checkpoint"):
        Trainer(toy_denoiser(base), concept_problem(), TrainConfig(**cfg)).run(resume={"step": 3})


def test_nelbo_with_a_timestep_stride_is_unbiased_and_shares_noise_across_calls(base):
    """Every k-th timestep from a random offset, weighted ×k: the mean over draws matches the full sum (the toy's
    exact per-step terms are smooth in t), and two calls with the same generator seed agree exactly."""
    from unlearn_core.estimate import nelbo

    den = toy_denoiser(base)
    x0 = toy_mixtures()[1].sample(64, torch.Generator().manual_seed(1))
    cond = den.encode(["q"])
    full = nelbo(den, x0, cond, adapted=False, draws=8, generator=torch.Generator().manual_seed(2)).mean()
    strided = nelbo(den, x0, cond, adapted=False, draws=64, t_stride=10,
                    generator=torch.Generator().manual_seed(3)).mean()
    assert abs(float(strided / full) - 1) < 0.03, (float(strided), float(full))
    a = nelbo(den, x0, cond, adapted=False, t_stride=10, generator=torch.Generator().manual_seed(4))
    b = nelbo(den, x0, cond, adapted=False, t_stride=10, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="t_stride"):
        nelbo(den, x0, cond, adapted=False, t_stride=0)


def test_fus_base_and_achieved_reads_take_more_draws_at_a_timestep_stride(base):
    """Every FU request is a fraction of the forget set's base NELBO: at a stride that one read takes up to 8 draws
    (on the demo one draw read 473–584 nats over three seeds, eight 569–579: docs/benchmarks/frontier-2026-12-07c/d),
    at stride 1 it keeps estimate_draws. The achieved read (adapted and frozen, with shared noise) takes as many
    at a stride, and two at stride 1."""
    visits, final = {}, {}
    for stride in (1, 10, 40):
        den = toy_denoiser(base)
        count = [0]
        predict = den.predict

        def counting(x_t, t, cond, adapted=True, _p=predict, _c=count):
            _c[0] += x_t.shape[0]
            return _p(x_t, t, cond, adapted)

        den.predict = counting
        tr = Trainer(den, data_problem(), TrainConfig(**{**TINY, "elbo_stride": stride}))
        tr.calibrate()
        visits[stride] = count[0] / 128  # per forget sample
        count[0] = 0
        tr.estimate_constraints()
        final[stride] = count[0] / 128 / 2  # per forget sample and model
    n_t = toy_denoiser(base).schedule.num_steps
    assert visits[1] == n_t  # one draw over every timestep
    assert final[1] == 2 * n_t
    for stride in (10, 40):  # min(stride, 8) draws of the head and, on average, the rest / stride
        assert visits[stride] == pytest.approx(8 * (stride // 5 + (n_t - stride // 5) / stride), rel=0.03)
        assert final[stride] == pytest.approx(visits[stride], rel=0.03)


class _Revealing:
    """A stand-in denoiser that, at x0 = 0, returns the drawn noise plus ``bump(t)``: each visit of t adds exactly
    c_t × weight × dim × bump(t)² to a sample's NELBO, so the timesteps a sample visited can be read off its sum."""

    def __init__(self, schedule, bump):
        self.schedule, self.bump, self.max_batch = schedule, bump, None

    def predict(self, x_t, t, cond, adapted=True):
        t = torch.as_tensor(t).long().expand(x_t.shape[0])
        a = self.schedule.alphas_cumprod[t].to(x_t).reshape(-1, *[1] * (x_t.dim() - 1))
        return x_t / (1 - a).sqrt() + self.bump(t).to(x_t).reshape(-1, *[1] * (x_t.dim() - 1))


def test_a_strided_nelbo_visits_the_smallest_timesteps_every_draw_and_draws_an_offset_per_sample(base):
    """The t_stride // 5 smallest timesteps (the largest weights) are visited by every sample at weight 1; above
    them each sample visits every t_stride-th timestep from its *own* offset. With one offset for the whole batch
    a batch mean was one offset's heavy-tailed draw: on the demo 80 % of the offsets read LU's E[r] short of its
    sum (benchmarks/stride_noise.py)."""
    from unlearn_core.estimate import all_jumps, nelbo

    sched = toy_denoiser(base).schedule
    stride, n = 10, 200
    head = stride // 5
    _t, _s, c = all_jumps(toy_denoiser(base))
    x0 = torch.zeros(n, 2)
    g = torch.Generator().manual_seed(5)
    # the head only: every sample visits each of t = 0 .. head − 1 exactly once, at weight 1
    only_head = _Revealing(sched, lambda t: (t < head).double())
    got = nelbo(only_head, x0, None, adapted=False, t_stride=stride, batch_t=3, generator=g)
    assert torch.allclose(got, torch.full((n,), 2 * float(c[:head].sum()), dtype=torch.float64))
    # the first stride-block above the head: each sample visits exactly one of its timesteps, head + its offset
    block = _Revealing(sched, lambda t: ((t >= head) & (t < head + stride)).double())
    got = nelbo(block, x0, None, adapted=False, t_stride=stride, batch_t=3, generator=g)
    offsets = [min(range(stride), key=lambda o: abs(2 * stride * float(c[head + o]) - float(v))) for v in got]
    assert torch.allclose(got, torch.tensor([2 * stride * float(c[head + o]) for o in offsets], dtype=torch.float64))
    counts = torch.bincount(torch.tensor(offsets), minlength=stride)
    assert (counts > 0).all() and counts.max() < n / 4, counts  # every offset drawn, none for the whole batch
    # unbiased: over the batch, the block's sum (weighted ×stride at one timestep per sample) averages to its own
    # sum over every timestep (sd of the batch mean here: 3 %)
    assert abs(float(got.mean()) / (2 * float(c[head:head + stride].sum())) - 1) < 0.12


def test_bounded_forward_batches_change_no_estimate(base):
    """A denoiser's ``max_batch`` splits calibration, NELBO and the final estimates into smaller forwards; the
    numbers stay the same (up to float summation order)."""
    out = []
    for cap in (None, 7):
        torch.manual_seed(0)
        den = toy_denoiser(base)
        den.max_batch = cap
        tr = Trainer(den, concept_problem("lu"), TrainConfig(seed=0, **TINY))
        tr.calibrate()
        tr._make_constraints()
        d2 = toy_denoiser(base)
        d2.max_batch = cap
        fu = Trainer(d2, data_problem("fu"), TrainConfig(seed=0, **TINY))
        fu.calibrate()
        out.append((tr.calibration + tr.separation + tr.estimate_constraints(), fu.separation))
    for x, y in zip(out[0], out[1]):
        assert x == pytest.approx(y, rel=1e-4)


def _recording(den, sizes):
    predict = den.predict

    def wrapped(x, t, cond, adapted=True):
        if adapted and torch.is_grad_enabled():
            sizes.append(x.shape[0])
        return predict(x, t, cond, adapted)

    den.predict = wrapped
    return den


MICRO_CASES = [
    lambda: Problem("ru", concepts=[ConceptSpec(["q", "concept"], "p0")], keep=[""], threshold=1.0),
    lambda: Problem("lu", concepts=[ConceptSpec(["q", "concept"], "p0")], keep=[""], threshold=1.0),
    lambda: Problem("lu-lik", concepts=[ConceptSpec(["q", "concept"], "p0")], keep=[""], threshold=1.0),
    lambda: data_problem("fu"), lambda: data_problem("siss", fixed_weight=0.2)]


@pytest.mark.parametrize("make", MICRO_CASES)
def test_micro_batches_bound_the_trained_forward_and_accumulate_the_same_gradient(base, make):
    """micro_batch = 5 splits a step's trained samples (two wordings × 32 + 64 of the kept prompt; FU: 64 retain + 64
    forget; SISS: 64 mixed) into forwards of at most 5, straddling the groups; the accumulated gradient of one step
    (at λ = 0.3 and μ = 0.5, so every term of the target counts) is the one-forward gradient up to rounding."""
    grads, sizes = [], []
    for micro in (None, 5):
        torch.manual_seed(0)
        sizes.append([])
        den = _recording(toy_denoiser(base), sizes[-1])
        tr = Trainer(den, make(), TrainConfig(seed=0, micro_batch=micro, **TINY))
        tr.calibrate()
        tr._make_constraints()
        for c in tr.constraints:
            c.dual.value = 0.2 if c.dual.frozen else 0.3
        for c in tr.keep_constraints:
            c.dual.value = 0.5
        tr.opt.zero_grad(set_to_none=True)
        loss = tr._concept_loss(0, {}) if tr.spec.kind == "concept" else tr._data_loss(0, {})
        grads.append((float(loss), [p.grad.clone() for p in den.trainable_parameters()]))
    (l1, g1), (l2, g2) = grads
    assert max(sizes[1]) <= 5 and max(sizes[0]) >= 64
    assert len(sizes[1]) >= 13  # 64 samples / 5: 13 forwards (concepts and FU: 128 / 5)
    # Loss and gradient are built from ε − target, a difference much smaller than either term, so float32 rounding
    # that depends on the forward's batch size (GEMM blocking) is amplified: on one CPU it reached 1.0e-5 of the loss
    # and 1.8e-5 of the largest gradient entry (in a near-zero entry). A wrongly weighted or dropped micro-batch
    # moves both by percents.
    assert l2 == pytest.approx(l1, rel=1e-4)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


@pytest.mark.parametrize("make", MICRO_CASES[:2] + MICRO_CASES[3:4])
def test_micro_batched_runs_follow_the_one_forward_run(base, make):
    """Whole runs agree too (Adam divides by the gradient's running scale, which lifts rounding in near-zero
    gradient entries, so the adapter is compared at a tolerance relative to its largest entry)."""
    runs = []
    for micro in (None, 5):
        torch.manual_seed(0)
        den = toy_denoiser(base)
        runs.append((den, Trainer(den, make(), TrainConfig(seed=0, micro_batch=micro, **TINY)).run()))
    (d1, r1), (d2, r2) = runs
    assert r2.lambdas == pytest.approx(r1.lambdas, rel=1e-3, abs=1e-5)
    assert [h["loss"] for h in r2.history] == pytest.approx([h["loss"] for h in r1.history], rel=1e-3, abs=1e-6)
    for k, v in d1.adapter_state().items():
        torch.testing.assert_close(d2.adapter_state()[k], v, rtol=0, atol=1e-2 * float(v.abs().max()))


def test_micro_batch_is_checked_and_does_not_block_a_resume(base):
    with pytest.raises(ValueError, match="micro_batch"):
        TrainConfig(**{**TINY, "micro_batch": 0})
    assert TrainConfig(**TINY, micro_batch=4).fingerprint() == TrainConfig(**TINY).fingerprint()


@pytest.mark.parametrize("method", ["ru", "lu"])
def test_a_concept_duals_step_is_scaled_by_the_separation_so_it_grows_with_the_request(base, method):
    """RU's and LU's dual steps are lr × slack / separation. At the frozen model (λ = 0: the anchor's distribution)
    the slack of x × the separation is (x − 1) × the separation for both, so asking for 3× instead of 2× doubles the
    first step. (Scaled by the request's distance instead, LU's λ moved at most lr per update whatever it was
    asked for, and stayed at 0.2–0.3 on the demo where 0.5–0.7 was needed.)"""
    steps = []
    for x in (2.0, 3.0):
        tr = Trainer(toy_denoiser(base), concept_problem(method, threshold=x, threshold_mode="multiple"),
                     TrainConfig(seed=0, **TINY))
        tr.calibrate()
        tr._make_constraints()
        (c,) = tr.constraints
        sep = abs(tr.separation[0])
        assert c.dual.scale == pytest.approx(sep)
        assert c.slack(tr.calibration[0]) == pytest.approx((x - 1.0) * sep, rel=1e-6)
        steps.append(c.update(tr.calibration[0]))  # from λ = 0
    assert steps == [pytest.approx(TINY.get("dual_lr", TrainConfig().dual_lr) * (x - 1.0), rel=1e-6)
                     for x in (2.0, 3.0)]


def test_a_guided_prompt_equal_to_the_unconditional_one_costs_one_forward_and_hands_back_its_eps(base):
    """rollout_many: a guided prompt that equals ``uncond`` (the usual anchor, "") is its own guided ε, so its
    trajectories pay one sample-forward per jump, not two, and follow exactly the unguided ones; ``with_eps`` hands
    back each prompt's conditional ε at every state (what the calibration would otherwise forward again)."""
    from unlearn_core.denoiser import rollout_many

    den = toy_denoiser(base)
    sizes = []
    predict = den.predict
    den.predict = lambda x, t, c, adapted=True: (sizes.append(x.shape[0]), predict(x, t, c, adapted))[1]
    q, p0, uncond = den.encode(["q"]), den.encode(["p0"]), den.encode(["p0"])  # equal values, not one object
    parts, ts, eps = rollout_many(den, [q, p0], [3, 4], 10, torch.Generator().manual_seed(3), guidance=2.0,
                                  uncond=uncond, with_eps=True)
    assert sum(sizes) == 10 * (3 + 7)  # per jump: q's conditional branch and everyone's unconditional one
    sizes.clear()
    (alone,), _ = rollout_many(den, [p0], [4], 10, torch.Generator().manual_seed(3), guidance=2.0, uncond=uncond)
    (plain,), _ = rollout_many(den, [p0], [4], 10, torch.Generator().manual_seed(3))
    assert sum(sizes) == 2 * 10 * 4
    torch.testing.assert_close(alone, plain, rtol=0, atol=0)
    assert [e.shape[:2] for e in eps] == [(10, 3), (10, 4)]
    for states, e, c in zip(parts, eps, (q, p0)):
        for j in (0, 4, 9):
            t = torch.full((states.shape[1],), int(ts[j]))
            torch.testing.assert_close(e[j], predict(states[j], t, c), rtol=1e-5, atol=1e-6)


def test_the_separation_reads_the_anchor_eps_off_its_rollout_and_the_wordings_at_a_stride(base):
    """Calibration: at stride 1 the separation is the anchor trajectories' mean path KL between the anchor's and the
    wording's ε over every jump (computed here by plain forwards); at a stride it reads about 1/stride of the
    wording forwards, unbiased (an offset per trajectory, ×stride)."""
    prob = Problem("ru", concepts=[ConceptSpec("q", "p0")], threshold=1.0)

    def calibrated(stride, samples=64):
        den = toy_denoiser(base)
        sizes = []
        predict = den.predict
        den.predict = lambda x, t, c, adapted=True: (sizes.append(x.shape[0]), predict(x, t, c, adapted))[1]
        tr = Trainer(den, prob, TrainConfig(**{**TINY, "estimate_samples": samples, "calibration_stride": stride}))
        tr.calibrate()
        return tr, tr.separation[0], sum(sizes)

    tr, sep, forwards = calibrated(1)
    ref = Trainer(toy_denoiser(base), prob, TrainConfig(**TINY))  # the same seed: the same anchor trajectories
    term = ref.terms[0]
    (states,), ts, w = ref._rollout_many([term["anchor"]], [32], adapted=False)
    J = len(ts) - 1
    x, t, c = states[:-1].reshape(-1, *states.shape[2:]), ts[:-1].repeat_interleave(32), w.repeat_interleave(32)
    e0, eq = ref._frozen(x, t, [term["anchor"], term["concept"]])
    assert sep == pytest.approx(float(path_kl_terms(e0, eq, c).sum()) / 32, rel=1e-5)
    assert forwards == 2 * J * 32  # the anchor's rollout, then the wording at every state
    _, sep4, forwards4 = calibrated(4)
    assert forwards4 - J * 32 == pytest.approx(J * 32 / 4, rel=0.1)
    # unbiased: with 1024 trajectories the offsets' noise is ~1 %; the same trajectories as stride 1's
    _, big1, _ = calibrated(1, samples=2048)
    _, big4, _ = calibrated(4, samples=2048)
    assert big4 == pytest.approx(big1, rel=0.03)
    # a stride past the rollout's jumps reads one jump per trajectory, never none (2 jumps, stride 3: a zero
    # separation a third of the time otherwise)
    for seed in range(6):
        den = toy_denoiser(base)
        sizes = []
        predict = den.predict
        den.predict = lambda x, t, c, adapted=True, _p=predict, _s=sizes: (_s.append(x.shape[0]), _p(x, t, c, adapted))[1]
        tr = Trainer(den, prob, TrainConfig(**{**TINY, "rollout_jumps": 2, "calibration_stride": 3, "seed": seed}))
        tr.calibrate()
        assert sum(sizes) == 2 * 32 + 32 and tr.separation[0] > 0
    with pytest.raises(ValueError, match="calibration_stride"):
        TrainConfig(calibration_stride=0)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_a_rollout_on_given_conditional_eps_is_the_plain_rollout_when_they_are_the_models_own(base, guidance):
    """``rollout_many(cond_eps=…)`` steps with the ε it is handed (LU's target sampler hands it a closed-form
    target); handed the model's own conditional ε, it draws the very same trajectories as the plain rollout."""
    from unlearn_core.denoiser import rollout_many

    den = toy_denoiser(base)
    conds, null = [den.encode(["q"]), den.encode(["p0"])], den.encode([""])
    seen = []

    def own(parts, e_us):
        seen.append(e_us is None)
        if e_us is not None:
            assert [e.shape[0] for e in e_us] == [x.shape[0] for x, _ in parts] == [5, 3]
        return [den.predict(x, t, c, adapted=False) for (x, t), c in zip(parts, conds)]

    kw = dict(adapted=False, guidance=guidance, uncond=null)
    plain, ts = rollout_many(den, conds, [5, 3], 6, torch.Generator().manual_seed(1), **kw)
    handed, ts2 = rollout_many(den, conds, [5, 3], 6, torch.Generator().manual_seed(1), cond_eps=own, **kw)
    assert torch.equal(ts, ts2) and len(seen) == len(ts) - 1 and set(seen) == {guidance == 1.0}
    for a, b in zip(plain, handed):
        assert a.shape == b.shape == (len(ts), a.shape[1], 2)
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_lus_target_estimate_at_zero_reads_the_anchors_own_samples_and_falls_with_lambda(guidance):
    """At λ = 0 LU's closed-form target is the anchor's distribution: ``target_estimate`` then reads E[log-ratio]
    on exactly the anchor's rollout with the same noise; moving λ up tilts it away from the concept."""
    from unlearn_core import toy
    from unlearn_core.denoiser import rollout_many
    from unlearn_core.estimate import log_ratio

    den = toy_denoiser(toy.train_toy_base())
    tr = Trainer(den, concept_problem("lu", threshold=5.0), TrainConfig(seed=0, **TINY, rollout_jumps=20,
                                                                         guidance=guidance))
    got = tr.target_estimate([0.0], 64, seed=5)
    (states,), _ = rollout_many(den, [den.encode(["p0"])], [64], 20, torch.Generator().manual_seed(5), adapted=False,
                                guidance=guidance, uncond=den.encode([""]))
    want = float(log_ratio(den, states[-1], den.encode(["q"]), den.encode(["p0"]), adapted=False, seed=6).mean())
    assert got == [pytest.approx(want, rel=1e-5)]
    assert tr.target_estimate([0.5], 64, seed=5)[0] < want - 1.0


def test_lu_solves_its_lambda_on_the_closed_form_target_where_the_toys_oracle_puts_it():
    """lam_init="target": before training, LU's λ is solved where its closed-form target's own samples meet the
    threshold — on the toy within 10 % of the oracle's λ* (the exact composed sampler, exact log densities; 1200
    steps of primal–dual land within 20 %: tests/test_toy_oracle.py) — and the run starts its dual there."""
    from unlearn_core import toy

    base = toy.train_toy_base()
    lam_star = toy.lambda_star("likelihood_ratio", 10.0)
    torch.manual_seed(0)
    events = []
    cfg = dataclasses.replace(toy.toy_config("lu", 0, 4), dual_every=2, dual_warmup=0.5, polish_fraction=0.0)
    tr = Trainer(toy_denoiser(base), concept_problem("lu", threshold=10.0, lam_init="target"), cfg,
                 callbacks=[events.append])
    res = tr.run()
    solve = [e for e in events if e["type"] == "target_solve"]
    lam0 = tr.target_solve["lambdas"][0]
    assert len(solve) == 3 and solve[0]["lambdas"] == [0.0] and solve[1]["lambdas"] == [0.05]
    assert lam0 == pytest.approx(lam_star, rel=0.1), (lam0, lam_star)
    # read at the solved λ with the solve's own draws, the target meets the threshold within 5 % of the request
    b, base_read = solve[0]["thresholds"][0], solve[0]["estimates"][0]
    at = tr.target_estimate([lam0], tr.target_solve["samples_per_wording"], tr.target_solve["seed"])[0]
    assert abs(at - b) < 0.05 * (base_read - b), (at, b, base_read)
    first = next(h for h in res.history if "lambda" in h)  # held at λ0 through the warm-up, then one dual step
    assert first["step"] == 3 and first["lambda"][0] == pytest.approx(
        lam0 + cfg.dual_lr * first["slack"][0] / tr.constraints[0].dual.scale, rel=1e-9)
