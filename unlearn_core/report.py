"""The unlearning report: PNG figures (matplotlib, Agg) and one self-contained ``report.html`` that links them.

Every file is written to a temporary name in the same folder and renamed into place, so an interrupted run
never leaves a half-written report, metrics file or figure behind.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .lora import _atomic_write

__all__ = ["write_json_atomic", "write_bytes_atomic", "sample_grid_png", "training_curves_png",
           "requested_vs_achieved_png", "write_report"]


def write_bytes_atomic(path: str | os.PathLike, blob: bytes, overwrite: bool = False) -> Path:
    """Temp file in the same folder + fsync + rename (the LoRA writer's mechanism): a kill leaves old or new."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
    _atomic_write(path, blob, overwrite=True)
    return path


def _clean(x: Any) -> Any:
    """JSON-safe: tensors to lists, non-finite floats to strings."""
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, Path):
        return str(x)
    return x


def write_json_atomic(path: str | os.PathLike, obj: Any, overwrite: bool = False) -> Path:
    return write_bytes_atomic(path, (json.dumps(_clean(obj), indent=2) + "\n").encode(), overwrite)


def _figure_bytes(fig) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def sample_grid_png(rows: Sequence[tuple[str, torch.Tensor]], path: Path, title: str = "", cols: int = 8,
                    overwrite: bool = False) -> Path:
    """One row per prompt: ``rows`` = [(label, images [n, H, W] in [0, 1])], first ``cols`` images each."""
    plt = _plt()
    n_rows = max(len(rows), 1)
    fig, axes = plt.subplots(n_rows, cols, figsize=(cols * 0.75 + 2.6, n_rows * 0.8 + 0.4), squeeze=False)
    for r, (label, imgs) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(imgs):
                ax.imshow(imgs[c].float().numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.axis("off")
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return write_bytes_atomic(path, _figure_bytes(fig), overwrite)


def training_curves_png(history: Sequence[dict], thresholds: Sequence[float], names: Sequence[str], path: Path,
                        keep_names: Sequence[str] = (), keep_threshold: float | None = None,
                        overwrite: bool = False, units: str = "path KL to the concept (nats)") -> Path:
    """λ (and retention μ) vs step, and each constraint estimate vs step against its threshold."""
    plt = _plt()
    duals = [h for h in history if "lambda" in h]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.6))
    steps = [h["step"] + 1 for h in duals]
    for i, name in enumerate(names):
        a1.plot(steps, [h["lambda"][i] for h in duals], label=f"λ {name}")
        line = a2.plot(steps, [h["estimate"][i] for h in duals], label=f"{name} (dual estimate)")[0]
        if any("network_estimate" in h for h in duals):
            a2.plot(steps, [h.get("network_estimate", h["estimate"])[i] for h in duals], ls=":",
                    color=line.get_color(), label=f"{name} (network)")
        a2.axhline(thresholds[i], ls="--", color=line.get_color(), lw=1)
    for j, name in enumerate(keep_names):
        if duals and "keep_mu" in duals[0]:
            a1.plot(steps, [h["keep_mu"][j] for h in duals], lw=0.8, alpha=0.7, label=f"μ {name}" if j < 4 else None)
    a1.set_xlabel("step")
    a1.set_ylabel("dual variable")
    a1.set_title("λ (forget) and μ (retention)")
    a2.set_xlabel("step")
    a2.set_ylabel(units)
    a2.set_title("constraint vs step (dashed: requested)")
    for a in (a1, a2):
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    return write_bytes_atomic(path, _figure_bytes(fig), overwrite)


def requested_vs_achieved_png(rows: Sequence[dict], path: Path, overwrite: bool = False) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(rows), 3.2))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["requested"] for r in rows], width=0.4, label="requested")
    ax.bar([x + 0.2 for x in xs], [r["achieved"] for r in rows], width=0.4, label="achieved")
    ax.set_xticks(list(xs), [r["name"][:20] for r in rows], fontsize=8)
    ax.set_ylabel(rows[0].get("units", "") if rows else "")
    ax.legend(fontsize=8)
    ax.set_title("constraint: requested vs achieved")
    return write_bytes_atomic(path, _figure_bytes(fig), overwrite)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3f}"
        return html.escape(str(v))

    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>")
    return "\n".join(out) + "</table>"


def write_report(path: Path, *, title: str, summary: dict, constraints: Sequence[dict], metrics: dict | None,
                 figures: Sequence[tuple[str, str]], overwrite: bool = False) -> Path:
    """``report.html``: the run's summary, requested vs achieved, the metrics table and the figures (PNG names)."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#eee}"
             "td:first-child{text-align:left}img{max-width:100%;margin:0.5em 0}.bad{color:#b00}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    parts.append(_table(["setting", "value"], [[k, v if not isinstance(v, (list, dict)) else json.dumps(v)]
                                                for k, v in summary.items()]))
    parts.append("<h2>Constraints: requested vs achieved</h2>")
    parts.append(_table(["constraint", "requested", "achieved", "achieved / requested", "λ (final)", "units"],
                        [[c["name"], c["requested"], c["achieved"],
                          c["achieved"] / c["requested"] if c["requested"] else float("nan"), c["lambda"],
                          c.get("units", "")] for c in constraints]))
    if metrics:
        parts.append("<h2>Metrics (judge, same prompts and seeds before and after)</h2>")
        rows = [["erased: " + e["prompt"], "judged as the digit", e["rate_before"], e["rate_after"]]
                for e in metrics["erased"]]
        rows += [["paraphrase (held out): " + e["prompt"], "judged as the digit", e["rate_before"], e["rate_after"]]
                 for e in metrics["paraphrases"]]
        rows += [["kept: " + e["prompt"], "judge accuracy", e["acc_before"], e["acc_after"]]
                 for e in metrics["retained"]]
        parts.append(_table(["prompt", "measure", "before", "after"], rows))
        parts.append(_table(["summary metric", "value"], [
            ["forget rate (erased prompts)", metrics["forget_rate"]],
            ["paraphrase leakage, mean", metrics["paraphrase_leak_mean"]],
            ["paraphrase leakage, max", metrics["paraphrase_leak_max"]],
            ["retention accuracy before", metrics["retention_before"]],
            ["retention accuracy after", metrics["retention_after"]],
            ["retention drop (points)", metrics["retention_drop_points"]],
            ["worst kept digit drop (points)", metrics["retention_worst_drop_points"]],
            ["KID, retained prompts (judge features)", metrics["kid_retained"]],
            ["samples per prompt", metrics["n_per_prompt"]]]))
    for caption_text, name in figures:
        parts.append(f"<h3>{html.escape(caption_text)}</h3><img src='{html.escape(name)}' alt='{html.escape(name)}'>")
    parts.append("</body></html>\n")
    return write_bytes_atomic(path, "\n".join(parts).encode(), overwrite)
