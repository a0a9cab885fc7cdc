"""Metrics for an unlearning LoRA on the demo model, judged by the demo's classifier.

The same protocol runs on the base model and on the model with the LoRA (same prompts, same seeds, same
sampler), so every number is a before/after pair:

- **erased-prompt rate** — the fraction of samples from each erased prompt that the judge calls the erased digit
  (forget rate = 1 − rate);
- **paraphrase leakage** — the same fraction on held-out wordings the LoRA was never trained on
  (``HELDOUT_TEMPLATES``);
- **retention** — judge accuracy on every other digit's main prompt, and its drop in points;
- **KID** — kernel inception distance (unbiased MMD² with the cubic polynomial kernel) between base and LoRA
  samples of the retained prompts, in the judge's 128-d feature space: a distribution distance that also sees
  changes the argmax hides.

``python -m unlearn_core evaluate --lora FILE [--concept three]`` prints these; the concept is read from the
LoRA's metadata when not given.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .demo.data import DIGIT_WORDS, HELDOUT_TEMPLATES, MAIN_TEMPLATE, STYLES, caption

__all__ = ["demo_digit", "kid", "prompt_suite", "sample_prompts", "sample_suite", "share", "summarize", "compare",
           "add_subcommand"]

log = logging.getLogger(__name__)


def demo_digit(text: str) -> int | None:
    """The digit a demo prompt names ("three", "3", "a handwritten digit three" → 3), or None."""
    words = re.findall(r"[a-z]+|\d", text.lower())
    hits = {DIGIT_WORDS.index(w) for w in words if w in DIGIT_WORDS} | {int(w) for w in words if w.isdigit()}
    return hits.pop() if len(hits) == 1 else None


def kid(a: torch.Tensor, b: torch.Tensor) -> float:
    """Unbiased MMD² with k(x, y) = (xᵀy / d + 1)³ (the KID kernel) between feature sets ``[n, d]``, ``[m, d]``."""
    a, b = a.double(), b.double()
    d = a.shape[1]

    def k(x, y):
        return (x @ y.T / d + 1) ** 3

    n, m = len(a), len(b)
    kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
    s_aa = (kaa.sum() - kaa.diagonal().sum()) / (n * (n - 1))
    s_bb = (kbb.sum() - kbb.diagonal().sum()) / (m * (m - 1))
    return float(s_aa + s_bb - 2 * kab.mean())


def _features(judge, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        x = images.float().unsqueeze(1) if images.dim() == 3 else images.float()
        return torch.cat([judge.net.features(x[i : i + 1024]) for i in range(0, len(x), 1024)])


def prompt_suite(erased: Sequence[int]) -> dict[str, list[tuple[str, int]]]:
    """The evaluation prompts, grouped: (prompt, digit it names)."""
    erased = list(erased)
    return {
        "erased": [(caption(MAIN_TEMPLATE, k), k) for k in erased],
        "paraphrase": [(caption(t, k), k) for k in erased for t in HELDOUT_TEMPLATES],
        "retained": [(caption(MAIN_TEMPLATE, k), k) for k in range(len(DIGIT_WORDS)) if k not in erased],
    }


def prompt_seed(prompt: str, seed: int) -> int:
    """Each prompt draws its own noise (seeded by its text), so results can be cached and compared across runs."""
    import zlib

    return (seed * 1_000_003 + zlib.crc32(prompt.encode())) % (2**31)


@torch.no_grad()
def sample_prompts(model, judge, prompts: Sequence[str], n: int, seed: int = 0, cache: dict | None = None) -> dict:
    """{prompt: {"images", "labels", "features"}}; ``cache`` (same model state only) skips prompts already done."""
    out = {}
    todo = [p for p in dict.fromkeys(prompts) if cache is None or (p, n, seed) not in cache]
    if todo:
        # every prompt draws its own seed's noise (results do not depend on which prompts share the call); the
        # prompts share each batched forward, which is what makes the evaluation cheap on a CPU
        imgs = model.sample(todo, n=n, seeds=[prompt_seed(p, seed) for p in todo])
        for i, p in enumerate(todo):
            im = imgs[i * n:(i + 1) * n]
            res = {"images": im, "labels": judge.predict_digit(im), "features": _features(judge, im)}
            if cache is not None:
                cache[(p, n, seed)] = res
            out[p] = res
    for p in prompts:
        if p not in out:
            out[p] = cache[(p, n, seed)]
    return out


def sample_suite(model, judge, erased: Sequence[int], n: int, seed: int = 0, cache: dict | None = None) -> dict:
    """Samples, judge labels and features for every prompt of :func:`prompt_suite` (deterministic per seed)."""
    out = {}
    for group, items in prompt_suite(erased).items():
        prompts = [p for p, _ in items]
        res = sample_prompts(model, judge, prompts, n, seed, cache)
        out[group] = {"prompts": prompts, "digits": [k for _, k in items],
                      "images": torch.stack([res[p]["images"] for p in prompts]),
                      "labels": torch.stack([res[p]["labels"] for p in prompts]),
                      "features": torch.stack([res[p]["features"] for p in prompts])}
    return out


def share(labels: torch.Tensor, k: int) -> float:
    """The share of judge labels equal to ``k`` as the exact count / n (a float32 mean reads 10 of 200 as
    0.0500000007, over a 5 % bar)."""
    return int((labels == k).sum()) / labels.numel()


def _rates(s: dict) -> list[float]:
    return [share(s["labels"][i], k) for i, k in enumerate(s["digits"])]


def summarize(before: dict, after: dict) -> dict:
    """Before/after metrics from two :func:`sample_suite` results of the same protocol."""
    n = before["retained"]["labels"].shape[1]
    m: dict = {"n_per_prompt": n}
    eb, ea = _rates(before["erased"]), _rates(after["erased"])
    m["erased"] = [{"prompt": p, "digit": k, "rate_before": b, "rate_after": a}
                   for p, k, b, a in zip(before["erased"]["prompts"], before["erased"]["digits"], eb, ea)]
    m["erased_rate_max"] = max(ea) if ea else 0.0
    m["forget_rate"] = 1.0 - (sum(ea) / len(ea)) if ea else 0.0
    pb, pa = _rates(before["paraphrase"]), _rates(after["paraphrase"])
    m["paraphrases"] = [{"prompt": p, "digit": k, "rate_before": b, "rate_after": a}
                        for p, k, b, a in zip(before["paraphrase"]["prompts"], before["paraphrase"]["digits"], pb, pa)]
    m["paraphrase_leak_mean"] = sum(pa) / len(pa) if pa else 0.0
    m["paraphrase_leak_max"] = max(pa) if pa else 0.0
    rb, ra = _rates(before["retained"]), _rates(after["retained"])
    m["retained"] = [{"prompt": p, "digit": k, "acc_before": b, "acc_after": a}
                     for p, k, b, a in zip(before["retained"]["prompts"], before["retained"]["digits"], rb, ra)]
    m["retention_before"] = sum(rb) / len(rb)
    m["retention_after"] = sum(ra) / len(ra)
    m["retention_drop_points"] = 100 * (m["retention_before"] - m["retention_after"])
    m["retention_worst_drop_points"] = max(100 * (b - a) for b, a in zip(rb, ra))
    fb = before["retained"]["features"].flatten(0, 1)
    fa = after["retained"]["features"].flatten(0, 1)
    m["kid_retained"] = kid(fb, fa)
    # the same statistic between two halves of the base samples: what sampling noise alone gives (KID is in the
    # judge-feature scale, so read kid_retained against this floor, not against 0)
    m["kid_retained_floor"] = kid(fb[0::2], fb[1::2])
    return m


def compare(model, judge, lora, erased: Sequence[int], n: int = 50, seed: int = 0, strength: float = 1.0,
            base_cache: dict | None = None) -> tuple[dict, dict, dict]:
    """(before, after, metrics): the suite on the base model (``base_cache``: results of earlier calls on the same
    base model), then with ``lora`` merged into the weights (stripped afterwards)."""
    from .lora import apply_lora

    before = sample_suite(model, judge, erased, n, seed, base_cache)
    with apply_lora(model.unet, lora, strength):
        after = sample_suite(model, judge, erased, n, seed)
    return before, after, summarize(before, after)


def format_metrics(m: dict) -> str:
    rows = [f"{'prompt':44s} {'before':>7s} {'after':>7s}"]
    for e in m["erased"]:
        rows.append(f"{'erased: ' + e['prompt']:44s} {e['rate_before']:7.2f} {e['rate_after']:7.2f}")
    for e in m["paraphrases"]:
        rows.append(f"{'paraphrase: ' + e['prompt']:44s} {e['rate_before']:7.2f} {e['rate_after']:7.2f}")
    for e in m["retained"]:
        rows.append(f"{'kept: ' + e['prompt']:44s} {e['acc_before']:7.2f} {e['acc_after']:7.2f}")
    rows.append(f"forget rate {m['forget_rate']:.3f}; paraphrase leakage mean {m['paraphrase_leak_mean']:.3f} "
                f"max {m['paraphrase_leak_max']:.3f}; retention {m['retention_before']:.3f} → "
                f"{m['retention_after']:.3f} ({-m['retention_drop_points']:+.1f} pts, worst digit "
                f"{-m['retention_worst_drop_points']:+.1f}); KID(retained) {m['kid_retained']:.4g} (base vs base: {m.get('kid_retained_floor', float('nan')):.4g}); "
                f"n = {m['n_per_prompt']} per prompt")
    return "\n".join(rows)


def concepts_from_lora(path: Path) -> list[str]:
    from .lora import load_lora

    md = load_lora(path).metadata
    try:
        return list(json.loads(md.get("unlearn.concepts", "[]")))
    except ValueError:
        return []


def erased_digits(concepts: Sequence[str]) -> list[int]:
    out = []
    for c in concepts:
        first = c.split("|")[0] if isinstance(c, str) else str(c)
        k = demo_digit(first)
        if k is None:
            raise ValueError(f"the demo judge scores digits; cannot tell which digit {first!r} names — pass "
                             "--concept with a digit word or numeral, e.g. --concept three")
        if k not in out:
            out.append(k)
    return out


def add_subcommand(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("evaluate", help="forget rate, paraphrase leakage, retention and KID of a LoRA on the "
                              "demo model", description=__doc__.split("\n\n")[0])
    p.add_argument("--lora", type=Path, required=True, help="kohya LoRA file trained on the demo model")
    p.add_argument("--concept", action="append", default=None,
                   help="erased concept (repeatable; default: the LoRA's metadata), e.g. three")
    p.add_argument("-n", "--samples", type=int, default=50, help="samples per prompt (default 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strength", type=float, default=1.0)
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    p.add_argument("--out", type=Path, default=None, help="also write the metrics to this JSON file")
    p.set_defaults(func=_evaluate_main)
    return p


def _evaluate_main(args: argparse.Namespace) -> int:
    from .demo import load_demo_model, load_judge

    if not args.lora.is_file():
        raise FileNotFoundError(f"LoRA file not found: {args.lora}")
    if args.samples < 2:
        raise ValueError(f"--samples must be >= 2 (KID needs pairs), got {args.samples}")
    concepts = args.concept or concepts_from_lora(args.lora)
    if not concepts:
        raise ValueError(f"{args.lora} names no concept in its metadata; pass --concept (e.g. --concept three)")
    digits = erased_digits(concepts)
    t0 = time.perf_counter()
    model, judge = load_demo_model(), load_judge()
    _, _, m = compare(model, judge, args.lora, digits, n=args.samples, seed=args.seed, strength=args.strength)
    m["lora"] = str(args.lora)
    m["concepts"] = list(concepts)
    m["seconds"] = round(time.perf_counter() - t0, 1)
    if not args.json:
        print(format_metrics(m))
    if args.out is not None:
        from .report import write_json_atomic

        write_json_atomic(args.out, m, overwrite=True)
    print(json.dumps(m))
    return 0


_ = STYLES  # styles are scored by demo.evaluate; LoRA metrics here are about digits
