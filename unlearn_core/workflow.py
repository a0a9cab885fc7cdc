"""Front-end workflow JSON (what ComfyUI's editor saves: nodes, links, positions) → API prompt (what ``/prompt`` runs).

Used by ``batch --comfyui`` to submit ``example_workflows/`` to a running server; the server's ``/object_info``
supplies the node definitions. Pure Python, no ComfyUI import (the server tests use it through
``tests/comfy_workflow.py``).

A saved node keeps its widget values by position (``widgets_values``), in the order the front end creates the
widgets: the node's inputs as ``/object_info`` lists them (``input_order``: required, then optional), skipping
sockets, plus two widgets that have no input of their own —
  * "control after generate" after an INT (or COMBO) whose spec sets ``control_after_generate``, or, when the spec
    does not say, after an INT named ``seed`` / ``noise_seed`` (the front end's legacy rule);
  * the upload button after an input with ``image_upload`` / ``video_upload`` / ``audio_upload``.
A widget input that is linked takes its value from the link (the front end still saves the widget's value).
Front-end-only nodes (notes, reroutes, primitive nodes) have no server counterpart: notes are dropped, reroutes
and primitive nodes are resolved into the links and values they stand for. Muted nodes are dropped; bypassed nodes
are refused (their pass-through wiring is not reproduced here).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["WorkflowError", "to_api_prompt", "widget_names"]

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
NOTE_TYPES = {"Note", "MarkdownNote"}
UPLOAD_KEYS = ("image_upload", "video_upload", "audio_upload")
MODE_MUTED, MODE_BYPASSED = 2, 4


class WorkflowError(ValueError):
    """The workflow does not match the server's nodes (unknown type, wrong number of widget values, …)."""


def _is_widget(spec: list) -> bool:
    kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput", False)


def _extra_widgets(name: str, spec: list) -> int:
    kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    n = 0
    control = opts.get("control_after_generate")
    if control is None and kind == "INT":
        control = name in ("seed", "noise_seed")
    if control and (kind in ("INT", "COMBO") or isinstance(kind, list)):
        n += 1
    n += sum(1 for k in UPLOAD_KEYS if opts.get(k))
    return n


def widget_names(info: Mapping[str, Any]) -> list[tuple[str, int]]:
    """``(input name, extra widget values after it)`` for every widget of a node type, in saved order."""
    spec = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
    order = info.get("input_order") or {k: list(v) for k, v in info["input"].items() if k != "hidden"}
    names = list(order.get("required", [])) + list(order.get("optional", []))
    return [(n, _extra_widgets(n, spec[n])) for n in names if _is_widget(spec[n])]


def to_api_prompt(workflow: Mapping[str, Any], object_info: Mapping[str, Any],
                  overrides: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, dict]:
    """The API prompt for ``workflow``. ``overrides`` maps a node's id, title or type to ``{input: value}``
    (applied in that order of precedence: id over title over type); naming an input the node lacks is an error."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow.get("links", [])}

    def source(link_id: int) -> list | None:
        """[origin id, slot] of a link, through reroutes; ``None`` if it starts at a primitive node (the target
        widget then holds the value)."""
        seen = set()
        while True:
            if link_id in seen or link_id not in links:
                raise WorkflowError(f"link {link_id} is dangling or circular")
            seen.add(link_id)
            _, origin, slot = links[link_id][:3]
            node = nodes[origin]
            if node["type"] == "Reroute":
                link_id = node["inputs"][0].get("link")
                if link_id is None:
                    raise WorkflowError(f"reroute {origin} has no input")
                continue
            if node["type"] == "PrimitiveNode":
                return None
            if node.get("mode", 0) == MODE_MUTED:
                raise WorkflowError(f"node {origin} ({node['type']}) is muted but its output is used")
            return [str(origin), slot]

    used: set[str] = set()
    prompt: dict[str, dict] = {}
    for nid, node in nodes.items():
        kind = node["type"]
        if kind in NOTE_TYPES or kind in ("Reroute", "PrimitiveNode") or node.get("mode", 0) == MODE_MUTED:
            continue
        if node.get("mode", 0) == MODE_BYPASSED:
            raise WorkflowError(f"node {nid} ({kind}) is bypassed; bypass is not supported by this converter")
        if kind not in object_info:
            raise WorkflowError(f"node {nid}: type {kind!r} is unknown to this server (a custom node not installed?)")
        widgets = widget_names(object_info[kind])
        saved = node.get("widgets_values") or []
        inputs: dict[str, Any] = {}
        if isinstance(saved, Mapping):  # some nodes save their widgets by name
            inputs.update({k: v for k, v in saved.items() if k in dict(widgets)})
        else:
            expected = sum(1 + extra for _, extra in widgets)
            if len(saved) != expected:
                raise WorkflowError(f"node {nid} ({kind}): {len(saved)} widget values, but this server's {kind} has "
                                    f"{expected} widgets {[w for w, _ in widgets]} — saved for another version?")
            pos = 0
            for name, extra in widgets:
                inputs[name] = saved[pos]
                pos += 1 + extra
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                src = source(slot["link"])
                if src is not None:
                    inputs[slot["name"]] = src
        title = node.get("title") or kind
        valid = {n for sect in ("required", "optional") for n in object_info[kind]["input"].get(sect, {})}
        for key in (kind, title, str(nid)):
            for name, value in (overrides or {}).get(key, {}).items():
                if name not in valid:
                    raise WorkflowError(f"override {key!r}: {kind} has no input {name!r}")
                inputs[name] = value
                used.add(key)
        prompt[str(nid)] = {"class_type": kind, "inputs": inputs, "_meta": {"title": title}}
    unknown = set(overrides or {}) - used
    if unknown:
        raise WorkflowError(f"overrides name no node of this workflow: {sorted(unknown)}")
    return prompt
