"""The frontier benchmark's bookkeeping (benchmarks/frontier.py): aggregation over seeds and the verdicts at matched
forgetting, on synthetic rows (the benchmark itself is a script: `python benchmarks/frontier.py --quick`)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("frontier", Path(__file__).resolve().parents[1] / "benchmarks" / "frontier.py")
frontier = importlib.util.module_from_spec(spec)
spec.loader.exec_module(frontier)


def row(method, setting, seed, forget, retention, near=None, task="concept", **kw):
    return {"task": task, "method": method, "setting": setting, "seed": seed, "forget": forget,
            "retention": retention, "near_retention": retention if near is None else near, **kw}


def test_aggregate_gives_mean_and_sd_over_seeds_and_skips_failed_runs():
    rows = [row("ru", 2.0, 0, 0.9, 0.8), row("ru", 2.0, 1, 1.0, 0.9), {"task": "concept", "method": "ru",
                                                                         "setting": 2.0, "seed": 2, "error": "boom"}]
    agg = frontier.aggregate(rows)
    v = agg[("concept", "ru", 2.0)]
    assert v["runs"] == 2
    assert v["forget"][0] == pytest.approx(0.95) and v["forget"][1] == pytest.approx(math.sqrt(0.005))
    assert math.isnan(v["class_accuracy"][0])


def test_verdicts_read_our_frontier_at_the_baselines_forgetting():
    rows = [row("ru", 1.0, 0, 0.6, 0.95), row("ru", 3.0, 0, 1.0, 0.85),  # ours: linear from (0.6, .95) to (1, .85)
            row("esd", 0.5, 0, 0.8, 0.80),  # at 0.8 ours reads 0.90: above
            row("esd", 1.0, 0, 0.9, 0.95),  # at 0.9 ours reads 0.875: below
            row("esd", 2.0, 0, 0.4, 0.99)]  # outside our range, and none of ours keeps 0.99
    lines = [v for v in frontier.verdicts(frontier.aggregate(rows)) if "retention 0" in v or "retention" in v]
    ret = [v for v in lines if ", retention " in v or "on retention" in v]
    assert any("ESD 0.5" in v and "0.900 vs 0.800" in v and "above" in v for v in ret), ret
    assert any("ESD 1" in v and "0.875 vs 0.950" in v and "below" in v for v in ret), ret
    assert any("ESD 2" in v and "outside" in v and "no setting of ours dominates" in v for v in ret), ret


def test_a_baseline_point_beyond_our_range_is_dominated_only_if_one_of_ours_forgets_and_keeps_more():
    rows = [row("ru", 1.0, 0, 0.95, 0.9), row("esd", 1.0, 0, 0.5, 0.85)]
    v = [x for x in frontier.verdicts(frontier.aggregate(rows)) if "on retention" in x or "keeps retention" in x]
    assert v and "RU 1 forgets at least as much and keeps retention" in v[0]


def test_data_verdicts_compare_class_accuracy_and_skip_methods_without_runs():
    rows = [row("fu", 0.05, 0, 0.05, 0.9, task="data", class_accuracy=0.95),
            row("fu", 0.1, 0, 0.10, 0.9, task="data", class_accuracy=0.85),
            row("neggrad", 0.2, 0, 0.075, 0.9, task="data", class_accuracy=0.80)]
    v = frontier.verdicts(frontier.aggregate(rows))
    assert len(v) == 1 and "FU vs NEGGRAD 0.2" in v[0] and "class_accuracy 0.900 vs 0.800" in v[0] and "above" in v[0]


def test_resume_keeps_the_finished_runs_of_the_same_options_and_reruns_nothing(tmp_path, capsys):
    """A benchmark cut short is continued with --resume: runs.jsonl rows with the same options are kept (a line cut
    short by a kill is skipped), so a fully logged grid reruns nothing and still writes its summary and plots."""
    import json

    from unlearn_core.unlearn import DEFAULTS

    opts = {"n": 12, "eval_seed": 1000, "concept_steps": DEFAULTS["steps"], "data_steps": DEFAULTS["fu_steps"],
            "shared": frontier.SHARED}
    base = {"retention_before": 1.0, "near_retention_before": 1.0, "erased_rate_before": 1.0, "near_digits": [8, 9],
            "lambda": 0.3, "train_seconds": 1.0}
    rows = [row("ru", 2.0, 0, 0.9, 0.95, **base, achieved_over_requested=1.02),
            row("esd", 1.0, 0, 1.0, 0.80, **base)]
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps({"options": opts, "row": r}) + "\n" for r in rows)
                                         + '{"options": {"n"')
    assert frontier.main(["--grid", "ru=2;esd=1", "--seeds", "1", "--out", str(tmp_path), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "--resume: 2 finished runs kept" in out and "2 runs kept by --resume" in out
    summary = json.loads(out.strip().splitlines()[-1])
    assert {(g["method"], g["runs"]) for g in summary["groups"]} == {("ru", 1), ("esd", 1)}
    assert (tmp_path / "frontier_concept.png").exists()
    # other options: nothing is kept
    assert frontier.main(["--grid", "ru=2;esd=1", "--seeds", "1", "--out", str(tmp_path), "--resume", "-n", "5",
                          "--tasks", "data"]) == 0
    out = capsys.readouterr().out
    assert "--resume:" not in out and json.loads(out.strip().splitlines()[-1])["runs_kept_by_resume"] == 0


def test_dual_noise_counts_each_read_once_and_skips_the_polish_phase(tmp_path, capsys):
    """benchmarks/dual_noise.py: a read that serves two dual updates counts once; frozen (polished) updates and steps
    outside the window are left out; the spread is the sd of successive ratios."""
    spec_dn = importlib.util.spec_from_file_location(
        "dual_noise", Path(__file__).resolve().parents[1] / "benchmarks" / "dual_noise.py")
    dn = importlib.util.module_from_spec(spec_dn)
    spec_dn.loader.exec_module(dn)
    hist = [{"step": 49, "lambda": [0.1], "estimate": [999.0]},  # before the window
            {"step": 54, "lambda": [0.2], "estimate": [100.0]}, {"step": 59, "lambda": [0.3], "estimate": [100.0]},
            {"step": 64, "lambda": [0.25], "estimate": [200.0]}, {"step": 69, "lambda": [0.2], "estimate": [200.0]},
            {"step": 74, "lambda": [0.2], "estimate": [100.0]},
            {"step": 79, "lambda": [0.9], "estimate": [5.0], "polished": True}]
    run = tmp_path / "r" / "seven"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"constraints": [{"name": "seven"}], "dual_history": hist}))
    assert dn.reads(hist, 0, 54, 94) == [100.0, 200.0, 100.0]
    assert dn.main([str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (r,) = out["rows"]
    assert r["reads"] == 3 and r["spread"] == pytest.approx(0.75)  # ratios 2 and 0.5
    assert r["largest_lambda_drop"] == pytest.approx(0.05)
    with pytest.raises(SystemExit):
        dn.main([str(tmp_path / "nothing")])


def test_acceptance_erased_rates_use_the_base_models_seeds_and_strip_the_lora(tmp_path):
    """benchmarks/acceptance_cli.py judges each erased prompt on more samples than the rest (``--n-erased``): the
    base model's samples of the same seeds go to the shared cache, the LoRA's samples are judged, and the weights
    are the base model's again afterwards."""
    import torch

    from unlearn_core.demo import load_demo_model, load_judge
    from unlearn_core.evaluate import prompt_suite
    from unlearn_core.lora import LoraModule, save_lora

    spec_acc = importlib.util.spec_from_file_location(
        "acceptance_cli", Path(__file__).resolve().parents[1] / "benchmarks" / "acceptance_cli.py")
    acc = importlib.util.module_from_spec(spec_acc)
    spec_acc.loader.exec_module(acc)
    torch.manual_seed(0)
    model, judge = load_demo_model(), load_judge()
    weights = {k: v.clone() for k, v in model.unet.state_dict().items()}
    layers = {n: m for n, m in model.unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))}
    items = prompt_suite([3, 7])["erased"]
    rates = {}
    for scale in (0.0, 3.0):  # B = 0: the LoRA changes nothing; a large random one wrecks the cross-attention
        modules = {n: LoraModule(down=torch.randn(4, m.in_features), up=scale * torch.randn(m.out_features, 4),
                                 alpha=4.0) for n, m in layers.items()}
        path = save_lora(tmp_path / f"x{scale}.safetensors", modules, family="demo", dtype="fp32")
        cache: dict = {}
        rates[scale] = acc.erased_rates(model, judge, path, [3, 7], n=8, seed=5, base_cache=cache)
        assert sorted(cache) == sorted((p, 8, 5) for p, _ in items)
        base = [float((cache[(p, 8, 5)]["labels"] == k).float().mean()) for p, k in items]
        assert all(torch.equal(v, model.unet.state_dict()[k]) for k, v in weights.items())
    assert rates[0.0] == base and min(base) >= 0.75  # the base model draws its digits
    assert rates[3.0] != base, (rates, base)


def test_speed_amortises_the_refresh_steps_extra_work_over_the_refresh_interval():
    """benchmarks/speed.py: a refresh step pays its rollout and its extra reads once per refresh_every steps. Over
    two timed steps (a refresh and a plain one) the plain step, not their mean, is the per-step base; over whole
    cycles it comes to the mean of all steps plus the rollout's share."""
    spec_sp = importlib.util.spec_from_file_location("speed", Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py")
    sp = importlib.util.module_from_spec(spec_sp)
    spec_sp.loader.exec_module(sp)
    # rollout 10 s, the refresh step 6 s after it (1 s of step + 5 s of extra reads), a plain step 1 s
    two = [("calibration", 0.0), ("samples", 10.0), ("step", 16.0), ("step", 17.0)]
    m = sp.amortised(two, 0.0, 10)
    assert m["step_without_rollout_s"] == 1.0 and m["refresh_extra_s"] == 5.0 and m["rollout_s"] == 10.0
    assert m["s_per_step"] == pytest.approx(1.0 + (10.0 + 5.0) / 10)  # not (6 + 1) / 2 + 10 / 10 = 4.5
    cycle, clock = [], 0.0
    for _ in range(2):  # two whole cycles of 10 steps
        clock += 10.0
        cycle.append(("samples", clock))
        for k in range(10):
            clock += 6.0 if k == 0 else 1.0
            cycle.append(("step", clock))
    m = sp.amortised(cycle, 0.0, 10)
    assert m["steps_timed"] == 20 and m["s_per_step"] == pytest.approx((6.0 + 9 * 1.0) / 10 + 10.0 / 10)


def test_stride_noise_reads_the_spread_of_one_offset_for_the_batch_against_one_per_sample():
    """benchmarks/stride_noise.py, on synthetic per-timestep terms: one large term at t = 0 (as the ELBO weight c_0)
    makes a one-offset batch mean heavy-tailed — short of the mean for all offsets but one — while a dense head
    that covers t = 0 leaves almost none (the other terms are equal)."""
    import torch

    spec_sn = importlib.util.spec_from_file_location(
        "stride_noise", Path(__file__).resolve().parents[1] / "benchmarks" / "stride_noise.py")
    sn = importlib.util.module_from_spec(spec_sn)
    spec_sn.loader.exec_module(sn)
    R = torch.full((100, 4), 0.1, dtype=torch.float64)
    R[0] = 10.0
    res = sn.spread(R, 10)
    assert res["exact_mean"] == pytest.approx(10.0 + 99 * 0.1)
    assert res["one_offset_share_below_mean"] == pytest.approx(0.9)  # 9 of 10 offsets miss t = 0
    assert res["one_offset_median"] == pytest.approx(10 * 10 * 0.1)  # a missing offset: 10 visits × 0.1 × 10
    assert res["batch_sd_one_offset"] == pytest.approx(29.7)  # 109 once in 10, else 10, around a mean of 19.9
    heads = {h["head"]: h for h in res["heads"]}
    assert heads[0]["sd_per_sample"] == pytest.approx(29.7)
    # a head of 2 covers t = 0: what is left is the tail's uneven count (98 timesteps: 10 or 9 visits of 0.1 × 10)
    assert heads[2]["sd_per_sample"] == pytest.approx(0.4) and res["batch_sd_per_sample"] == pytest.approx(0.2)


def test_calibration_noise_reads_a_strides_spread_exactly_over_offsets():
    """benchmarks/calibration_noise.py, on synthetic per-jump terms: six jumps of 1 but a first of 7, equal in every
    trajectory, so the spread is the offsets' alone — none at stride 1, and at 2 / 3 the offsets that hold jump 0
    read 18 / 24 against 6, around the true 12."""
    import torch

    spec_cn = importlib.util.spec_from_file_location(
        "calibration_noise", Path(__file__).resolve().parents[1] / "benchmarks" / "calibration_noise.py")
    cn = importlib.util.module_from_spec(spec_cn)
    spec_cn.loader.exec_module(cn)
    terms = torch.ones(6, 4, dtype=torch.float64)
    terms[0] = 7.0
    rows = {r["stride"]: r for r in cn.stride_spread(terms, [1, 2, 3], trajectories=16)}
    assert rows[1]["sd_per_trajectory"] == pytest.approx(0.0, abs=1e-12)
    assert rows[2]["sd_per_trajectory"] == pytest.approx(6.0)  # 18 and 6
    assert rows[3]["sd_per_trajectory"] == pytest.approx(72 ** 0.5)  # 24, 6, 6
    assert rows[3]["rel_se"] == pytest.approx(72 ** 0.5 / 12 / 4) and rows[3]["jumps_read"] == 2


def _achieved_noise():
    spec = importlib.util.spec_from_file_location(
        "achieved_noise", Path(__file__).resolve().parents[1] / "benchmarks" / "achieved_noise.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_achieved_noise_tells_a_training_miss_from_a_noisy_read():
    an = _achieved_noise()
    assert an.verdict(1.02, 0.03) == "inside"  # 0.02 + 0.06 within 0.15
    assert an.verdict(1.415, 0.052) == "miss"  # LU 2.5 seed 1, three reads at n = 128 (achieved-noise-lu-2026-12-07)
    assert an.verdict(1.10, 0.05) == "unclear"  # 1.10 ± 0.10 straddles the band's edge
    assert an.verdict(0.80, 0.01) == "miss"


def test_achieved_noise_rereads_a_short_fu_run_and_refuses_bad_sizes(tmp_path, capsys):
    an = _achieved_noise()
    out = tmp_path / "an"
    assert an.main(["--method", "fu", "--setting", "0.05", "--steps", "5", "--reads", "2", "--sizes", "25x2,25x4",
                    "--set", "fu_retain_samples=16", "--out", str(out)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [g["read"] for g in res["reads"]] == ["stride 25 × 2 draws", "stride 25 × 4 draws"]
    for g in res["reads"]:
        assert len(g["values"]) == 2 and g["values"][0] != g["values"][1]  # fresh noise per read
        assert g["ratios"] == pytest.approx([v / res["threshold"] for v in g["values"]])
    assert res["verdict"] in ("inside", "miss", "unclear") and res["trace"]
    spent = res["seconds_by_event"]  # FU: no polish, a dual update every 5 steps — the fifth step ends in one
    assert spent["dual"]["count"] == 1 and spent["step"]["count"] == 5 and spent["done"]["count"] == 1
    assert 0 < sum(v["seconds"] for v in spent.values()) <= res["train_seconds"]
    for bad in (["--sizes", "25"], ["--sizes", "0x2"], ["--reads", "1"]):
        with pytest.raises(SystemExit):
            an.main(["--method", "fu", "--setting", "0.05", "--out", str(out), *bad])
    assert "--sizes" in capsys.readouterr().err


def test_a_run_on_a_cached_calibration_trains_as_if_it_had_calibrated_itself(tmp_path):
    """The frontier's workers read each seed's calibration once; a concept calibration draws its anchor trajectories
    from the trainer's generator, so a run on the cached one gets that generator's state back: the same run, in a
    worker that calibrated this seed before or not."""
    import torch

    frontier._W.clear()
    frontier._forget_folder(tmp_path)
    opts = {"n": 2, "eval_seed": 1000, "out": tmp_path, "concept_steps": 6, "data_steps": 2,
            "shared": {"rollout_jumps": 4, "estimate_samples": 8, "elbo_stride": 25, "refresh_every": 3}}
    task = {"task": "concept", "method": "ru", "setting": 2.0, "seed": 0}
    torch.set_num_threads(1)
    first = frontier.run_task(task, opts)  # calibrates, fills the cache
    again = frontier.run_task(task, opts)  # on the cache
    frontier._W.clear()
    assert first["calibration_seconds"] > 0 and again["calibration_seconds"] == 0
    for k in ("lambda", "achieved", "requested", "retention", "erased_rate"):
        assert again[k] == first[k], k


def test_speeds_trainer_starts_from_the_same_adapter_whatever_the_global_generator_was():
    """The LoRA's initial weights come from torch's global generator; speed.py seeds it (as the CLI does) so that
    two invocations train the same run — unseeded, its runs of one seed parted by step 10."""
    import copy

    import torch

    spec_s = importlib.util.spec_from_file_location("speed", Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py")
    speed = importlib.util.module_from_spec(spec_s)
    spec_s.loader.exec_module(speed)
    model, _, _, _ = speed.load("demo", speed.SETTINGS["quick"], 0)
    states = []
    for noise in (1, 2):
        torch.manual_seed(1000 + noise)  # another state of the global generator, as another invocation leaves it
        trainer = speed.ours_trainer(copy.deepcopy(model), "demo", speed.SETTINGS["quick"], seed=0)
        states.append({k: v.clone() for k, v in trainer.d.adapter_state().items()})
    assert states[0].keys() == states[1].keys() and states[0]
    assert any(v.abs().sum() > 0 for v in states[0].values())  # a real initialisation, not all zeros
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
