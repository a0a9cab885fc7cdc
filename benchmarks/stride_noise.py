"""How noisy a strided NELBO / log-ratio sum is, by where it samples its timesteps (LU's E[r] reads on the demo).

LU's dual steps and final estimates read E[log q/ref] by NELBO sums that visit every ``elbo_stride``-th timestep
(weighted ×stride). This script rolls a few samples of "a handwritten digit three" from the demo model, computes
every timestep's term of their log-ratio once (one noise draw per timestep), and then — exactly, over every offset —
the spread that striding adds:

- per sample, for a dense head of h smallest timesteps visited every time (the rest strided): the sd over offsets;
- for the batch mean: one offset for the whole batch (the estimator before 2026-12-07) against an offset per sample
  (now), and how often the one-offset mean falls short of the true sum (a heavy tail: most reads short, a few far over).

Ends with one JSON line. About 2 minutes on one core.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def per_timestep_terms(n: int, seed: int, threads: int):
    """(terms [T × n] of the log-ratio's NELBO difference, weights c_t, t_max, the default stride) on the demo."""
    import torch

    torch.set_num_threads(threads)
    from unlearn_core import cli, unlearn
    from unlearn_core.diffusers_denoiser import DiffusersDenoiser
    from unlearn_core.estimate import all_jumps
    from unlearn_core.trainer import Trainer

    args = cli.build_parser().parse_args(["unlearn", "--concept", "three", "--method", "lu", "--seed", str(seed),
                                          "--out", str(ROOT / "runs" / "unused")])
    job, overrides = unlearn.prepare_job(args)
    model, _judge = unlearn.load_model(job)
    with unlearn.overridden_defaults(overrides):
        problem, config = unlearn.build_problem(job, model)
    d = DiffusersDenoiser(model.unet, model.scheduler, encoder=model.encode, targets=job.targets, rank=job.rank)
    tr = Trainer(d, problem, config)
    term = tr.terms[0]
    states, _ts, _w = tr._rollout_many([term["edit"]], [n], adapted=False)
    x0 = states[0][-1]
    t_all, _s, c_all = all_jumps(d, config.rollout_t_max)
    g = torch.Generator().manual_seed(seed + 1)
    rows = []
    with torch.no_grad():
        for t in t_all.tolist():
            noise = torch.randn(x0.shape, generator=g)
            tt = torch.full((n,), t)
            x_t = d.schedule.add_noise(x0, tt, noise)
            e_c, e_r = d.predict_many(x_t, tt, [term["concept"], term["ref"]], adapted=False)
            err_r, err_c = ((e - noise).pow(2).flatten(1).sum(1).double() for e in (e_r, e_c))
            rows.append(c_all[t] * (err_r - err_c))
    return torch.stack(rows), c_all, config.rollout_t_max, config.elbo_stride


def spread(R, s: int) -> dict:
    """Exactly, over every offset, the spread a stride ``s`` adds to the sums of per-timestep terms ``R`` [T × n]:
    per sample for several dense heads, and the batch mean's with one offset for the batch (head 0, the estimator
    before 2026-12-07) against an offset per sample with the head ``s // 5`` (estimate.nelbo)."""
    import torch

    T, n = R.shape
    exact = R.sum(0)

    def strided(h: int) -> torch.Tensor:  # offsets × n: the head, then every s-th timestep from offset o, ×s
        vals = torch.stack([R[:h].sum(0) + s * R[torch.arange(h + o, T, s)].sum(0) for o in range(s)])
        assert torch.allclose(vals.mean(0), exact, rtol=1e-6, atol=1e-6)  # unbiased: every offset equally likely
        return vals

    heads = []
    for h in sorted({0, 1, 2, s // 5, s // 2, s}):
        vals = strided(h)
        heads.append({"head": h, "visits": h + len(range(h, T, s)),
                      "sd_per_sample": float(vals.std(0, unbiased=False).mean()),
                      "max_minus_mean": float((vals.max(0).values - vals.mean(0)).mean())})
    shared = strided(0).mean(1)  # one offset for the whole batch
    per_sample_var = strided(s // 5).var(0, unbiased=False)  # independent offsets: the mean's variance Σ var / n²
    return {"exact_mean": float(exact.mean()), "heads": heads, "batch_sd_one_offset": float(shared.std(unbiased=False)),
            "batch_sd_per_sample": float(per_sample_var.sum().sqrt() / n),
            "one_offset_share_below_mean": float((shared < exact.mean()).double().mean()),
            "one_offset_median": float(shared.median())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=8, help="samples (default 8)")
    p.add_argument("--stride", type=int, default=None, help="default: LU's elbo_stride (25)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    R, c, t_max, lu_stride = per_timestep_terms(args.n, args.seed, args.threads)
    s = args.stride or lu_stride
    T, n = R.shape
    res = spread(R, s)
    print(f"stride_noise.py: {n} samples of 'three' from the demo model, log-ratio terms at all {T} timesteps "
          f"(t ≤ {t_max}), stride {s}; exact sums: mean {res['exact_mean']:.2f}, sd over samples "
          f"{float(R.sum(0).std()):.2f} ({time.perf_counter() - t0:.0f} s)")
    print(f"c_t: t=0 {float(c[0]):.3f}, t=1 {float(c[1]):.3f}, t=5 {float(c[5]):.3f}, t={s} {float(c[s]):.4f}, "
          f"t=500 {float(c[500]):.4f}")
    print(f"{'dense head':>10} {'visits/sample':>13} {'sd/sample':>9} {'max over offsets − mean':>24}")
    for row in res["heads"]:
        print(f"{row['head']:>10} {row['visits']:>13} {row['sd_per_sample']:>9.2f} {row['max_minus_mean']:>24.1f}"
              + ("   ← estimate.nelbo" if row["head"] == s // 5 else ""))
    print(f"batch mean of {n}: one offset for the batch: sd {res['batch_sd_one_offset']:.2f}, below the true mean "
          f"for {res['one_offset_share_below_mean']:.0%} of offsets (median {res['one_offset_median']:.2f} vs mean "
          f"{res['exact_mean']:.2f}); an offset per sample and a head of {s // 5}: sd {res['batch_sd_per_sample']:.2f}")
    print(json.dumps({"samples": n, "stride": s, "timesteps": T, **res, "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
