"""``sample`` subcommand: images from the demo model (optionally with an unlearning LoRA) as PNGs + samples.npy.

    python -m unlearn_core sample --prompt "a handwritten digit three" -n 16 --out out/ [--lora F --strength S]

The lead wires ``add_subcommand`` into ``unlearn_core.cli``; ``python -m unlearn_core.demo.sample`` works alone.
"""

from __future__ import annotations

import argparse
import io
import logging
import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["add_subcommand", "run_sample", "main"]

log = logging.getLogger(__name__)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True, help='text prompt, e.g. "a handwritten digit three"')
    p.add_argument("-n", "--num", type=int, default=16, dest="n", help="number of images (default 16)")
    p.add_argument("--out", type=Path, required=True, help="output folder for PNGs and samples.npy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's, 3)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's, 15)")
    p.add_argument("--lora", type=Path, default=None, help="LoRA file to apply to the UNet")
    p.add_argument("--strength", type=float, default=1.0, help="LoRA strength (default 1)")
    p.add_argument("--weights", type=Path, default=None, help="model folder (default: the shipped demo model)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    p.add_argument("--scale", type=int, default=4, help="PNG upscaling factor (nearest neighbour)")
    p.add_argument("--judge", action="store_true",
                   help="also print how the demo's judge labels the images (count per digit)")


def add_subcommand(subparsers) -> argparse.ArgumentParser:
    """Register ``sample`` on an argparse subparsers object; the handler is ``args.func(args)``."""
    p = subparsers.add_parser(
        "sample",
        help="generate images from the demo model",
        description="Generate images from the demo model; writes PNGs and samples.npy.",
    )
    _add_arguments(p)
    p.set_defaults(func=run_sample)
    return p


def _apply_lora(unet, path: Path, strength: float) -> None:
    """Merge an unlearning LoRA into the demo UNet at ``strength`` (refuses files for another model clearly)."""
    from unlearn_core.lora import apply_lora

    if not path.exists():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    apply_lora(unet, path, strength)


def run_sample(args: argparse.Namespace) -> int:
    from PIL import Image

    from ..report import write_bytes_atomic
    from .model import load_demo_model

    torch.set_num_threads(args.threads)
    if args.n < 1:
        raise ValueError(f"-n must be at least 1, got {args.n}")
    model = load_demo_model(directory=args.weights)
    if args.lora is not None:
        _apply_lora(model.unet, args.lora, args.strength)
    t0 = time.time()
    imgs = model.sample(args.prompt, n=args.n, seed=args.seed, guidance=args.guidance, steps=args.steps)
    seconds = time.time() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    arr = imgs.numpy().astype(np.float32)
    buf = io.BytesIO()
    np.save(buf, arr)
    write_bytes_atomic(args.out / "samples.npy", buf.getvalue(), overwrite=True)  # a kill leaves old or new, never half
    for i, a in enumerate(arr):
        im = Image.fromarray((a * 255).round().astype(np.uint8), mode="L")
        if args.scale > 1:
            im = im.resize((a.shape[1] * args.scale, a.shape[0] * args.scale), Image.NEAREST)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        write_bytes_atomic(args.out / f"{i:04d}.png", buf.getvalue(), overwrite=True)
    print(f"{args.n} images of {args.prompt!r} in {seconds:.1f} s -> {args.out}")
    if args.judge:
        from .judge import load_judge

        counts = torch.bincount(load_judge().predict_digit(imgs), minlength=10).tolist()
        print("judged as digit: " + ", ".join(f"{d}: {c} ({100 * c / args.n:.1f} %)" for d, c in enumerate(counts)))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m unlearn_core.demo.sample", description=__doc__.split("\n")[0])
    _add_arguments(p)
    return run_sample(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
