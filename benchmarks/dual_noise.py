"""How noisy is the estimate λ steps on? Reads the ``dual_history`` of finished ``unlearn`` runs (``metrics.json``)
and prints, per constraint, the spread between successive distinct reads of the estimate and the largest drop of λ
while it was free to move.

    python benchmarks/dual_noise.py runs/acceptance            # every metrics.json under the folder
    python benchmarks/dual_noise.py runs/a runs/b --from 54 --to 94

spread: the standard deviation of the ratio of each read to the one before, over the free dual updates with
``from ≤ step ≤ to`` (a read that serves several updates counts once). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def reads(history: list[dict], ci: int, lo: int, hi: int) -> list[float]:
    """The distinct successive estimates of constraint ``ci`` over the free updates in [lo, hi]."""
    out: list[float] = []
    for h in history:
        if "estimate" in h and not h.get("polished") and lo <= h["step"] <= hi:
            v = h["estimate"][ci]
            if not out or v != out[-1]:
                out.append(v)
    return out


def largest_drop(history: list[dict], ci: int) -> float:
    lams = [h["lambda"][ci] for h in history if "lambda" in h and not h.get("polished")]
    return max([a - b for a, b in zip(lams, lams[1:])] + [0.0])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+", type=Path, help="metrics.json files or folders holding them")
    p.add_argument("--from", dest="lo", type=int, default=54, help="first step of the window (default 54)")
    p.add_argument("--to", dest="hi", type=int, default=94, help="last step of the window (default 94)")
    a = p.parse_args(argv)
    files = sorted({f for q in a.paths for f in ([q] if q.is_file() else q.rglob("metrics.json"))})
    if not files:
        p.error("no metrics.json found under " + ", ".join(map(str, a.paths)))
    rows = []
    print(f"{'run':40} {'constraint':12} {'reads':>5} {'spread':>7} {'λ drop':>7}")
    for f in files:
        m = json.loads(f.read_text())
        history = m.get("dual_history") or []
        for ci, c in enumerate(m.get("constraints", [])):
            r = reads(history, ci, a.lo, a.hi)
            if len(r) < 3:
                continue
            spread = statistics.pstdev(b / x for x, b in zip(r, r[1:]))
            rows.append({"run": str(f.parent), "constraint": c["name"], "reads": len(r), "spread": spread,
                         "largest_lambda_drop": largest_drop(history, ci)})
            print(f"{str(f.parent)[-40:]:40} {c['name'][:12]:12} {len(r):5d} {spread:7.3f} "
                  f"{rows[-1]['largest_lambda_drop']:7.3f}")
    if not rows:
        p.error(f"no constraint has 3 distinct reads between steps {a.lo} and {a.hi}")
    mean = statistics.mean(r["spread"] for r in rows)
    print(f"mean spread over {len(rows)} constraints: {mean:.3f}")
    print(json.dumps({"mean_spread": mean, "window": [a.lo, a.hi], "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
