"""Is a run's achieved / requested its controller's or its read's? Trains one frontier run, then reads its
"achieved" value again several times with fresh draws, at the frontier's size and at a larger one.

The frontier (``benchmarks/frontier.py``) judges calibration by one read per run of the constraint's value
(``Trainer.estimate_constraints``): LU's E[r] over ``estimate_samples`` fresh samples, FU's forget-set NELBO rise
at the frontier's timestep stride. Each read has its own noise; a run whose reads agree with each other but not
with the request missed it in training (its dual controller), not in the reading. This script builds the run
exactly as the frontier does (its job builder and shared settings), trains it, prints the dual trace (each
update's estimate against the threshold, and λ), then the spread of repeated reads:

- concept methods (RU, LU): ``estimate_constraints(n)`` with fresh rollouts and fresh NELBO noise, for each n;
- FU: the forget set's NELBO rise (adapted − frozen, shared noise) at each "STRIDExDRAWS".

    python benchmarks/achieved_noise.py --method lu --setting 2.5 --seed 1        # about 11 minutes on one core
    python benchmarks/achieved_noise.py --method fu --setting 0.05 --seed 1       # about 3 minutes

Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def build(method: str, setting: float, seed: int, steps: int | None, shared: dict, out: Path):
    """The frontier's trainer for one (method, setting, seed), built by its own builder: (trainer, problem)."""
    import frontier

    from unlearn_core import unlearn

    kind = "data" if method == "fu" else "concept"
    if kind == "data":
        frontier._forget_folder(out)
    opts = {"out": out, "shared": shared, "concept_steps": steps or unlearn.DEFAULTS["steps"],
            "data_steps": steps or unlearn.DEFAULTS["fu_steps"]}
    trainer, problem, _ = frontier.build_trainer({"task": kind, "method": method, "setting": setting, "seed": seed}, opts)
    return trainer, problem


def ratio(tr, value: float) -> float:
    """achieved / requested as the frontier computes it (LU: decreases of E[r] from its base value)."""
    cal, thr = tr.calibration[0], tr.constraints[0].threshold
    if tr.spec.constraint == "log_ratio":
        return (cal - value) / (cal - thr)
    return value / thr


VERDICTS = {"inside": "inside the 15 % band, beyond the reads' noise",
            "miss": "outside the 15 % band, beyond the reads' noise: a miss of the training, not of the read",
            "unclear": "the reads are too noisy to place it inside or outside the 15 % band"}


def verdict(mean: float, sd: float, band: float = 0.15) -> str:
    """Where repeated reads (mean, sd of achieved/requested) put a run against the band, two sd either way."""
    off = abs(mean - 1)
    return "inside" if off + 2 * sd <= band else "miss" if off - 2 * sd > band else "unclear"


def where_the_time_went(clock: list[tuple[str, float]]) -> dict:
    """Seconds between consecutive trainer events, summed by the event that ends each interval, with counts."""
    out: dict = {}
    for (_, t_prev), (kind, t) in zip(clock, clock[1:]):
        slot = out.setdefault(kind, {"seconds": 0.0, "count": 0})
        slot["seconds"] += t - t_prev
        slot["count"] += 1
    return out


def concept_reads(tr, sizes: list[int], reads: int) -> list[dict]:
    base = tr.cfg
    out = []
    for n in sizes:
        vals, t0 = [], time.perf_counter()
        for k in range(reads):  # fresh rollouts (the trainer's generator) and fresh NELBO noise (the seed's)
            tr.gen.manual_seed(10_000 + 97 * k + n)
            tr.cfg = dataclasses.replace(base, seed=20_000 + 97 * k + n)
            vals.append(tr.estimate_constraints(n)[0])
        tr.cfg = base
        out.append({"read": f"n {n}", "values": vals, "seconds_each": (time.perf_counter() - t0) / reads})
    return out


def data_reads(tr, specs: list[tuple[int, int]], reads: int) -> list[dict]:
    import torch

    from unlearn_core.estimate import nelbo

    f, cfg = tr.p.data.forget, tr.cfg
    out = []
    for stride, draws in specs:
        vals, t0 = [], time.perf_counter()
        for k in range(reads):
            kw = dict(draws=draws, t_max=cfg.rollout_t_max, t_stride=stride)
            a = nelbo(tr.d, f, tr.data_cond, adapted=True, generator=torch.Generator().manual_seed(30_000 + k), **kw)
            b = nelbo(tr.d, f, tr.data_cond, adapted=False, generator=torch.Generator().manual_seed(30_000 + k), **kw)
            vals.append(float((a - b).mean()))
        out.append({"read": f"stride {stride} × {draws} draws", "values": vals,
                    "seconds_each": (time.perf_counter() - t0) / reads})
    return out


def main(argv: list[str] | None = None) -> int:
    import frontier

    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    p = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    p.add_argument("--method", required=True, choices=["ru", "lu", "fu"], help="a constrained method")
    p.add_argument("--setting", type=float, required=True, help="threshold: RU/LU multiple, FU fraction")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the frontier's)")
    p.add_argument("--reads", type=int, default=3, help="repeated reads per size")
    p.add_argument("--sizes", default=None,
                   help="concept: samples per read, e.g. '32,128' (default: the frontier's and 4×); data: "
                        "STRIDExDRAWS reads, e.g. '25x8,1x1' (default: the frontier's final read, and every timestep)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as frontier.py --set")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "achieved-noise")
    args = p.parse_args(argv)
    if args.reads < 2:
        p.error(f"--reads must be >= 2 (a spread needs two reads), got {args.reads}")
    import torch

    from unlearn_core import unlearn

    torch.set_num_threads(args.threads)
    try:
        shared = {**frontier.SHARED, **unlearn.parse_overrides(args.set)}
    except ValueError as e:
        p.error(str(e))
    data = args.method == "fu"
    try:
        if data:
            # default (None): the run's own read (its stride and draws, known once the trainer is built), and stride 1
            sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")] if args.sizes else None
            if sizes and any(len(s) != 2 or min(s) < 1 for s in sizes):
                raise ValueError
        else:
            n0 = shared["estimate_samples"]
            sizes = [int(s) for s in (args.sizes or f"{n0},{4 * n0}").split(",")]
            if min(sizes) < 1:
                raise ValueError
    except ValueError:
        p.error(f"--sizes {args.sizes!r}: expected " + ("STRIDExDRAWS,… (integers >= 1)" if data else "N,… (integers >= 1)"))
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tr, problem = build(args.method, args.setting, args.seed, args.steps, shared, args.out)
    if data and sizes is None:
        sizes = [(tr.cfg.elbo_stride, tr.achieved_draws()), (1, 1)]
    clock: list[tuple[str, float]] = [("start", time.perf_counter())]
    tr.callbacks.append(lambda ev: clock.append((ev["type"], time.perf_counter())))
    res = tr.run()
    train_s = time.perf_counter() - t0
    thr = res.thresholds[0]
    print(f"{args.method} {args.setting:g} seed {args.seed}: trained in {train_s:.0f} s (calibration included); "
          f"threshold {thr:.2f} ({'E[r] ≤' if problem.spec.sense == 'upper' else '≥'}), calibration "
          f"{res.calibration[0]:.2f}, separation {res.separation[0]:.2f}, λ {res.lambdas[0]:.3f}")
    print(f"the run's own read: {res.final_estimates[0]:.2f} → achieved/requested {ratio(tr, res.final_estimates[0]):.3f}")
    if tr.target_solve:  # LU's λ solved on its closed-form target before training (lu_lam_init "target")
        print("λ solved on the closed-form target: " + ", ".join(f"λ {lams[0]:.3f} → E[r] {vals[0]:.2f}"
                                                              for lams, vals in tr.target_solve["reads"])
              + f" → start at λ {tr.target_solve['lambdas'][0]:.3f} ({tr.target_solve['seconds']:.0f} s)")
    spent = where_the_time_went(clock)
    print("training seconds by the event that ends them (a step's own time is in the event after it: 'dual' = a step "
          "and its dual update, 'samples' = a refresh's rollout): "
          + ", ".join(f"{k} {v['seconds']:.1f} s ({v['count']}×)" for k, v in spent.items()))
    trace = [(h["step"], h["estimate"][0], h["lambda"][0], bool(h.get("polished"))) for h in res.history if "estimate" in h]
    print("dual trace (step: estimate, λ; * = λ frozen for the polish):")
    for i in range(0, len(trace), 5):
        print("  " + "   ".join(f"{s + 1:4d}: {e:8.2f} {lam:.3f}{'*' if pol else ' '}" for s, e, lam, pol in trace[i:i + 5]))
    groups = data_reads(tr, sizes, args.reads) if data else concept_reads(tr, sizes, args.reads)
    print(f"\n{'read':>22} {'values':>34} {'ach/req each':>26} {'mean':>7} {'sd':>6} {'s/read':>7}")
    for g in groups:
        rs = [ratio(tr, v) for v in g["values"]]
        g.update(ratios=rs, mean=statistics.fmean(rs), sd=statistics.stdev(rs))
        print(f"{g['read']:>22} {' '.join(f'{v:8.2f}' for v in g['values']):>34} "
              f"{' '.join(f'{r:.3f}' for r in rs):>26} {g['mean']:7.3f} {g['sd']:6.3f} {g['seconds_each']:7.1f}")
    best = min(groups, key=lambda g: g["sd"])
    print(f"\nthe steadiest read ({best['read']}): {best['mean']:.2f} of the request ± {2 * best['sd']:.2f} (2 sd) — "
          f"{VERDICTS[verdict(best['mean'], best['sd'])]}")
    print(json.dumps({"method": args.method, "setting": args.setting, "seed": args.seed, "threshold": thr,
                      "calibration": res.calibration[0], "separation": res.separation[0], "lambda": res.lambdas[0],
                      "run_read": res.final_estimates[0], "verdict": verdict(best["mean"], best["sd"]), "run_ratio": ratio(tr, res.final_estimates[0]),
                      "train_seconds": round(train_s, 1), "seconds_by_event": spent, "shared": shared, "reads": groups, "target_solve": tr.target_solve,
                      "trace": [{"step": s + 1, "estimate": e, "lambda": lam, "polished": pol} for s, e, lam, pol in trace]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
