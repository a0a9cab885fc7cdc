"""``batch`` subcommand: many unlearning jobs from one YAML or JSON file, in order, resumable.

    python -m unlearn_core batch jobs.yaml                       # train here, like `unlearn` once per job
    python -m unlearn_core batch jobs.yaml --comfyui http://127.0.0.1:8188   # queue each job on a ComfyUI server

The file is a list of jobs, or ``{"defaults": {...}, "jobs": [...]}``. A job holds the options of ``unlearn``
(``concept: three`` is ``--concept three``; lists repeat an option; ``true`` is a flag; ``set`` may be a mapping),
plus ``name`` (the LoRA's file name, without ``.safetensors``; default ``<method>-<concept>``) and, for
``--comfyui``, ``comfyui`` (inputs of other workflow nodes: ``{node id, title or type: {input: value}}``). Each job
is parsed by the ``unlearn`` command's own argument parser, so the options are the same by construction; every job
is checked before any training, and a bad one stops the batch with exit code 2.

Resume: a job's output folder gets ``batch.json``, written atomically when the job starts and when it finishes:
its resolved options (every ``unlearn`` option after defaults, plus the parsed ``set`` overrides; not ``out``,
``overwrite`` or ``quiet``) and their SHA-256 fingerprint. A rerun skips a job whose record has the same fingerprint
and says done and whose LoRA and ``metrics.json`` are there; it reruns one that started but did not finish (the
leftovers are its own); it refuses a folder that holds results of other options, or files no batch recorded, unless
the job says ``overwrite: true``. With ``--comfyui`` the check is the LoRA's own metadata on the server (method,
concepts, anchor, steps, seed, targets, rank), read through ``/view_metadata``.

A failed job is recorded and the batch goes on; Ctrl-C stops the current job at the next step (``unlearn`` keeps
the last good LoRA as ``*.partial.safetensors``), marks the rest "not run" and exits with 130 — a rerun resumes.
Exit codes: 0 all done or skipped, 1 some job failed, 2 bad input (nothing ran), 130 interrupted. The summary is
written to ``--summary`` (default: ``batch-summary.json`` in the folder that holds the jobs' output folders; the
current folder with ``--comfyui``) and printed as the last line of stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import hashlib
import json
import logging
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import unlearn

__all__ = ["add_subcommand", "load_jobs_file", "options_to_argv", "job_fingerprint", "ComfyClient"]

log = logging.getLogger(__name__)

RECORD = "batch.json"  # per-job sidecar in the job's output folder
SUMMARY = "batch-summary.json"
FORMAT_VERSION = 1
BATCH_KEYS = ("name", "comfyui")  # job keys that are not `unlearn` options
NOT_FINGERPRINTED = ("out", "overwrite", "quiet", "func", "resume", "checkpoint_every",
                     "micro_batch")  # where and how, not what (micro_batch: the same steps up to rounding)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
EXAMPLE_WORKFLOW = Path(__file__).resolve().parents[1] / "example_workflows" / "01_erase_a_concept.json"
UNLEARN_NODE, SAVE_NODE = "Unlearn_UnlearnConcept", "Unlearn_SaveUnlearningLora"
# `unlearn` option → input of the Unlearn Concept node. Only options a job gives are set; the rest keep the workflow's
# values (the CLI's defaults are tuned for the demo model on a CPU, the workflow's for SD checkpoints).
NODE_INPUTS = {"concept": "concept", "anchor": "anchor", "method": "method", "threshold": "threshold",
               "steps": "steps", "rank": "rank", "targets": "targets", "lr": "learning_rate", "seed": "seed",
               "weight": "esd_eta", "keep": "keep_prompts", "micro_batch": "micro_batch"}
_wait = time.sleep  # the --comfyui poll interval (tests replace it)


class JobFailed(RuntimeError):
    """A job could not run or did not finish; the batch records the message and goes on."""


class ServerCancelled(RuntimeError):
    """The job was cancelled on the ComfyUI server (its Cancel button): the batch stops as after Ctrl-C."""


# ------------------------------------------------------------------------------------------------ jobs file
def load_jobs_file(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The jobs of a YAML/JSON file, each with the file's ``defaults`` merged under it (the job's keys win)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"jobs file {path} does not exist" if not path.exists() else
                                f"jobs file {path} is a folder; give a .yaml or .json file")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ValueError(f"{path}: not valid YAML ({where}{problem})") from None
    defaults: Any = {}
    if isinstance(data, Mapping):
        extra = set(data) - {"defaults", "jobs"}
        if extra or "jobs" not in data:
            raise ValueError(f"{path}: expected a list of jobs or {{defaults: {{...}}, jobs: [...]}}; "
                             + (f"unknown top-level key {sorted(map(str, extra))[0]!r}" if extra else "no 'jobs' key"))
        defaults, jobs = data.get("defaults") or {}, data["jobs"]
    else:
        jobs = data
    if not isinstance(defaults, Mapping):
        raise ValueError(f"{path}: 'defaults' must be a mapping of options, got {type(defaults).__name__}")
    if not isinstance(jobs, list) or not jobs:
        raise ValueError(f"{path}: no jobs — give a non-empty list of jobs, e.g. [{{concept: three}}]")
    out = []
    for i, job in enumerate(jobs, 1):
        if not isinstance(job, Mapping):
            raise ValueError(f"{path}: job {i} must be a mapping of options (e.g. {{concept: three}}), got {job!r}")
        out.append({**defaults, **job})
    return out


class OptionError(ValueError):
    """A job's option that the ``unlearn`` parser refuses."""


def unlearn_parser() -> argparse.ArgumentParser:
    """The ``unlearn`` subcommand's own parser, raising :class:`OptionError` instead of exiting."""
    holder = argparse.ArgumentParser(prog="comfyui-unlearn", add_help=False)
    parser = unlearn.add_subcommand(holder.add_subparsers())

    def error(message: str):
        raise OptionError(re.sub(r"^argument --([\w-]+)(/\S+)?: ", lambda m: m[1].replace("-", "_") + ": ", message))

    parser.error = error  # type: ignore[method-assign]
    return parser


def _arg_text(key: str, value: Any, action: argparse.Action) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, (Mapping, list, tuple)):
        want = "a number" if action.type in (int, float) else "a text"
        hint = " (YAML reads yes/no/on/off as true/false: quote it)" if isinstance(value, bool) else ""
        raise OptionError(f"{key}: expected {want}, got {json.dumps(value)}{hint}")
    return str(value)


def options_to_argv(options: Mapping[str, Any], parser: argparse.ArgumentParser | None = None) -> list[str]:
    """``{"concept": ["three"], "steps": 5, "exact_wording": True}`` → ``["--concept=three", "--steps=5",
    "--exact-wording"]``: lists repeat an option, ``true`` is a flag (``false`` and ``null`` leave it out), ``set``
    may be a mapping. An unknown key is an :class:`OptionError` that names it (and the nearest option)."""
    parser = parser or unlearn_parser()
    known = {f[2:].replace("-", "_"): a for f, a in parser._option_string_actions.items()
             if f.startswith("--") and f != "--help"}
    argv: list[str] = []
    for key, value in options.items():
        key = str(key)
        if key in BATCH_KEYS:
            continue
        action = known.get(key.replace("-", "_"))
        if action is None:
            near = difflib.get_close_matches(key.replace("-", "_"), [*known, *BATCH_KEYS], n=1)
            raise OptionError(f"unknown option {key!r}" + (f" (did you mean {near[0]!r}?)" if near else
                                                          f"; options: {', '.join(sorted(known))}"))
        flag = next(s for s in action.option_strings if s.startswith("--"))
        if value is None:
            continue
        if action.nargs == 0:
            if not isinstance(value, bool):
                raise OptionError(f"{key}: expected true or false, got {json.dumps(value)}")
            if value:
                argv.append(flag)
            continue
        if action.dest == "set" and isinstance(value, Mapping):
            values: list[Any] = [f"{k}={v}" for k, v in value.items()]
        elif isinstance(action, argparse._AppendAction):
            values = list(value) if isinstance(value, (list, tuple)) else [value]
        else:
            values = [value]
        # --flag=value: a value that starts with '-' (an anchor "-x", a threshold "-1") stays a value
        argv += [f"{flag}={_arg_text(key, v, action)}" for v in values]
    return argv


def job_fingerprint(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """The job's resolved options (parser defaults filled in, ``set`` parsed) and their SHA-256: what the LoRA is
    made of, not where it goes — so ``steps: 120`` and an omitted ``steps`` (default 120) agree."""
    canon: dict[str, Any] = {}
    for k, v in sorted(vars(args).items()):
        if k in NOT_FINGERPRINTED:
            continue
        canon[k] = str(v) if isinstance(v, Path) else v
    canon["set"] = dict(sorted(unlearn.parse_overrides(args.set or []).items()))
    with unlearn.overridden_defaults(canon["set"]):  # an omitted option and its default value agree
        canon.update(unlearn.resolve_options(args))
    blob = json.dumps(canon, sort_keys=True, separators=(",", ":"), default=str).encode()
    return canon, "sha256:" + hashlib.sha256(blob).hexdigest()


@dataclasses.dataclass
class BatchJob:
    index: int
    name: str
    options: dict[str, Any]
    args: argparse.Namespace
    given: set[str]  # destinations of the options the job (or the defaults) set
    job: unlearn.UnlearnJob
    canonical: dict[str, Any]
    fingerprint: str
    overrides: dict[str, Any]
    prompt: dict | None = None  # --comfyui: the API prompt to queue

    @property
    def label(self) -> str:
        return f"job {self.index} ({self.name})"


def prepare_jobs(entries: list[dict[str, Any]], out_root: Path, comfy: bool = False) -> list[BatchJob]:
    """Parse and check every job before anything runs; a problem is a ``ValueError`` naming the job."""
    parser = unlearn_parser()
    jobs: list[BatchJob] = []
    for i, options in enumerate(entries, 1):
        label = f"job {i}" + (f" ({options['name']})" if isinstance(options.get("name"), str) else "")
        try:
            jobs.append(_prepare(i, options, parser, out_root, comfy))
        except (ValueError, FileNotFoundError, FileExistsError, PermissionError) as e:
            raise ValueError(f"{label}: {e}") from None
    seen: dict[Any, BatchJob] = {}
    for bj in jobs:
        key = bj.name.lower() if comfy else bj.job.out.resolve()
        if key in seen:
            where = f"the LoRA name {bj.name!r}" if comfy else f"the output folder {bj.job.out}"
            raise ValueError(f"{seen[key].label} and {bj.label} both write {where}; give each job its own "
                             + ("name" if comfy else "out or name"))
        seen[key] = bj
    return jobs


def _prepare(index: int, options: dict[str, Any], parser, out_root: Path, comfy: bool) -> BatchJob:
    argv = options_to_argv(options, parser)
    given = {parser._option_string_actions[a.split("=", 1)[0]].dest for a in argv}
    args = parser.parse_args(argv)
    name = options.get("name")
    if name is not None and not (isinstance(name, str) and _NAME.fullmatch(name) and ".." not in name):
        raise OptionError(f"name: {name!r} is not a plain file name — use letters, digits, '_', '-', '.', '+', "
                          "starting with a letter or digit")
    if comfy:
        if isinstance(name, str) and "+" in name:
            raise OptionError(f"name: {name!r} has a '+', which ComfyUI's Save Unlearning LoRA node refuses")
        refused = sorted(given & {"forget", "retain", "caption", "threshold_raw", "set", "tokenizer", "resolution"})
        if refused:
            raise OptionError(f"{refused[0]}: not available with --comfyui (the batch fills the Unlearn Concept node "
                              "of a workflow: concept, anchor, method, threshold, steps, rank, targets, lr, seed, "
                              "weight, keep, model; other node inputs go under 'comfyui', e.g. "
                              "{Unlearn Concept: {width: 256, height: 256}})")
        extra = options.get("comfyui", {})
        if not (isinstance(extra, Mapping) and all(isinstance(v, Mapping) for v in extra.values())):
            raise OptionError("comfyui: expected {node id, title or type: {input: value}}, e.g. "
                              "{KSampler: {steps: 20}}")
    placeholder = args.out is None
    if placeholder:
        args.out = out_root
    job, overrides = unlearn.prepare_job(args)
    if name is None:
        # ComfyUI's Save node takes no '+' (a several-concept default name joins them with it)
        name = job.name.replace("+", "_") if comfy else job.name
    job.name = name
    if placeholder:
        job.out = out_root / name
        args.out = None
    canonical, fingerprint = job_fingerprint(args)
    return BatchJob(index=index, name=name, options=dict(options), args=args, given=given, job=job,
                    canonical=canonical, fingerprint=fingerprint, overrides=overrides)


# ------------------------------------------------------------------------------------------------ local runs
def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _differences(recorded: Mapping[str, Any], wanted: Mapping[str, Any]) -> str:
    keys = sorted(k for k in set(recorded) | set(wanted) if recorded.get(k) != wanted.get(k))
    shown = [f"{k}: {json.dumps(recorded.get(k))} → {json.dumps(wanted.get(k))}" for k in keys[:3]]
    return ", ".join(shown) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def _write_record(bj: BatchJob, status: str, **extra: Any) -> None:
    from .report import write_json_atomic

    write_json_atomic(bj.job.out / RECORD, {"format": FORMAT_VERSION, "fingerprint": bj.fingerprint,
                                            "status": status, "name": bj.name, "lora": bj.job.lora_path.name,
                                            "updated": _now(), "options": bj.canonical, **extra}, overwrite=True)


def resume_state(bj: BatchJob) -> tuple[str, bool]:
    """``("skip", _)`` for a finished job; ``("run", overwrite)`` otherwise; :class:`JobFailed` for a folder that
    holds results this job must not replace."""
    job = bj.job
    record = _read_json(job.out / RECORD)
    results = [p for p in (job.lora_path, job.out / "metrics.json", job.out / "report.html") if p.exists()]
    if record is not None and record.get("fingerprint") == bj.fingerprint:
        if record.get("status") == "done" and job.lora_path.is_file() and (job.out / "metrics.json").is_file():
            return "skip", False
        return "run", True  # started before and not finished: what is there is this job's own
    if not results or job.overwrite:
        return "run", job.overwrite
    if record is not None:
        changed = _differences(record.get("options") or {}, bj.canonical)
        raise JobFailed(f"{job.out} holds results of other options ({changed}); set overwrite: true to replace them, "
                        "or give this job another out or name")
    raise JobFailed(f"{results[0]} already exists and was not made by a batch with these options; set overwrite: "
                    "true to replace it, or give this job another out or name")


def _metrics_row(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """What the summary shows of a job's ``metrics.json``."""
    row: dict[str, Any] = {}
    if metrics.get("lora"):
        row["lora"] = str(metrics["lora"])
    cons = metrics.get("constraints") or []
    if cons:
        row["constraints"] = [{k: c.get(k) for k in ("name", "requested", "achieved", "lambda")} for c in cons]
    ev = metrics.get("evaluation") or {}
    for k in ("forget_rate", "paraphrase_leak_mean", "retention_drop_points"):
        if ev.get(k) is not None:
            row[k] = ev[k]
    return row


def run_local_job(bj: BatchJob, row: dict[str, Any], quiet: bool) -> dict[str, Any]:
    """Train one job here (or skip it); ``row`` (its summary line) learns where it goes before anything runs."""
    job = bj.job
    row.update(out=str(job.out), fingerprint=bj.fingerprint)
    state, overwrite = resume_state(bj)
    if state == "skip":
        return {**row, "status": "skipped", "message": "already done with these options",
                **_metrics_row(_read_json(job.out / "metrics.json") or {})}
    job.overwrite = overwrite
    record = _read_json(job.out / RECORD)
    if record is not None and record.get("fingerprint") == bj.fingerprint:
        job.resume = True  # this job was interrupted: continue from its last training checkpoint, if any
    elif overwrite:
        with contextlib.suppress(FileNotFoundError):
            job.checkpoint_path.unlink()  # a checkpoint of other options, which this job replaces
    unlearn.check_output_folder(job.out, [], overwrite=True)  # a clear error before the record is written
    _write_record(bj, "started")
    quiet = quiet or bool(bj.args.quiet)
    with unlearn.overridden_defaults(bj.overrides):  # `--set`, for this job only (as `unlearn` does)
        metrics = unlearn.run_job(job, quiet=quiet, progress=not quiet)
    _write_record(bj, "done", seconds=metrics.get("seconds"))
    return {**row, "status": "done", **_metrics_row(metrics)}


# ------------------------------------------------------------------------------------------------ ComfyUI
class ComfyClient:
    """The few ComfyUI HTTP routes a batch needs (``/object_info``, ``/prompt``, ``/history``, ``/view_metadata``,
    ``/interrupt``, ``/queue``), with the standard library only."""

    def __init__(self, url: str, timeout: float = 30.0):
        url = url.strip().rstrip("/")
        if "://" not in url:
            url = "http://" + url
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"--comfyui {url}: give the server's http:// address, e.g. http://127.0.0.1:8188")
        self.url, self.timeout = url, timeout
        self.client_id = "unlearn-batch-" + uuid.uuid4().hex[:12]

    def request(self, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data,
                                     headers={"Content-Type": "application/json"} if data is not None else {})
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            text = r.read().decode()
        return json.loads(text) if text.strip() else None

    def object_info(self) -> dict:
        try:
            return self.request("/object_info")
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise ValueError(f"cannot reach ComfyUI at {self.url} ({reason}); start it, or check --comfyui") from None

    def lora_metadata(self, filename: str) -> dict | None:
        """The ``__metadata__`` of ``models/loras/<filename>``; ``None`` if the server has no such file."""
        try:
            return self.request("/view_metadata/loras?filename=" + urllib.parse.quote(filename))
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise

    def queue(self, prompt: dict, prompt_id: str) -> dict:
        """POST /prompt; a refusal (HTTP 400 with ``node_errors``) is a :class:`JobFailed` that says which node."""
        try:
            answer = self.request("/prompt", {"prompt": prompt, "client_id": self.client_id, "prompt_id": prompt_id})
        except urllib.error.HTTPError as e:
            try:
                body = json.loads(e.read().decode() or "{}")
            except ValueError:
                body = {}
            raise JobFailed(f"ComfyUI refused the workflow (HTTP {e.code}): {_refusal(body)}") from None
        if answer.get("node_errors"):
            self.cancel(prompt_id)  # queued for its valid outputs only: the LoRA may not be among them
            raise JobFailed(f"ComfyUI refused nodes of the workflow: {_refusal(answer)}")
        return answer

    def wait(self, prompt_id: str, poll: float, timeout: float | None, retries: int = 5) -> dict:
        """The ``/history`` entry of a finished prompt; past ``timeout`` it is cancelled on the server. A few failed
        polls in a row are forgiven (a busy server may drop one); more mean the server is gone."""
        deadline = None if timeout is None else time.monotonic() + timeout
        failures = 0
        while True:
            try:
                entry = (self.request(f"/history/{prompt_id}") or {}).get(prompt_id)
                failures = 0
            except (urllib.error.URLError, OSError, ValueError) as e:
                failures += 1
                if failures > retries:
                    raise JobFailed(f"lost ComfyUI at {self.url} while waiting for the job "
                                    f"({getattr(e, 'reason', None) or e})") from None
                entry = None
            status = (entry or {}).get("status") or {}
            if status.get("status_str") in ("success", "error"):
                return entry
            if deadline is not None and time.monotonic() > deadline:
                self.cancel(prompt_id)
                raise JobFailed(f"did not finish within {timeout:g} s (--timeout); cancelled it on the server")
            _wait(poll)  # polling the server, not timing anything

    def cancel(self, prompt_id: str) -> None:
        """Drop the prompt from the queue if it waits there and interrupt it if it runs (only that prompt)."""
        for path, body in (("/queue", {"delete": [prompt_id]}), ("/interrupt", {"prompt_id": prompt_id})):
            try:
                self.request(path, body)
            except (urllib.error.URLError, OSError, ValueError) as e:
                log.warning("could not cancel prompt %s on %s (%s)", prompt_id, self.url, e)


def _refusal(body: Mapping[str, Any]) -> str:
    parts = []
    for nid, ne in (body.get("node_errors") or {}).items():
        for err in ne.get("errors", [])[:1]:
            parts.append(f"node {nid} ({ne.get('class_type', '?')}): {err.get('message')}: {err.get('details')}")
    err = body.get("error")
    if not parts and isinstance(err, Mapping):
        parts.append(f"{err.get('message')}" + (f": {err.get('details')}" if err.get("details") else ""))
    return "; ".join(parts) or json.dumps(body)[:300]


def _nodes_of(workflow: Mapping[str, Any], kind: str) -> list[str]:
    return [str(n["id"]) for n in workflow.get("nodes", []) if n.get("type") == kind and n.get("mode", 0) != 2]


def load_workflow(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"workflow {path} does not exist; give --workflow (the repository's "
                                "example_workflows/01_erase_a_concept.json or a workflow saved from ComfyUI)")
    try:
        wf = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"workflow {path} is not JSON ({e})") from None
    if not isinstance(wf, Mapping) or "nodes" not in wf:
        raise ValueError(f"workflow {path} is not a workflow saved by ComfyUI's editor (no 'nodes'); save it with "
                         "Workflow → Save, not Export (API)")
    for kind in (UNLEARN_NODE, SAVE_NODE):
        n = len(_nodes_of(wf, kind))
        if n != 1:
            raise ValueError(f"workflow {path} has {n} {kind} nodes; the batch fills exactly one Unlearn Concept and "
                             "one Save Unlearning LoRA node")
    return wf


def comfy_prompt(bj: BatchJob, workflow: Mapping[str, Any], object_info: Mapping[str, Any]) -> dict:
    """The API prompt of ``workflow`` with this job's options on the Unlearn Concept node, its name on the Save
    node, and the job's ``comfyui`` inputs on the others."""
    from .workflow import to_api_prompt

    a, given = bj.args, bj.given
    node: dict[str, Any] = {}
    for opt, inp in NODE_INPUTS.items():
        if opt in given:
            node[inp] = getattr(a, opt)
    if "method" in node:
        node["method"] = node["method"].upper()
    if "concept" in node:
        node["concept"] = "\n".join(node["concept"])  # one concept per line, wordings split by '|'
    keep = list(a.keep or [])
    if "erase_from" in given and a.erase_from is not None:  # as `unlearn --erase-from`: anchor and kept prompt
        node["anchor"] = a.erase_from
        keep += [a.erase_from] if a.erase_from not in keep else []
    if keep:
        node["keep_prompts"] = "\n".join(keep)
    overrides: dict[str, dict] = {str(k): dict(v) for k, v in (bj.options.get("comfyui") or {}).items()}
    if "model" in given and a.model not in ("demo", "", None):
        overrides.setdefault("CheckpointLoaderSimple", {})["ckpt_name"] = a.model
    overrides.setdefault(_nodes_of(workflow, UNLEARN_NODE)[0], {}).update(node)
    overrides.setdefault(_nodes_of(workflow, SAVE_NODE)[0], {}).update(filename=bj.name,
                                                                       overwrite=bool(bj.job.overwrite))
    return to_api_prompt(workflow, object_info, overrides)


def _node_concepts(text: str) -> list[list[str]]:
    """As the Unlearn Concept node reads its text: one concept per line, wordings split by '|'."""
    lines = [s.strip() for s in (text or "").splitlines() if s.strip()]
    return [ws for ws in ([w.strip() for w in line.split("|") if w.strip()] for line in lines) if ws]


def metadata_differences(md: Mapping[str, str], prompt: Mapping[str, Any]) -> list[str]:
    """What a LoRA on the server records differently from what this prompt would train: method, concepts, anchor,
    steps, seed, targets, rank (the Unlearn Concept node writes these into the file)."""
    inputs = next(n["inputs"] for n in prompt.values() if n["class_type"] == UNLEARN_NODE)
    want: dict[str, Any] = {}
    if isinstance(inputs.get("concept"), str):
        concepts = _node_concepts(inputs["concept"])
        want["unlearn.concepts"] = [" | ".join(w) for w in concepts]
        if isinstance(inputs.get("anchor"), str):
            want["unlearn.anchors"] = [inputs["anchor"]] * len(concepts)
    for key, inp in (("unlearn.method", "method"), ("unlearn.steps", "steps"), ("unlearn.seed", "seed"),
                     ("unlearn.lora_targets", "targets"), ("ss_network_dim", "rank")):
        v = inputs.get(inp)
        if isinstance(v, (str, int, float)):
            want[key] = str(v).lower() if inp == "method" else str(v)
    diffs = []
    for key, v in want.items():
        got: Any = md.get(key)
        if isinstance(v, list):
            try:
                got = json.loads(got) if got is not None else None
            except ValueError:
                pass
        if got != v:
            diffs.append(f"{key.split('.')[-1]}: {_show(got)} on the server, {_show(v)} in this job")
    return diffs


def _lora_file(name: str) -> str:
    """The file the Save Unlearning LoRA node writes for ``name`` (it adds the suffix unless given)."""
    return name if name.lower().endswith(".safetensors") else name + ".safetensors"


def _show(x: Any) -> str:
    return x if isinstance(x, str) else json.dumps(x)


def _lora_row(md: Mapping[str, str] | None) -> dict[str, Any]:
    try:
        rows = json.loads((md or {}).get("unlearn.constraints", "[]"))
    except ValueError:
        return {}
    if not rows:
        return {}
    return {"constraints": [{k: r.get(k) for k in ("name", "requested", "achieved", "lambda")} for r in rows]}


def run_comfy_job(bj: BatchJob, row: dict[str, Any], client: ComfyClient, poll: float,
                  timeout: float | None) -> dict[str, Any]:
    """Queue one job on the server and wait for it (or skip it); ``row`` learns the prompt id once it is queued."""
    assert bj.prompt is not None
    filename = _lora_file(bj.name)
    row["lora"] = f"models/loras/{filename}"
    existing = client.lora_metadata(filename)
    if existing is not None:
        diffs = metadata_differences(existing, bj.prompt)
        if not diffs:
            return {**row, "status": "skipped", "message": "already on the server with these settings",
                    **_lora_row(existing)}
        if not bj.job.overwrite:
            raise JobFailed(f"models/loras/{filename} exists on the server with other settings "
                            f"({'; '.join(diffs[:3])}); set overwrite: true to replace it, or give this job another "
                            "name")
    prompt_id = str(uuid.uuid4())  # ours, not the server's: a Ctrl-C during the POST can still cancel it
    row["prompt_id"] = prompt_id
    try:
        client.queue(bj.prompt, prompt_id)
        entry = client.wait(prompt_id, poll, timeout)
    except KeyboardInterrupt:
        client.cancel(prompt_id)
        raise
    status = entry.get("status") or {}
    messages = status.get("messages") or []
    for kind, data in messages:
        if kind == "execution_interrupted":
            raise ServerCancelled(f"cancelled on the ComfyUI server in node {data.get('node_id')} "
                                  f"({data.get('node_type')})")
    if status.get("status_str") != "success":
        errs = [d for k, d in messages if k == "execution_error"]
        detail = (f"{errs[0].get('node_type')} (node {errs[0].get('node_id')}): {errs[0].get('exception_message')}"
                  if errs else "no error message")
        raise JobFailed(f"the workflow failed on the server: {str(detail).strip()}")
    outputs = entry.get("outputs") or {}
    texts = {nid: o["text"] for nid, o in outputs.items() if isinstance(o, Mapping) and o.get("text")}
    images = [f"{i.get('subfolder', '')}/{i['filename']}".lstrip("/") for o in outputs.values()
              if isinstance(o, Mapping) for i in o.get("images", []) if i.get("type") == "output"]
    try:
        row.update(_lora_row(client.lora_metadata(filename)))
    except (urllib.error.URLError, OSError, ValueError) as e:  # the job itself succeeded
        log.warning("could not read the metadata of models/loras/%s (%s)", filename, e)
    return {**row, "status": "done", "outputs": texts, "images": images}


# ------------------------------------------------------------------------------------------------ the batch
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if isinstance(e, (JobFailed, ValueError, OSError)) and text else f"{type(e).__name__}: {text}"


def run_batch(jobs: list[BatchJob], run_one: Callable[[BatchJob, dict], dict],
              say: Callable[[str], None]) -> tuple[list[dict], bool]:
    """Run the jobs in order: ``run_one(job, row)`` returns the job's summary row (status done or skipped) or
    raises. Returns one row per job and whether the batch was interrupted."""
    rows = [{"index": bj.index, "name": bj.name, "status": "not run", "seconds": 0.0,
             **({"out": str(bj.job.out)} if bj.prompt is None else {"lora": f"models/loras/{_lora_file(bj.name)}"})}
            for bj in jobs]
    t_batch = time.perf_counter()
    n = len(jobs)
    for bj, row in zip(jobs, rows):
        say(f"[{bj.index}/{n}] {bj.name}: starting (batch time {_clock(time.perf_counter() - t_batch)})")
        t0 = time.perf_counter()
        try:
            row.update(run_one(bj, row))
        except (KeyboardInterrupt, ServerCancelled) as e:
            row.update(status="interrupted", seconds=round(time.perf_counter() - t0, 1),
                       message=(str(e) or "interrupted") + "; rerun the batch to redo it")
            partial = bj.job.partial_path
            if bj.prompt is None and partial.is_file():
                row["partial"] = str(partial)
            say(f"[{bj.index}/{n}] {bj.name}: interrupted after {row['seconds']:.1f} s — "
                f"{sum(r['status'] == 'not run' for r in rows)} job(s) not run")
            return rows, True
        except Exception as e:  # one job's failure is the batch's data, not its end
            log.info("%s failed", bj.label, exc_info=True)
            row.update(status="failed", message=_one_line(e))
        row["seconds"] = round(time.perf_counter() - t0, 1)
        say(f"[{bj.index}/{n}] {bj.name}: {row['status']} in {row['seconds']:.1f} s"
            + (f" — {row['message']}" if row["status"] == "failed" else "")
            + f" (batch time {_clock(time.perf_counter() - t_batch)})")
    return rows, False


def exit_code(rows: list[dict], interrupted: bool) -> int:
    if interrupted:
        return 130
    return 1 if any(r["status"] == "failed" for r in rows) else 0


def format_table(rows: list[dict]) -> str:
    """The summary for people: one line per job."""

    def ratio(c: dict) -> str:
        a, b = c.get("achieved"), c.get("requested")
        ok = isinstance(a, (int, float)) and isinstance(b, (int, float)) and b
        return f"{a / b:.0%}" if ok else "–"

    def achieved(r: dict) -> str:
        return ",".join(ratio(c) for c in r.get("constraints") or []) or "–"

    table = [("#", "name", "status", "seconds", "forget", "achieved", "output")]
    for r in rows:
        fr = r.get("forget_rate")
        table.append((str(r["index"]), r["name"], r["status"], f"{r.get('seconds', 0):.1f}",
                      f"{fr:.0%}" if isinstance(fr, (int, float)) else "–", achieved(r),
                      r.get("out") or r.get("lora") or ""))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    right = {0, 3, 4, 5}
    lines = ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
             for row in table]
    notes = [f"  {r['index']}: {r['message']}" for r in rows if r["status"] in ("failed", "interrupted")]
    return "\n".join(lines + notes)


def default_summary_path(jobs: list[BatchJob], comfy: bool) -> Path:
    """``batch-summary.json`` beside the jobs' output folders (their common parent), else in the current folder."""
    if comfy:
        return Path(SUMMARY)
    try:
        common = Path(os.path.commonpath([str(bj.job.out.resolve().parent) for bj in jobs]))
    except ValueError:
        return Path(SUMMARY)
    return (common if common.parent != common else Path.cwd()) / SUMMARY


# ------------------------------------------------------------------------------------------------ CLI
def add_subcommand(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("batch", help="run many unlearning jobs from a YAML/JSON file (resumable), here or on "
                                            "a ComfyUI server",
                              description="Run many unlearning jobs from one YAML or JSON file, in order, resumably.",
                              epilog="\n\n".join(__doc__.split("\n\n")[2:]).replace("``", "'"),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("jobs", type=Path, metavar="JOBS", help="YAML or JSON: a list of jobs (options of `unlearn`, plus "
                                                           "'name'), or {defaults: {...}, jobs: [...]}")
    p.add_argument("--out", type=Path, default=Path("runs"),
                   help="folder for the output folders of jobs that give no 'out' (each: <out>/<name>; default: runs)")
    p.add_argument("--summary", type=Path, default=None,
                   help="summary JSON (default: batch-summary.json beside the jobs' output folders; with --comfyui, "
                        "in the current folder)")
    p.add_argument("--quiet", action="store_true", help="no progress; print only the final JSON line")
    g = p.add_argument_group("ComfyUI server")
    g.add_argument("--comfyui", default=None, metavar="URL",
                   help="queue each job as a workflow on the ComfyUI server at URL (e.g. http://127.0.0.1:8188) "
                        "instead of training here; the LoRAs go to the server's models/loras/<name>.safetensors")
    g.add_argument("--workflow", type=Path, default=EXAMPLE_WORKFLOW,
                   help="workflow saved by ComfyUI's editor with one Unlearn Concept and one Save Unlearning LoRA node "
                        "(default: the repository's example_workflows/01_erase_a_concept.json)")
    g.add_argument("--timeout", type=float, default=None, help="seconds one job may take on the server (default: no "
                                                               "limit); a job past it is cancelled and fails")
    g.add_argument("--poll", type=float, default=1.0,
                   help="seconds between checks of the server's /history (default: 1)")
    p.set_defaults(func=_batch_main)
    return p


def _batch_main(args: argparse.Namespace) -> int:
    comfy = args.comfyui is not None
    if args.timeout is not None and not args.timeout > 0:
        raise ValueError(f"--timeout must be > 0 seconds, got {args.timeout}")
    if not args.poll >= 0:
        raise ValueError(f"--poll must be >= 0 seconds, got {args.poll}")
    entries = load_jobs_file(args.jobs)
    try:
        jobs = prepare_jobs(entries, args.out, comfy=comfy)
    except ValueError as e:
        raise ValueError(f"{args.jobs}: {e}") from None

    def say(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    if comfy:
        client = ComfyClient(args.comfyui)
        workflow = load_workflow(args.workflow)
        object_info = client.object_info()
        for bj in jobs:
            try:
                bj.prompt = comfy_prompt(bj, workflow, object_info)
            except ValueError as e:
                raise ValueError(f"{args.jobs}: {bj.label}: {e}") from None
        say(f"{len(jobs)} job(s) → ComfyUI at {client.url} ({args.workflow.name})")
        rows, interrupted = run_batch(jobs, lambda bj, row: run_comfy_job(bj, row, client, args.poll, args.timeout),
                                      say)
    else:
        say(f"{len(jobs)} job(s) from {args.jobs}")
        rows, interrupted = run_batch(jobs, lambda bj, row: run_local_job(bj, row, args.quiet), say)
    rc = exit_code(rows, interrupted)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    summary_path = args.summary or default_summary_path(jobs, comfy)
    summary = {"jobs_file": str(args.jobs), "mode": "comfyui" if comfy else "local", "finished": _now(),
               "exit_code": rc, "counts": counts, "summary": str(summary_path), "jobs": rows}
    if comfy:
        summary["comfyui"] = args.comfyui
    from .report import _clean, write_json_atomic

    try:
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(summary_path, summary, overwrite=True)
    except OSError as e:
        print(f"warning: could not write the summary {summary_path} ({e.strerror or e})", file=sys.stderr)
        summary["summary"] = None
    if not args.quiet:
        print(format_table(rows))
        print(f"summary: {summary_path}" if summary["summary"] else "summary: not written")
    print(json.dumps(_clean(summary)))
    return rc
