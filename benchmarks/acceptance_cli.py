"""Acceptance numbers of the main job (issue 5): run ``unlearn`` with its defaults on the demo model for each
digit (and a two-digit multi-concept case), then judge ≥ 50 samples per prompt with fixed seeds, the same
protocol before and after — and the erased prompt on 200 (``--n-erased``): its bar is 5 %, and at 50 samples a
digit whose true rate is 3 % exceeds it (3 or more of 50) 19 % of the time, so across eleven cases the table would
fail on the draw rather than on the LoRA (all eleven pass 10 % of the time); at 200 that chance is 4 %.

    python benchmarks/acceptance_cli.py                       # digits 3 and 7, multi-concept 3+7
    python benchmarks/acceptance_cli.py --digits 0,1,2,3,4,5,6,7,8,9 --multi 1+8

Prints one table row per case and ends with one JSON line. Bars: erased prompt ≤ 5 % judged as the digit;
held-out paraphrases ≤ 15 % on average and none above 25 %; mean accuracy on the other digits drops ≤ 5 points;
achieved constraint within 15 % of requested; every λ settled (last quarter inside its bounds, range ≤ 0.05).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from unlearn_core import cli  # noqa: E402
from unlearn_core.demo import DIGIT_WORDS, load_demo_model, load_judge  # noqa: E402
from unlearn_core.evaluate import compare, prompt_suite, sample_prompts, share  # noqa: E402
from unlearn_core.lora import apply_lora  # noqa: E402

BARS = {"erased_max": 0.05, "paraphrase_mean": 0.15, "paraphrase_max": 0.25, "retention_drop_points": 5.0,
        "achieved_rel_err": 0.15, "fu_class_acc": 0.85}


def within(value: float, bar: str) -> bool:
    """``value ≤ BARS[bar]`` for a share of judged samples: counts over n, so a bar met exactly (15 % as the mean of
    four shares) must not fail on float rounding; 1e-9 is far below one sample's share."""
    return value <= BARS[bar] + 1e-9


def erased_rates(model, judge, lora: Path, digits: list[int], n: int, seed: int, base_cache: dict) -> list[float]:
    """How often the judge calls each erased prompt's ``n`` samples (with the LoRA) that digit; the base model's
    samples of the same seeds are drawn too (cached), so before and after share the protocol."""
    items = prompt_suite(digits)["erased"]
    prompts = [p for p, _ in items]
    sample_prompts(model, judge, prompts, n, seed, base_cache)
    with apply_lora(model.unet, lora):
        after = sample_prompts(model, judge, prompts, n, seed)
    return [share(after[p]["labels"], k) for p, k in items]


def run_case(digits: list[int], out: Path, n: int, seed: int, model, judge, base_cache: dict, extra: list[str],
             n_erased: int = 0) -> dict:
    argv = ["unlearn"]
    for k in digits:
        argv += ["--concept", DIGIT_WORDS[k]]
    argv += ["--out", str(out), "--overwrite", "--eval-samples", "0", "--quiet", "--seed", str(seed), *extra]
    t0 = time.perf_counter()
    rc = cli.main(argv)
    job_seconds = time.perf_counter() - t0
    if rc != 0:
        return {"digits": digits, "error": f"unlearn exited with {rc}"}
    m = json.loads((out / "metrics.json").read_text())
    lora = Path(m["lora"])
    _, _, ev = compare(model, judge, lora, digits, n=n, seed=1000 + seed, base_cache=base_cache)
    rel = [abs(c["achieved"] / c["requested"] - 1) for c in m["constraints"]]
    rates_n = [e["rate_after"] for e in ev["erased"]]
    rates = erased_rates(model, judge, lora, digits, n_erased, 1000 + seed, base_cache) if n_erased > n else rates_n
    row = {
        "digits": digits, "job_seconds": round(job_seconds, 1), "train_seconds": m["train_seconds"],
        "n_erased": max(n_erased, n), "erased_rates": rates, "erased_max": max(rates),
        "erased_rates_at_n": rates_n,
        "paraphrase_mean": ev["paraphrase_leak_mean"], "paraphrase_max": ev["paraphrase_leak_max"],
        "retention_before": ev["retention_before"], "retention_after": ev["retention_after"],
        "retention_drop_points": ev["retention_drop_points"],
        "worst_kept_digit_drop_points": ev["retention_worst_drop_points"], "kid_retained": ev["kid_retained"],
        "requested": [c["requested"] for c in m["constraints"]], "achieved": [c["achieved"] for c in m["constraints"]],
        "achieved_rel_err": max(rel), "lambda": [c["lambda"] for c in m["constraints"]],
        "settled": m["settled"]["ok"], "lambda_ranges_last_quarter": m["settled"]["ranges"],
        "per_digit_after": {e["digit"]: e["acc_after"] for e in ev["retained"]},
    }
    row["pass"] = {
        "erased": within(row["erased_max"], "erased_max"),
        "paraphrase_mean": within(row["paraphrase_mean"], "paraphrase_mean"),
        "paraphrase_max": within(row["paraphrase_max"], "paraphrase_max"),
        "retention": within(row["retention_drop_points"], "retention_drop_points"),
        "achieved": row["achieved_rel_err"] <= BARS["achieved_rel_err"],
        "settled": bool(row["settled"]),
    }
    return row


def run_fu_case(digit: int, n_images: int, out: Path, n: int, seed: int, extra: list[str]) -> dict:
    """FU: forget ``n_images`` specific training images of one digit (captioned with its main prompt); their
    forget-set KL must reach the threshold while samples of that digit stay recognisable (≥ 85 %)."""
    from PIL import Image

    from unlearn_core.demo.data import MAIN_TEMPLATE, caption, load_demo_data

    data = load_demo_data("diffusion", styles=("plain",))
    folder = out / "forget-images"
    folder.mkdir(parents=True, exist_ok=True)
    for i, j in enumerate((data.digits == digit).nonzero().flatten()[:n_images].tolist()):
        Image.fromarray((data.images[j].numpy() * 255).astype("uint8"), mode="L").save(folder / f"{i}.png")
    prompt = caption(MAIN_TEMPLATE, digit)
    argv = ["unlearn", "--forget", str(folder), "--caption", prompt, "--out", str(out / "run"), "--overwrite",
            "--eval-samples", str(n), "--quiet", "--seed", str(seed), *extra]
    t0 = time.perf_counter()
    rc = cli.main(argv)
    if rc != 0:
        return {"fu_digit": digit, "error": f"unlearn exited with {rc}"}
    m = json.loads((out / "run" / "metrics.json").read_text())
    c = m["constraints"][0]
    ev = m["evaluation"]
    row = {"fu_digit": digit, "images": n_images, "job_seconds": round(time.perf_counter() - t0, 1),
           "train_seconds": m["train_seconds"], "requested": c["requested"], "achieved": c["achieved"],
           "achieved_rel_err": abs(c["achieved"] / c["requested"] - 1), "lambda": c["lambda"],
           "settled": m["settled"]["ok"], "class_acc_before": ev["acc_before"], "class_acc_after": ev["acc_after"]}
    row["pass"] = {"achieved": row["achieved_rel_err"] <= BARS["achieved_rel_err"],
                   "class_recognisable": row["class_acc_after"] >= BARS["fu_class_acc"], "settled": bool(row["settled"])}
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--digits", default="3,7", help="single-digit cases, comma separated")
    p.add_argument("--multi", default="3+7", help="multi-concept cases, e.g. 3+7,1+8 ('' for none)")
    p.add_argument("-n", type=int, default=50, help="samples per prompt (default 50)")
    p.add_argument("--n-erased", type=int, default=200,
                   help="samples of each erased prompt for its ≤ 5 %% bar (default 200; ≤ n: the n above)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "acceptance")
    p.add_argument("--extra", default="", help="extra arguments for every `unlearn` run, e.g. '--steps 200'")
    p.add_argument("--fu", default="3", help="FU cases: digits whose first --fu-images training images are "
                                             "forgotten ('' for none)")
    p.add_argument("--fu-images", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cases = [[int(d)] for d in args.digits.split(",") if d.strip()]
    cases += [[int(d) for d in c.split("+")] for c in args.multi.split(",") if c.strip()]
    model, judge = load_demo_model(), load_judge()
    base_cache: dict = {}
    rows = []
    head = (f"{'erased':>8} {'job s':>6} {'erased%':>8} {'at n':>6} {'para mean':>9} {'para max':>8} {'ret drop':>8} "
            f"{'worst':>6} {'KID':>7} {'ach/req':>8} {'λ':>14} settled  pass")
    print(head, flush=True)
    for case in cases:
        out = args.out / "+".join(DIGIT_WORDS[k] for k in case)
        r = run_case(case, out, args.n, args.seed, model, judge, base_cache, args.extra.split(), args.n_erased)
        rows.append(r)
        if "error" in r:
            print(f"{'+'.join(map(str, case)):>8} {r['error']}", flush=True)
            continue
        ratio = ",".join(f"{a / q:.2f}" for a, q in zip(r["achieved"], r["requested"]))
        lam = ",".join(f"{x:.3f}" for x in r["lambda"])
        print(f"{'+'.join(map(str, case)):>8} {r['job_seconds']:6.0f} {100 * r['erased_max']:7.1f}% "
              f"{100 * max(r['erased_rates_at_n']):5.1f}% "
              f"{100 * r['paraphrase_mean']:8.1f}% {100 * r['paraphrase_max']:7.1f}% "
              f"{r['retention_drop_points']:8.1f} {r['worst_kept_digit_drop_points']:6.1f} {r['kid_retained']:7.4f} "
              f"{ratio:>8} {lam:>14} {str(r['settled']):>7}  "
              f"{'PASS' if all(r['pass'].values()) else 'FAIL ' + ','.join(k for k, v in r['pass'].items() if not v)}",
              flush=True)
    for k in [int(d) for d in args.fu.split(",") if d.strip()]:
        r = run_fu_case(k, args.fu_images, args.out / f"fu-{DIGIT_WORDS[k]}", args.n, args.seed, args.extra.split())
        rows.append(r)
        if "error" in r:
            print(f"{'FU ' + str(k):>8} {r['error']}", flush=True)
            continue
        print(f"{'FU ' + str(k):>8} {r['job_seconds']:6.0f}  forget {r['images']} images: achieved/requested "
              f"{r['achieved'] / r['requested']:.2f}, λ {r['lambda']:.3f}, settled {r['settled']}, class accuracy "
              f"{r['class_acc_before']:.2f} → {r['class_acc_after']:.2f}  "
              f"{'PASS' if all(r['pass'].values()) else 'FAIL ' + ','.join(k for k, v in r['pass'].items() if not v)}",
              flush=True)
    ok = all("error" not in r and all(r["pass"].values()) for r in rows)
    print(json.dumps({"bars": BARS, "n_per_prompt": args.n, "n_erased": max(args.n_erased, args.n), "cases": rows,
                      "all_pass": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
