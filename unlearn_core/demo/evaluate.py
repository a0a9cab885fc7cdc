"""Score the shipped demo model with its judge: ``python -m unlearn_core.demo.evaluate``.

Prints the acceptance table (per-digit accuracy for the main prompt, each held-out paraphrase template, style
prompts) and ends with one JSON line. Same seeds every run, so two runs on one machine print the same numbers.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from .data import DIGIT_WORDS, HELDOUT_TEMPLATES, MAIN_TEMPLATE, STYLES, caption
from .judge import Judge, load_judge
from .model import DemoModel, load_demo_model

__all__ = ["BARS", "evaluate", "main"]

#: Acceptance bars (issue 3): main-prompt mean and worst digit, paraphrase mean, style accuracy.
BARS = {"main_mean": 0.93, "main_min": 0.80, "paraphrase_mean": 0.90, "style": 0.85}


def _judge(model: DemoModel, judge: Judge, template: str, style: str, n: int, seed: int, guidance, steps):
    prompts = [caption(template, d, style) for d in range(len(DIGIT_WORDS))]
    imgs = model.sample(prompts, n=n, seed=seed, guidance=guidance, steps=steps)
    target = torch.arange(len(DIGIT_WORDS)).repeat_interleave(n)
    per_digit = (judge.predict_digit(imgs) == target).float().view(len(DIGIT_WORDS), n).mean(1)
    style_ok = (judge.predict_style(imgs) == STYLES.index(style)).float().mean()
    return [float(v) for v in per_digit], float(style_ok)


def evaluate(
    model: DemoModel,
    judge: Judge,
    n: int = 50,
    n_para: int = 20,
    n_style: int = 20,
    seed: int = 0,
    guidance: float | None = None,
    steps: int | None = None,
) -> dict:
    """All acceptance numbers as a dict (see ``BARS``)."""
    res: dict = {
        "n_main": n,
        "n_paraphrase": n_para,
        "n_style": n_style,
        "seed": seed,
        "guidance": model.sampler.guidance if guidance is None else guidance,
        "steps": model.sampler.steps if steps is None else steps,
    }
    per_digit, plain_style = _judge(model, judge, MAIN_TEMPLATE, "plain", n, seed, guidance, steps)
    res["main"] = {
        "prompt": MAIN_TEMPLATE,
        "per_digit": per_digit,
        "mean": sum(per_digit) / len(per_digit),
        "min": min(per_digit),
        "style": plain_style,
    }
    res["paraphrases"] = {}
    for i, tpl in enumerate(HELDOUT_TEMPLATES):
        pd, st = _judge(model, judge, tpl, "plain", n_para, seed + 101 + i, guidance, steps)
        res["paraphrases"][tpl] = {"per_digit": pd, "mean": sum(pd) / len(pd), "style": st}
    res["paraphrase_mean"] = sum(v["mean"] for v in res["paraphrases"].values()) / len(HELDOUT_TEMPLATES)
    res["styles"] = {"plain": {"style": plain_style, "digit": res["main"]["mean"]}}
    for j, style in enumerate(s for s in STYLES if s != "plain"):
        pd, st = _judge(model, judge, MAIN_TEMPLATE, style, n_style, seed + 201 + j, guidance, steps)
        res["styles"][style] = {"style": st, "digit": sum(pd) / len(pd)}
    res["style_mean"] = sum(v["style"] for v in res["styles"].values()) / len(res["styles"])
    res["style_min"] = min(v["style"] for v in res["styles"].values())
    res["pass"] = {
        "main_mean": res["main"]["mean"] >= BARS["main_mean"],
        "main_min": res["main"]["min"] >= BARS["main_min"],
        "paraphrase_mean": res["paraphrase_mean"] >= BARS["paraphrase_mean"],
        "style": res["style_min"] >= BARS["style"],
    }
    return res


def _table(res: dict) -> str:
    head = "prompt".ljust(44) + "".join(f"{d:>6}" for d in range(10)) + "   mean  style"
    rows = [head, "-" * len(head)]

    def row(name, pd, mean, style):
        return name[:44].ljust(44) + "".join(f"{v:6.2f}" for v in pd) + f"  {mean:5.3f}  {style:5.2f}"

    m = res["main"]
    rows.append(
        row(
            caption(MAIN_TEMPLATE, 3).replace("three", "<word>") + f"  (n={res['n_main']})",
            m["per_digit"],
            m["mean"],
            m["style"],
        )
    )
    for tpl, v in res["paraphrases"].items():
        name = caption(tpl, 3).replace("three", "<word>").replace("3", "<d>") + f"  (n={res['n_paraphrase']})"
        rows.append(row(name, v["per_digit"], v["mean"], v["style"]))
    rows.append("")
    rows.append(f"paraphrase mean {res['paraphrase_mean']:.3f}   (bar {BARS['paraphrase_mean']})")
    for style, v in res["styles"].items():
        rows.append(f"style '{style}': judged {style} {v['style']:.3f}, digit accuracy {v['digit']:.3f}")
    rows.append(
        f"main mean {m['mean']:.3f} (bar {BARS['main_mean']}), worst digit {m['min']:.2f} "
        f"(bar {BARS['main_min']}), style min {res['style_min']:.3f} (bar {BARS['style']})"
    )
    rows.append(
        "PASS" if all(res["pass"].values()) else "FAIL: " + ", ".join(k for k, v in res["pass"].items() if not v)
    )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m unlearn_core.demo.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=50, help="samples per digit, main prompt")
    p.add_argument("--n-paraphrase", type=int, default=20, help="samples per digit per paraphrase template")
    p.add_argument("--n-style", type=int, default=20, help="samples per digit per style prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's)")
    p.add_argument("--weights", default=None, help="weights folder (default: the shipped demo model)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model = load_demo_model(directory=args.weights)
    judge = load_judge(args.weights)
    res = evaluate(model, judge, args.n, args.n_paraphrase, args.n_style, args.seed, args.guidance, args.steps)
    res["seconds"] = round(time.time() - t0, 1)
    print(_table(res))
    print(f"({res['seconds']:.0f} s)")
    print(json.dumps(res))
    return 0 if all(res["pass"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
