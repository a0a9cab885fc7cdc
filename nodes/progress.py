"""Live training events for the front end: the trainer's events become "unlearn.progress" websocket messages that
``web/js/unlearn.js`` draws as a chart on the running node (loss per step, λ per constraint)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

EVENT = "unlearn.progress"


def _finite(x) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def progress_reporter(node_id: str | None, names: Sequence[str], send: Callable[[str, dict], None] | None = None
                      ) -> Callable[[dict], None]:
    """A trainer callback that forwards step and dual events for ``node_id``. ``send`` defaults to ComfyUI's
    ``PromptServer.instance.send_sync``; without a server (tests, scripts) or a node id it does nothing."""
    if send is None:
        try:
            from server import PromptServer

            send = PromptServer.instance.send_sync
        except (ImportError, AttributeError):
            send = None
    if send is None or node_id is None:
        return lambda ev: None

    def emit(payload: dict) -> None:
        try:
            send(EVENT, {"node": str(node_id), **payload})
        except Exception as e:  # a closed websocket must never stop the training
            log.debug("unlearn.progress not sent: %s", e)

    emit({"reset": True, "names": [str(n) for n in names]})

    def on_event(ev: dict) -> None:
        if ev.get("type") == "step":
            emit({"step": int(ev["step"]), "total": int(ev.get("total", 0)), "loss": _finite(ev.get("loss"))})
        elif ev.get("type") == "dual" and "lambda" in ev:
            emit({"step": int(ev["step"]), "lambda": [_finite(v) for v in ev["lambda"]],
                  "slack": [_finite(v) for v in ev.get("slack", [])]})

    return on_event
