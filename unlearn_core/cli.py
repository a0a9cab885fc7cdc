"""``python -m unlearn_core`` / ``comfyui-unlearn``: the command line. Prints for people; errors exit with code 2."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys

from .methods import METHODS

# Subcommands that live in their own modules register themselves through ``add_subcommand(subparsers)``.
_PLUGINS = ("unlearn_core.lora", "unlearn_core.demo.sample", "unlearn_core.unlearn", "unlearn_core.evaluate",
            "unlearn_core.batch")


class UsageError(Exception):
    """Bad input: printed as one line, exit code 2."""


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, n))


def _cmd_toy(args: argparse.Namespace) -> int:
    from . import toy

    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if args.threshold is not None and not args.threshold > 0:
        raise UsageError(f"--threshold must be > 0, got {args.threshold}")

    def progress(ev: dict) -> None:
        if ev["type"] == "dual" and not args.json and (ev["step"] + 1) % args.dual_print == 0:
            lam = ", ".join(f"{x:.4f}" for x in ev["lambda"])
            est = ", ".join(f"{x:.3f}" for x in ev["estimate"])
            slack = ", ".join(f"{x:+.3f}" for x in ev["slack"])
            print(f"step {ev['step'] + 1:5d}  loss {ev['loss']:.5f}  λ [{lam}]  constraint [{est}]  slack [{slack}]",
                  flush=True)

    try:
        out = toy.run_toy(args.method, args.threshold, seed=args.seed, steps=args.steps,
                          fixed_weight=args.weight, lam_max=args.lam_max, oracle=not args.no_oracle,
                          callbacks=[progress])
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not args.json:
        print(f"\n{args.method}: requested increase {out['requested']:.3f}, achieved {out['achieved']:.3f} "
              f"(independent oracle measurement); λ = {out['lambda']:.4f}"
              + (f", λ* = {out['lambda_star']:.4f}" if "lambda_star" in out else "")
              + f"; {out['seconds']:.1f} s training")
    print(json.dumps(out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="comfyui-unlearn", description="Constrained unlearning for diffusion models.")
    p.add_argument("--threads", type=int, default=int(os.environ.get("UNLEARN_THREADS", "1")),
                   help="torch CPU threads (default 1: on shared small machines more threads ran ~20x slower)")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    toy = sub.add_parser("toy", help="the paper's 2-D Gaussian-mixture toy: primal-dual unlearning vs the oracle")
    toy.add_argument("--method", choices=sorted(METHODS), default="ru")
    toy.add_argument("--threshold", type=float, default=None,
                     help="increase of the constraint over the frozen model, in the estimator's units "
                          "(RU/ESD: path KL(p||q) nats; FU: forget-set KL nats; LU: decrease of E[log q/p0])")
    toy.add_argument("--weight", type=float, default=None, help="fixed weight for baselines (ESD eta, NegGrad w, SISS λ)")
    toy.add_argument("--lam-max", type=float, default=None, help="upper bound of λ")
    toy.add_argument("--steps", type=int, default=None, help="primal steps (default 1200 for concepts, 3000 for data)")
    toy.add_argument("--seed", type=int, default=0)
    toy.add_argument("--no-oracle", action="store_true", help="skip the λ* bisection (saves ~1 min)")
    toy.add_argument("--json", action="store_true", help="print only the JSON result line")
    toy.set_defaults(func=_cmd_toy, dual_print=100)

    for mod in _PLUGINS:
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        if hasattr(m, "add_subcommand"):
            m.add_subcommand(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    _threads(args.threads)
    try:
        return int(args.func(args) or 0)
    except (UsageError, ValueError, FileNotFoundError, PermissionError, FileExistsError) as e:
        # Bad input of any kind: one clear line, exit code 2 (tracebacks only with --verbose).
        if args.verbose:
            logging.exception("failed")
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
