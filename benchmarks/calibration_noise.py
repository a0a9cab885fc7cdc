"""How much noise a jump stride adds to the calibration's separation, and what it saves (the demo's RU job).

Every concept job starts by reading the *separation*: the anchor trajectories' mean path KL between the anchor's
and each wording's ε (thresholds are multiples of it, and λ's step is scaled by it). The anchor's ε comes with
its rollout; each wording costs one more forward per state read. ``TrainConfig.calibration_stride`` k reads the
wordings at every k-th jump from an offset per trajectory (weighted ×k: unbiased). This script rolls n anchor
trajectories of ``unlearn --concept three`` (the product's defaults), computes every jump's term once, and then —
exactly, over every offset — the separation's relative standard error at the job's trajectory count for each k,
with the forwards it pays per trajectory; then times the job's own ``Trainer.calibrate()`` at each k.

    python benchmarks/calibration_noise.py          # about 2.5 minutes on one core (--no-timing: 1.5)

Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def demo_job(seed: int):
    """(denoiser, problem, config) of ``unlearn --concept three`` on the demo model, built once for both reads."""
    from unlearn_core import cli, unlearn
    from unlearn_core.diffusers_denoiser import DiffusersDenoiser

    args = cli.build_parser().parse_args(["unlearn", "--concept", "three", "--seed", str(seed),
                                          "--out", str(ROOT / "runs" / "unused")])
    job, overrides = unlearn.prepare_job(args)
    model, _judge = unlearn.load_model(job)
    with unlearn.overridden_defaults(overrides):
        problem, config = unlearn.build_problem(job, model)
    d = DiffusersDenoiser(model.unet, model.scheduler, encoder=model.encode, targets=job.targets, rank=job.rank)
    return d, problem, config


def jump_terms(d, problem, config, n: int):
    """(terms [J × n]: each anchor trajectory's path-KL term at each jump, averaged over the wordings; the number of
    wordings; the trajectories a job calibrates on)."""
    import torch

    from unlearn_core.estimate import path_kl_terms
    from unlearn_core.trainer import Trainer

    tr = Trainer(d, problem, config)
    anchor, wordings = tr.terms[0]["anchor"], [term["concept"] for term in tr.terms]
    (states,), ts, w, (e_anchor,) = tr._rollout_many([anchor], [n], adapted=False, with_eps=True)
    J = len(ts) - 1
    terms = torch.zeros(J, n, dtype=torch.float64)
    with torch.no_grad():
        for j in range(J):
            t = torch.full((n,), int(ts[j]))
            for e in d.predict_many(states[j], t, wordings, adapted=False):
                terms[j] += path_kl_terms(e_anchor[j], e, w[j].expand(n)).double() / len(wordings)
    return terms, len(wordings), max(config.estimate_samples // 2, config.rollouts)


def time_calibrations(d, problem, config, strides) -> dict[int, dict]:
    """The job's own ``Trainer.calibrate()`` at each stride, timed (one after another, same seed: the same
    trajectories, so the separations differ by the stride's draw alone)."""
    import dataclasses

    from unlearn_core.trainer import Trainer

    out = {}
    for k in strides:  # calibrate() reads the frozen model only: one adapter serves every stride
        tr = Trainer(d, problem, dataclasses.replace(config, calibration_stride=k))
        t0 = time.perf_counter()
        tr.calibrate()
        out[k] = {"seconds": time.perf_counter() - t0, "separation": tr.separation[0]}
    return out


def stride_spread(terms, strides, trajectories: int) -> list[dict]:
    """Exactly, over every offset: per stride k the separation's relative SE over ``trajectories`` trajectories
    (each with its own offset) and the jumps read per trajectory. ``terms``: [J × n] per-jump terms."""
    import torch

    J, n = terms.shape
    exact = terms.sum(0)  # each trajectory's path KL
    out = []
    for k in strides:
        vals = torch.stack([k * terms[torch.arange(o, J, k)].sum(0) for o in range(k)])  # offsets × n
        assert torch.allclose(vals.mean(0), exact, rtol=1e-9, atol=1e-9)  # unbiased: every offset equally likely
        sd = float(vals.flatten().std(unbiased=False))  # over trajectories and offsets, equally weighted
        out.append({"stride": k, "jumps_read": J / k, "sd_per_trajectory": sd,
                    "rel_se": sd / float(exact.mean()) / trajectories ** 0.5})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=64, help="anchor trajectories rolled (default 64)")
    p.add_argument("--strides", default="1,2,3,5")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-timing", action="store_true", help="skip timing the job's calibration at each stride")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    strides = [int(s) for s in args.strides.split(",")]
    import torch

    torch.set_num_threads(args.threads)
    job = demo_job(args.seed)
    terms, n_wordings, m = jump_terms(*job, args.n)
    J, n = terms.shape
    rows = stride_spread(terms, strides, m)
    timed = {} if args.no_timing else time_calibrations(*job, strides)
    exact = terms.sum(0)
    print(f"calibration_noise.py: {n} anchor trajectories of the demo's RU job ('three', {n_wordings} wordings), "
          f"{J} jumps; separation {float(exact.mean()):.2f} (sd over trajectories {float(exact.std()):.2f}); the job "
          f"calibrates on {m} trajectories ({time.perf_counter() - t0:.0f} s)")
    print(f"{'stride':>6} {'forwards / trajectory':>21} {'of stride 1':>11} {'sd / trajectory':>15} "
          f"{'relative SE at ' + str(m):>18} {'calibrate() s':>13} {'its separation':>14}")
    full = J + n_wordings * J
    for r in rows:
        fw = J + n_wordings * r["jumps_read"]  # the anchor's rollout (one forward a jump) + the wordings' reads
        r["forwards_per_trajectory"] = fw
        if r["stride"] in timed:
            r["calibrate_seconds"], r["calibrate_separation"] = timed[r["stride"]]["seconds"], timed[r["stride"]]["separation"]
        tail = (f" {r['calibrate_seconds']:>13.1f} {r['calibrate_separation']:>14.2f}" if "calibrate_seconds" in r else "")
        print(f"{r['stride']:>6} {fw:>21.0f} {fw / full:>11.2f} {r['sd_per_trajectory']:>15.2f} {r['rel_se']:>18.2%}"
              + tail)
    print(json.dumps({"trajectories": n, "jumps": J, "wordings": n_wordings, "calibration_trajectories": m,
                      "separation": float(exact.mean()), "strides": rows,
                      "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
