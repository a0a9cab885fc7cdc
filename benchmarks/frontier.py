"""Retention–unlearning frontier on the demo model (issue 7): the constrained methods against their fixed-weight
baselines, at equal training steps, LoRA rank and targets, over several seeds.

    python benchmarks/frontier.py            # 3 seeds, the full grid (2 worker processes, one torch thread each)
    python benchmarks/frontier.py --quick    # one seed, one setting per method, short runs: checks the pipeline

Concept unlearning ("three"): RU over thresholds (multiples of the calibrated separation) and LU over thresholds
against ESD over η. Every method trains on the same four wordings of the concept for the same steps; RU and LU
also carry the product's retention constraint (the other digits' prompts and "" kept within ρ, own dual
variable), ESD — as published — has no retention term. Metrics, judged on n samples per prompt with the same seeds
before and after: forget rate (1 − the judge's rate of "3" on the erased prompt), paraphrase leakage (held-out
wordings), retention (judge accuracy on the other nine digits), near-concept retention (the two digits whose base
samples the judge finds most "3"-like), KID to the base model on retained prompts, requested vs achieved.

Data unlearning: forget five fixed training images of "3" (captioned with the main prompt). FU over thresholds
(the forget images' NELBO rise as a fraction of its base value) against NegGrad over weights and SISS. Metrics: the
forget images' NELBO rise, the same rise on five *other* training images of "3" (specificity: forgetting the five
should not forget the class), the class's judge accuracy, retention on the other digits.

Prints a table per task, the verdicts at matched forgetting, and one JSON line last; writes plots (frontier per
task, requested vs achieved) and results.json into --out. Settings shared by all methods and not the product's
defaults, to fit the grid in the time budget: rollouts of 25 jumps, 32 trajectories for the final constraint
estimates, NELBO / log-ratio sums over every 25th timestep (unbiased; see estimate.nelbo). The steps are the
product's (120 for a concept, 150 for data on the demo; --concept-steps/--data-steps change them).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ERASED = 3
FORGET_IMAGES = 5
#: (task, method) → settings: threshold multiple (RU, LU), η (ESD), NELBO-rise fraction (FU), weight (NegGrad, SISS)
GRID = {
    ("concept", "ru"): [2.0, 2.75, 3.5],  # 2.75: the product's default
    ("concept", "esd"): [0.5, 1.0, 2.0],
    # LU's multiple x asks for E[log-ratio] ≤ base − (x − 1) × the separation; on its solved start 2.5 forgot 0.67,
    # 4.5 0.78, 5.5 0.89 (frontier-2026-12-07g-lu), 6.5 0.94 and 7.5 0.97 (frontier-2026-12-08b): 6.5 and 7.5 reach
    # ESD η 1 and 2's forgetting (0.97, 1.00), where LU's adapter falls short of its request (0.71–1.04)
    ("concept", "lu"): [2.5, 4.5, 5.5, 6.5, 7.5],
    # fractions of the forget images' NELBO, read since 2026-12-07 with an offset per sample (2.4–3.1× the earlier
    # one-offset reads, so 0.05 now asks what about 0.12–0.15 asked before): 0.025 sits at NegGrad 0.1's
    # forgetting; 0.25 is unstable (two seeds ran away, 2.6× and 3.8× the request, as NegGrad 0.3's third seed)
    ("data", "fu"): [0.025, 0.05, 0.1, 0.25],
    ("data", "neggrad"): [0.1, 0.3],
    ("data", "siss"): [0.2],
}
QUICK_GRID = {("concept", "ru"): [2.5], ("concept", "esd"): [1.0], ("data", "fu"): [0.05], ("data", "neggrad"): [0.2]}
#: DEFAULTS overrides shared by every run (see the module docstring)
SHARED = {"rollout_jumps": 25, "estimate_samples": 32, "elbo_stride": 25}
QUICK_SHARED = {"rollout_jumps": 10, "estimate_samples": 16, "elbo_stride": 25, "refresh_every": 10}
CONSTRAINED = {"ru", "lu", "fu"}
BASELINE_OF = {"ru": "esd", "lu": "esd", "fu": "neggrad"}

# ---------------------------------------------------------------------------------------------- worker side
_W: dict = {}


def _init_worker(threads: int) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    torch.set_num_threads(threads)


def _state() -> dict:
    """The worker's model, judge, a pristine UNet copy and its caches (built on first use)."""
    if not _W:
        from unlearn_core.demo import load_demo_model, load_judge

        model = load_demo_model()
        _W.update(model=model, judge=load_judge(), base_unet=copy.deepcopy(model.unet), base_suite=None,
                  calibration={}, retain={}, near=None)
    return _W


def _base_suite(w: dict, opts: dict):
    from unlearn_core.evaluate import sample_suite

    if w["base_suite"] is None:
        w["model"].unet = copy.deepcopy(w["base_unet"])
        w["base_suite"] = sample_suite(w["model"], w["judge"], [ERASED], opts["n"], seed=opts["eval_seed"])
    return w["base_suite"]


def near_digits(model, judge, suite: dict, k: int = 2) -> list[int]:
    """The ``k`` digits whose base-model samples the judge finds most like the erased digit (mean probability)."""
    import torch

    r = suite["retained"]
    scores = []
    for i, d in enumerate(r["digits"]):
        logits, _ = judge.logits(r["images"][i])
        scores.append((float(torch.softmax(logits, 1)[:, ERASED].mean()), d))
    return [d for _, d in sorted(scores, reverse=True)[:k]]


def _forget_folder(out: Path) -> Path:
    """Five fixed training images of the erased digit (the forget set) and five others of it (unseen by FU)."""
    from PIL import Image

    from unlearn_core.demo.data import load_demo_data

    data = load_demo_data("diffusion", styles=("plain",))
    idx = (data.digits == ERASED).nonzero().flatten().tolist()
    for name, chosen in (("forget", idx[:FORGET_IMAGES]), ("other", idx[FORGET_IMAGES:2 * FORGET_IMAGES])):
        folder = out / f"{name}-images"
        folder.mkdir(parents=True, exist_ok=True)
        for i, j in enumerate(chosen):
            Image.fromarray((data.images[j].numpy() * 255).astype("uint8"), mode="L").save(folder / f"{i}.png")
    return out


def build_trainer(task: dict, opts: dict):
    """The trainer of one (task, method, setting, seed), built with the product's job builder on a fresh copy of the
    worker's base UNet: (trainer, problem, config). ``opts`` needs out (holding forget-images for data tasks),
    concept_steps, data_steps and shared (DEFAULTS overrides)."""
    import torch

    from unlearn_core import cli, unlearn
    from unlearn_core.demo.data import DIGIT_WORDS, MAIN_TEMPLATE, caption
    from unlearn_core.diffusers_denoiser import DiffusersDenoiser
    from unlearn_core.trainer import Trainer

    w = _state()
    model = w["model"]
    method, setting, seed = task["method"], task["setting"], task["seed"]
    argv = ["unlearn", "--method", method, "--seed", str(seed), "--out", str(Path(opts["out"]) / "unused")]
    if task["task"] == "concept":
        argv += ["--concept", DIGIT_WORDS[ERASED], "--steps", str(opts["concept_steps"])]
    else:
        argv += ["--forget", str(Path(opts["out"]) / "forget-images"), "--caption", caption(MAIN_TEMPLATE, ERASED),
                 "--steps", str(opts["data_steps"])]
    argv += (["--weight", str(setting)] + (["--no-default-keep"] if method == "esd" else [])
             if method in ("esd", "neggrad", "siss") else ["--threshold", str(setting)])
    with unlearn.overridden_defaults(opts["shared"]):  # e.g. demo_wordings shapes the job itself
        job, overrides = unlearn.prepare_job(cli.build_parser().parse_args(argv))
    torch.manual_seed(seed)
    model.unet = copy.deepcopy(w["base_unet"])
    with unlearn.overridden_defaults({**overrides, **opts["shared"]}):
        if task["task"] == "data":  # the retain set (samples of the pretrained model) is shared within a seed
            sample = model.sample

            def cached_sample(*a, **k):
                if seed not in w["retain"]:
                    w["retain"][seed] = sample(*a, **k)
                return w["retain"][seed]

            model.sample = cached_sample
            try:
                problem, config = unlearn.build_problem(job, model)
            finally:
                model.sample = sample
        else:
            problem, config = unlearn.build_problem(job, model)
    d = DiffusersDenoiser(model.unet, model.scheduler, encoder=model.encode, targets=job.targets, rank=job.rank)
    return Trainer(d, problem, config), problem, config


def run_task(task: dict, opts: dict) -> dict:
    """Train one (task, method, setting, seed) with the product's job builder, then judge it."""
    import torch

    from unlearn_core import unlearn
    from unlearn_core.demo.data import MAIN_TEMPLATE, caption
    from unlearn_core.estimate import nelbo
    from unlearn_core.evaluate import sample_suite, summarize

    w = _state()
    model, judge = w["model"], w["judge"]
    before = _base_suite(w, opts)
    if w["near"] is None:
        w["near"] = near_digits(model, judge, before)
    method, seed = task["method"], task["seed"]
    prompt = caption(MAIN_TEMPLATE, ERASED)
    trainer, problem, config = build_trainer(task, opts)
    d = trainer.d
    key = (problem.spec.constraint, seed)
    t0 = time.perf_counter()
    if key in w["calibration"]:
        # the calibration of this seed, read by an earlier run in this worker; a concept calibration draws its
        # anchor trajectories from the trainer's generator, so its state after them comes back too: every run then
        # trains as if it had calibrated itself, whichever runs its worker did before (without it, a run's draws
        # depended on the order the two workers took the grid in)
        trainer.calibration, trainer.separation, gen_state = w["calibration"][key]
        trainer.gen.set_state(gen_state)
        calib_s = 0.0
    else:
        trainer.calibrate()
        w["calibration"][key] = (trainer.calibration, trainer.separation, trainer.gen.get_state())
        calib_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    res = trainer.run()
    train_s = time.perf_counter() - t1
    row = {**task, "train_seconds": round(train_s, 1), "calibration_seconds": round(calib_s, 1),
           "lambda": res.lambdas[0], "requested": res.thresholds[0], "achieved": res.final_estimates[0],
           "calibration": res.calibration[0], "separation": res.separation[0]}
    if method in CONSTRAINED:
        if problem.spec.constraint == "log_ratio":  # E[r] ≤ b: the requested and achieved *decrease* from base
            req, ach = row["calibration"] - row["requested"], row["calibration"] - row["achieved"]
        else:
            req, ach = row["requested"], row["achieved"]
        row["achieved_over_requested"] = ach / req if req else float("nan")
    t2 = time.perf_counter()
    after = sample_suite(model, judge, [ERASED], opts["n"], seed=opts["eval_seed"])
    m = summarize(before, after)
    acc = {r["digit"]: r["acc_after"] for r in m["retained"]}
    row.update(retention=m["retention_after"], retention_before=m["retention_before"],
               near_retention=sum(acc[k] for k in w["near"]) / len(w["near"]),
               near_retention_before=sum(r["acc_before"] for r in m["retained"] if r["digit"] in w["near"]) / len(w["near"]),
               near_digits=w["near"], kid=m["kid_retained"], kid_floor=m["kid_retained_floor"],
               erased_rate=m["erased"][0]["rate_after"], erased_rate_before=m["erased"][0]["rate_before"],
               paraphrase_leak=m["paraphrase_leak_mean"])
    if task["task"] == "concept":
        row["forget"] = 1.0 - row["erased_rate"]
    else:  # forgetting = the forget images' NELBO rise; specificity = the rise on five other images of the class
        row["forget"] = row["achieved"] / row["separation"]
        other = Path(opts["out"]) / "other-images"
        x = unlearn.load_images(unlearn.list_images(other, "other images"), model.unet.config.sample_size, 1)
        cond = d.encode([prompt])
        kw = dict(draws=2, t_max=config.rollout_t_max, t_stride=config.elbo_stride)
        a = nelbo(d, x, cond, adapted=True, generator=torch.Generator().manual_seed(seed + 7), **kw)
        b = nelbo(d, x, cond, adapted=False, generator=torch.Generator().manual_seed(seed + 7), **kw)
        row["other_rise"] = float((a - b).mean() / b.mean())
        row["class_accuracy"] = row["erased_rate"]
    row["eval_seconds"] = round(time.perf_counter() - t2, 1)
    return row


# ---------------------------------------------------------------------------------------------- parent side
def _mean_sd(vals: list[float]) -> tuple[float, float]:
    vals = [v for v in vals if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def aggregate(rows: list[dict]) -> dict:
    """{(task, method, setting): {metric: (mean, sd)}} over seeds."""
    groups: dict = {}
    for r in rows:
        if "error" not in r:
            groups.setdefault((r["task"], r["method"], r["setting"]), []).append(r)
    metrics = ["forget", "retention", "near_retention", "paraphrase_leak", "kid", "achieved_over_requested",
               "lambda", "train_seconds", "other_rise", "class_accuracy"]
    return {k: {m: _mean_sd([r.get(m) for r in g]) for m in metrics} | {"runs": len(g)} for k, g in groups.items()}


def verdicts(agg: dict) -> list[str]:
    """Ours vs the baseline at matched forgetting: our frontier (means over seeds, linear between our settings)
    read at each baseline point's forgetting."""
    out = []
    for ours, base in BASELINE_OF.items():
        task = "data" if ours == "fu" else "concept"
        ys = ["class_accuracy"] if task == "data" else (["near_retention"] if ours == "lu" else ["retention", "near_retention"])
        pts = sorted((v["forget"][0], k) for k, v in agg.items() if k[0] == task and k[1] == ours)
        if not pts:
            continue
        for bk, bv in sorted((k, v) for k, v in agg.items() if k[0] == task and k[1] == base):
            fb = bv["forget"][0]
            for y in ys:
                yb = bv[y][0]
                if len(pts) >= 1 and pts[0][0] <= fb <= pts[-1][0]:
                    for (f0, k0), (f1, k1) in zip(pts, pts[1:] or pts):
                        if f0 <= fb <= f1:
                            a = 0.0 if f1 == f0 else (fb - f0) / (f1 - f0)
                            yo = (1 - a) * agg[k0][y][0] + a * agg[k1][y][0]
                            break
                    word = "above" if yo > yb + 0.01 else "below" if yo < yb - 0.01 else "level with"
                    out.append(f"{ours.upper()} vs {base.upper()} {bk[2]:g}: at forgetting {fb:.2f}, {y} {yo:.3f} vs "
                               f"{yb:.3f} — ours {word} the baseline")
                else:
                    dom = [k for f, k in pts if f >= fb and agg[k][y][0] >= yb]
                    lo, hi = (pts[0][0], pts[-1][0]) if pts else (float("nan"),) * 2
                    out.append(f"{ours.upper()} vs {base.upper()} {bk[2]:g}: forgetting {fb:.2f} is outside ours "
                               f"({lo:.2f}–{hi:.2f}); " + (f"{ours.upper()} {dom[0][2]:g} forgets at least as much and "
                                                           f"keeps {y} ≥ ({agg[dom[0]][y][0]:.3f} vs {yb:.3f})" if dom
                                                           else f"no setting of ours dominates it on {y}"))
    return out


def plots(rows: list[dict], agg: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    colors = {"ru": "tab:blue", "lu": "tab:green", "esd": "tab:red", "fu": "tab:purple", "neggrad": "tab:red",
              "siss": "tab:orange"}
    base = next((r for r in rows if "error" not in r), None)
    for task, panels in (("concept", [("retention", "retention (other digits)"),
                                      ("near_retention", "near-concept retention")]),
                         ("data", [("class_accuracy", "class accuracy of the forgotten images' digit"),
                                   ("other_rise", "NELBO rise of 5 other images (lower: more specific)")])):
        keys = [k for k in agg if k[0] == task]
        if not keys:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2))
        for ax, (y, label) in zip(axes, panels):
            for method in dict.fromkeys(k[1] for k in keys):
                ks = sorted((k for k in keys if k[1] == method), key=lambda k: agg[k]["forget"][0])
                xs = [agg[k]["forget"][0] for k in ks]
                ax.errorbar(xs, [agg[k][y][0] for k in ks], xerr=[agg[k]["forget"][1] for k in ks],
                            yerr=[agg[k][y][1] for k in ks], marker="o", capsize=3, color=colors[method],
                            label=method.upper())
                for k, x in zip(ks, xs):
                    ax.annotate(f"{k[2]:g}", (x, agg[k][y][0]), textcoords="offset points", xytext=(4, 4), fontsize=7)
            if base is not None and task == "concept":
                yb = {"retention": base["retention_before"], "near_retention": base["near_retention_before"]}[y]
                ax.scatter([1 - base["erased_rate_before"]], [yb], marker="*", s=160, color="k", label="base model")
            ax.set_xlabel("forget rate (judge)" if task == "concept" else "forget images' NELBO rise (fraction)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{task} unlearning on the demo model — mean ± sd over seeds (labels: threshold / η / weight)")
        fig.tight_layout()
        f = out / f"frontier_{task}.png"
        fig.savefig(f, dpi=110)
        plt.close(fig)
        files.append(str(f))
    cal = [r for r in rows if "achieved_over_requested" in r]
    if cal:
        fig, ax = plt.subplots(figsize=(5, 4.2))
        for method in dict.fromkeys(r["method"] for r in cal):
            rs = [r for r in cal if r["method"] == method]
            ax.scatter([r["setting"] for r in rs], [r["achieved_over_requested"] for r in rs], color=colors[method],
                       label=method.upper())
        ax.axhspan(0.85, 1.15, color="tab:green", alpha=0.15, label="within 15 %")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("requested threshold (multiple / fraction)")
        ax.set_ylabel("achieved / requested")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        f = out / "calibration.png"
        fig.savefig(f, dpi=110)
        plt.close(fig)
        files.append(str(f))
    return files


def _fmt(v: tuple[float, float], pct: bool = False) -> str:
    m, s = v
    if math.isnan(m):
        return "–"
    return f"{100 * m:5.1f}±{100 * s:4.1f}" if pct else f"{m:6.3f}±{s:5.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one seed, one setting per method, short runs (< 5 min)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="processes (each one torch thread); 2 for 2 cores")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("-n", type=int, default=None, help="samples per prompt for the judge (default 12; quick: 6)")
    p.add_argument("--concept-steps", type=int, default=None,
                   help="default: the product's (`unlearn`'s steps, 120; quick: 12)")
    p.add_argument("--data-steps", type=int, default=None,
                   help="default: the product's for a data job on the demo (fu_steps, 150; quick: 15)")
    p.add_argument("--tasks", default="concept,data")
    p.add_argument("--grid", default=None, metavar="SPEC",
                   help="run only these methods and settings, e.g. 'ru=1.5,2.5;esd=1' (default: the built-in grid)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training default of every run (as `unlearn --set`), e.g. demo_wordings=0,1,2,4")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "frontier")
    p.add_argument("--resume", action="store_true",
                   help="keep the finished runs of an interrupted benchmark with the same options (runs.jsonl)")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    grid = QUICK_GRID if args.quick else GRID
    if args.grid:
        kinds = {m: t for t, m in GRID}
        try:
            pairs = [part.split("=") for part in args.grid.split(";") if part.strip()]
            grid = {(kinds[m.strip()], m.strip()): [float(x) for x in v.split(",")] for m, v in pairs}
        except (KeyError, ValueError):
            p.error(f"--grid {args.grid!r}: expected 'method=s1,s2;method=s3' with methods {', '.join(kinds)}")
    seeds = list(range(1 if args.quick else args.seeds))
    from unlearn_core import unlearn

    opts = {"n": args.n or (6 if args.quick else 12), "eval_seed": 1000, "out": args.out,
            "concept_steps": args.concept_steps or (12 if args.quick else unlearn.DEFAULTS["steps"]),
            "data_steps": args.data_steps or (15 if args.quick else unlearn.DEFAULTS["fu_steps"]),
            "shared": QUICK_SHARED if args.quick else SHARED}

    try:
        opts["shared"] = {**opts["shared"], **unlearn.parse_overrides(args.set)}
    except ValueError as e:
        p.error(str(e))
    args.out.mkdir(parents=True, exist_ok=True)
    _forget_folder(args.out)
    tasks = [{"task": t, "method": m, "setting": s, "seed": seed} for (t, m), settings in grid.items()
             if t in args.tasks.split(",") for s in settings for seed in seeds]
    # longest first (concept runs with a retention constraint), so the two workers finish together
    cost = {"lu": 4, "ru": 3, "esd": 2, "fu": 1, "neggrad": 1, "siss": 1}
    tasks.sort(key=lambda t: -cost[t["method"]])
    print(f"{len(tasks)} runs, {args.workers} workers × {args.threads} thread(s); n = {opts['n']} per prompt; "
          f"steps: concept {opts['concept_steps']}, data {opts['data_steps']}", flush=True)
    # every finished run is appended to runs.jsonl at once; --resume keeps the finished runs of the same options
    log_file = args.out / "runs.jsonl"
    fp = {k: v for k, v in opts.items() if k != "out"}
    done: dict = {}
    if args.resume and log_file.exists():
        for line in log_file.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if rec.get("options") == json.loads(json.dumps(fp)) and "error" not in rec["row"]:
                r = rec["row"]
                done[(r["task"], r["method"], r["setting"], r["seed"])] = r
    elif log_file.exists():
        log_file.unlink()
    rows = [done[k] for k in done if any(k == (t["task"], t["method"], t["setting"], t["seed"]) for t in tasks)]
    todo = [t for t in tasks if (t["task"], t["method"], t["setting"], t["seed"]) not in done]
    if rows:
        print(f"--resume: {len(rows)} finished runs kept from {log_file}", flush=True)
    ctx = get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=_init_worker, initargs=(args.threads,)) as ex:
        futs = {ex.submit(run_task, t, opts): t for t in todo}
        for fut in futs:
            t = futs[fut]
            try:
                r = fut.result()
            except Exception as e:  # one failed run is reported, the others go on
                r = {**t, "error": f"{type(e).__name__}: {e}"}
            rows.append(r)
            with log_file.open("a") as f:
                f.write(json.dumps({"options": fp, "row": r}, default=str) + "\n")
            print(f"  {t['task']:7} {t['method']:7} {t['setting']:<6g} seed {t['seed']}: " +
                  (r["error"] if "error" in r else
                   f"forget {r['forget']:.3f}, retention {r['retention']:.3f}, near {r['near_retention']:.3f}, "
                   f"λ {r['lambda']:.3f}, ach/req {r.get('achieved_over_requested', float('nan')):.2f}, "
                   f"train {r['train_seconds']:.0f} s"), flush=True)
    agg = aggregate(rows)
    ok_rows = [r for r in rows if "error" not in r]
    base = ok_rows[0] if ok_rows else None
    if base:
        print(f"\nbase model: '3' rate on the erased prompt {base['erased_rate_before']:.3f}, retention "
              f"{base['retention_before']:.3f}, near-concept digits {base['near_digits']} at "
              f"{base['near_retention_before']:.3f}; n = {opts['n']} per prompt, seeds {seeds}")
    for task in ("concept", "data"):
        keys = [k for k in agg if k[0] == task]
        if not keys:
            continue
        if task == "concept":
            print(f"\n{'method':8} {'setting':>7} {'forget %':>11} {'paraphrase %':>12} {'retention %':>11} "
                  f"{'near %':>11} {'KID':>13} {'ach/req':>13} {'λ':>13} {'train s':>8}")
        else:
            print(f"\n{'method':8} {'setting':>7} {'forget rise %':>13} {'other 3s %':>11} {'class acc %':>11} "
                  f"{'retention %':>11} {'ach/req':>13} {'λ':>13} {'train s':>8}")
        for k in sorted(keys, key=lambda k: (k[1], k[2])):
            v = agg[k]
            if task == "concept":
                print(f"{k[1]:8} {k[2]:7g} {_fmt(v['forget'], True):>11} {_fmt(v['paraphrase_leak'], True):>12} "
                      f"{_fmt(v['retention'], True):>11} {_fmt(v['near_retention'], True):>11} {_fmt(v['kid']):>13} "
                      f"{_fmt(v['achieved_over_requested']):>13} {_fmt(v['lambda']):>13} {v['train_seconds'][0]:8.0f}")
            else:
                print(f"{k[1]:8} {k[2]:7g} {_fmt(v['forget'], True):>13} {_fmt(v['other_rise'], True):>11} "
                      f"{_fmt(v['class_accuracy'], True):>11} {_fmt(v['retention'], True):>11} "
                      f"{_fmt(v['achieved_over_requested']):>13} {_fmt(v['lambda']):>13} {v['train_seconds'][0]:8.0f}")
    vs = verdicts(agg)
    print("\nat matched forgetting (ours read off its frontier at each baseline point):")
    for line in vs:
        print("  " + line)
    cal = [r["achieved_over_requested"] for r in ok_rows if "achieved_over_requested" in r]
    within = sum(abs(c - 1) <= 0.15 for c in cal) / len(cal) if cal else float("nan")
    print(f"achieved within 15 % of requested: {sum(abs(c - 1) <= 0.15 for c in cal)}/{len(cal)} constrained runs "
          f"({100 * within:.0f} %; goal ≥ 90 %)")
    files = plots(ok_rows, agg, args.out)
    wall = time.perf_counter() - t_start
    kept = f" — this invocation only: {len(done)} runs kept by --resume" if done else ""
    print(f"wall time {wall / 60:.1f} min{kept} ({'quick' if args.quick else 'full'}; goal < {5 if args.quick else 60} min); "
          f"plots: {', '.join(Path(f).name for f in files)} in {args.out}")
    summary = {"quick": args.quick, "seeds": seeds, "n_per_prompt": opts["n"], "wall_seconds": round(wall, 1),
               "runs_kept_by_resume": len(done),
               "concept_steps": opts["concept_steps"], "data_steps": opts["data_steps"], "shared": opts["shared"],
               "near_digits": base["near_digits"] if base else None,
               "groups": [{"task": k[0], "method": k[1], "setting": k[2], "runs": v["runs"],
                           **{m: {"mean": v[m][0], "sd": v[m][1]} for m in v if m != "runs"}}
                          for k, v in sorted(agg.items())],
               "verdicts": vs, "achieved_within_15pct": within, "errors": [r for r in rows if "error" in r],
               "plots": files}
    (args.out / "results.json").write_text(json.dumps({"summary": summary, "runs": rows}, indent=1, default=str))
    print(json.dumps(summary, default=str))
    return 0 if not summary["errors"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
