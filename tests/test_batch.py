"""``batch``: many ``unlearn`` jobs from one file — validation up front, resume, per-job failures, Ctrl-C, summary;
and ``--comfyui`` against a fake ComfyUI server (``http.server`` in a thread answering ``/object_info``, ``/prompt``,
``/history``, ``/view_metadata``, ``/queue`` and ``/interrupt`` in the shapes ComfyUI 0.3.75 uses).

The local jobs train the demo model with the tiny configuration of ``test_cli_unlearn.py`` (2 steps, no evaluation):
seconds each; they check plumbing, not erasure.
"""

import contextlib
import io
import json
import os
import signal
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from unlearn_core import batch, cli, unlearn

TINY_DEFAULTS = {"batch": 8, "keep_batch": 2, "rollouts": 1, "keep_rollouts": 1, "rollout_jumps": 3,
                 "estimate_samples": 8}
# every local job: 2 steps, no judge evaluation, one wording, one kept prompt besides ""
JOB_DEFAULTS = {"steps": 2, "eval_samples": 0, "exact_wording": True, "keep": ["a handwritten digit seven"]}


def write_jobs(path: Path, jobs: list, defaults: dict | None = None) -> Path:
    path.write_text(json.dumps({"defaults": {**JOB_DEFAULTS, **(defaults or {})}, "jobs": jobs}))
    return path


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, out.getvalue(), err.getvalue()


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def statuses(summary: dict) -> list[str]:
    return [j["status"] for j in summary["jobs"]]


@contextlib.contextmanager
def tiny_and_no_training_unless(allowed: bool = True):
    with pytest.MonkeyPatch.context() as mp:
        for k, v in TINY_DEFAULTS.items():
            mp.setitem(unlearn.DEFAULTS, k, v)
        if not allowed:
            def no_training(job, **kw):
                raise AssertionError(f"{job.name} was trained")

            mp.setattr(unlearn, "run_job", no_training)
        yield mp


# ------------------------------------------------------------------------------------------------ a local batch
@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """Two jobs that train and one whose folder holds a LoRA no batch made (it must fail, the others go on)."""
    root = tmp_path_factory.mktemp("batch")
    runs = root / "runs"
    (runs / "foreign").mkdir(parents=True)
    (runs / "foreign" / "foreign.safetensors").write_bytes(b"someone else's LoRA")
    jobs = write_jobs(root / "jobs.json", [{"name": "no-three", "concept": "three"},
                                           {"name": "no-four", "concept": "four", "seed": 1},
                                           {"name": "foreign", "concept": "five"}])
    with tiny_and_no_training_unless(True):
        rc, out, err = run_cli(["batch", str(jobs), "--out", str(runs)])
    return {"root": root, "runs": runs, "jobs": jobs, "rc": rc, "out": out, "err": err}


def test_each_job_writes_its_lora_metrics_report_and_batch_record(first):
    for name in ("no-three", "no-four"):
        out = first["runs"] / name
        assert (out / f"{name}.safetensors").is_file() and (out / "metrics.json").is_file()
        assert (out / "report.html").is_file()
        record = json.loads((out / "batch.json").read_text())
        assert record["status"] == "done" and record["fingerprint"].startswith("sha256:")
        assert record["options"]["concept"] == [name.replace("no-", "")] and record["options"]["steps"] == 2


def test_a_failed_job_does_not_stop_the_batch_and_the_exit_code_is_1(first):
    summary = last_json(first["out"])
    assert first["rc"] == 1 and summary["exit_code"] == 1
    assert statuses(summary) == ["done", "done", "failed"]
    message = summary["jobs"][2]["message"]
    assert "foreign.safetensors already exists" in message and "overwrite: true" in message
    assert (first["runs"] / "foreign" / "foreign.safetensors").read_bytes() == b"someone else's LoRA"


def test_summary_json_is_written_beside_the_output_folders_and_printed_last(first):
    printed = last_json(first["out"])
    written = json.loads((first["runs"] / "batch-summary.json").read_text())
    assert printed == written and printed["summary"] == str(first["runs"] / "batch-summary.json")
    assert printed["counts"] == {"done": 2, "failed": 1}
    done = printed["jobs"][0]
    assert done["index"] == 1 and done["name"] == "no-three" and done["seconds"] > 0
    assert done["out"] == str(first["runs"] / "no-three") and done["lora"].endswith("no-three.safetensors")
    (c,) = done["constraints"]
    assert c["name"] == "three" and c["requested"] > 0 and c["achieved"] >= 0


def test_progress_says_each_job_start_and_end_with_its_place_in_the_batch(first):
    lines = first["err"].splitlines()
    assert any(line.startswith("[2/3] no-four: starting") for line in lines)
    assert any(line.startswith("[2/3] no-four: done in ") for line in lines)
    assert any(line.startswith("[3/3] foreign: failed in ") for line in lines)
    table = first["out"].strip().splitlines()
    assert table[0].split()[:4] == ["#", "name", "status", "seconds"]
    assert table[1].split()[1:3] == ["no-three", "done"]


def test_rerun_skips_finished_jobs_without_training(first):
    lora = first["runs"] / "no-three" / "no-three.safetensors"
    before = lora.read_bytes(), lora.stat().st_mtime_ns
    with tiny_and_no_training_unless(False):
        rc, out, _ = run_cli(["batch", str(first["jobs"]), "--out", str(first["runs"]), "--quiet"])
    summary = last_json(out)
    assert rc == 1 and statuses(summary) == ["skipped", "skipped", "failed"]
    assert summary["jobs"][0]["constraints"][0]["name"] == "three"  # read back from metrics.json
    assert (lora.read_bytes(), lora.stat().st_mtime_ns) == before
    assert len(out.strip().splitlines()) == 1  # --quiet: the JSON line only


def test_a_job_whose_options_changed_is_refused_not_overwritten(first, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.yaml", [{"name": "no-three", "concept": "three", "steps": 3}])
    lora = first["runs"] / "no-three" / "no-three.safetensors"
    before = lora.read_bytes()
    with tiny_and_no_training_unless(False):
        rc, out, _ = run_cli(["batch", str(jobs), "--out", str(first["runs"]), "--summary",
                              str(tmp_path / "s.json")])
    (job,) = last_json(out)["jobs"]
    assert rc == 1 and job["status"] == "failed"
    assert "other options (steps: 2 → 3)" in job["message"] and "overwrite: true" in job["message"]
    assert lora.read_bytes() == before


# ------------------------------------------------------------------------------------------------ Ctrl-C
@pytest.fixture(scope="module")
def interrupted(first):
    """A batch of a finished job, one that gets Ctrl-C at its second step, and one more; then the same file again."""
    jobs = write_jobs(first["root"] / "resume.json", [{"name": "no-three", "concept": "three"},
                                                      {"name": "stopped", "concept": "six", "steps": 6},
                                                      {"name": "after", "concept": "eight"}])
    argv = ["batch", str(jobs), "--out", str(first["runs"]), "--summary", str(first["root"] / "resume-summary.json")]
    real_run_job = unlearn.run_job

    def ctrl_c_at_step_2(ev):
        if ev["type"] == "step" and ev["step"] == 1:
            os.kill(os.getpid(), signal.SIGINT)

    def run_job(job, **kw):
        if job.name == "stopped":
            kw["callbacks"] = [*kw.get("callbacks", ()), ctrl_c_at_step_2]
        return real_run_job(job, **kw)

    with tiny_and_no_training_unless(True) as mp:
        mp.setattr(unlearn, "run_job", run_job)
        stopped = run_cli([*argv, "--quiet"])
        partial_after_stop = (first["runs"] / "stopped" / "stopped.partial.safetensors").is_file()
    with tiny_and_no_training_unless(True):
        resumed = run_cli([*argv, "--quiet"])
    return {"stopped": stopped, "partial": partial_after_stop, "resumed": resumed, "runs": first["runs"],
            "summary": first["root"] / "resume-summary.json"}


def test_ctrl_c_stops_the_current_job_marks_the_rest_not_run_and_exits_130(interrupted):
    rc, out, _ = interrupted["stopped"]
    summary = last_json(out)
    assert rc == 130 and summary["exit_code"] == 130
    assert statuses(summary) == ["skipped", "interrupted", "not run"]
    assert interrupted["partial"]  # `unlearn` kept the last good LoRA of the stopped job
    assert summary["jobs"][1]["partial"].endswith("stopped.partial.safetensors")
    assert "rerun the batch" in summary["jobs"][1]["message"]


def test_rerun_after_ctrl_c_finishes_the_remaining_jobs(interrupted):
    rc, out, _ = interrupted["resumed"]
    summary = last_json(out)
    assert rc == 0 and statuses(summary) == ["skipped", "done", "done"]
    assert json.loads((interrupted["summary"]).read_text()) == summary
    stopped = interrupted["runs"] / "stopped"
    assert (stopped / "stopped.safetensors").is_file() and not (stopped / "stopped.partial.safetensors").exists()
    assert json.loads((stopped / "metrics.json").read_text())["steps"] == 6


# ------------------------------------------------------------------------------------------------ no training
def test_an_exception_in_one_job_is_recorded_and_the_next_job_runs(tmp_path, monkeypatch):
    def run_job(job, **kw):
        if job.name == "boom":
            raise RuntimeError("CUDA out of memory")
        return {"lora": str(job.lora_path), "seconds": 0.1,
                "constraints": [{"name": "four", "requested": 2.0, "achieved": 1.5, "lambda": 0.3}]}

    monkeypatch.setattr(unlearn, "run_job", run_job)
    jobs = write_jobs(tmp_path / "jobs.json", [{"name": "boom", "concept": "three"},
                                               {"name": "fine", "concept": "four"}])
    rc, out, _ = run_cli(["batch", str(jobs), "--out", str(tmp_path / "runs"), "--quiet"])
    summary = last_json(out)
    assert rc == 1 and statuses(summary) == ["failed", "done"]
    assert summary["jobs"][0]["message"] == "RuntimeError: CUDA out of memory"
    # started, never finished: a rerun redoes it rather than skipping it
    assert json.loads((tmp_path / "runs" / "boom" / "batch.json").read_text())["status"] == "started"


@pytest.mark.parametrize("content, message", [
    ('[{"concept": "three", "stepz": 3}]', "job 1: unknown option 'stepz' (did you mean 'steps'?)"),
    ('[{"concept": "three"}, {"name": "x", "concept": "four", "steps": "many"}]', "job 2 (x): steps: invalid int"),
    ('[{"concept": ""}]', "job 1: concept '' is empty"),
    ('[{"concept": "three", "exact_wording": "yes"}]', "exact_wording: expected true or false"),
    ('[{"concept": "three", "keep": [["nested"]]}]', "keep: expected a text"),
    ('[{"concept": "three", "name": "../up"}]', "name: '../up' is not a plain file name"),
    ('[{"concept": "three"}, {"concept": "three", "steps": 3}]', "job 1 (ru-three) and job 2 (ru-three) both write"),
    ('{"jobs": []}', "no jobs"),
    ('{"job": [{"concept": "three"}]}', "unknown top-level key 'job'"),
    ('["three"]', "job 1 must be a mapping"),
    ('[{"concept": "three"', "not valid JSON (line 1"),
])
def test_a_bad_jobs_file_is_one_line_exit_code_2_and_nothing_runs(tmp_path, monkeypatch, content, message):
    monkeypatch.setattr(unlearn, "run_job", lambda job, **kw: pytest.fail("trained despite a bad jobs file"))
    jobs = tmp_path / "jobs.json"
    jobs.write_text(content)
    rc, out, err = run_cli(["batch", str(jobs), "--out", str(tmp_path / "runs")])
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"error: {jobs}: ") and message in lines[0], lines
    assert out == "" and not (tmp_path / "runs").exists()


def test_yaml_with_defaults_gives_each_job_the_defaults_under_its_own_options(tmp_path):
    path = tmp_path / "jobs.yaml"
    path.write_text("defaults:\n  steps: 5\n  seed: 1\njobs:\n  - concept: three\n  - {concept: four, steps: 7}\n")
    assert batch.load_jobs_file(path) == [{"steps": 5, "seed": 1, "concept": "three"},
                                          {"steps": 7, "seed": 1, "concept": "four"}]


def test_job_options_become_the_unlearn_commands_arguments():
    argv = batch.options_to_argv({"name": "x", "concept": ["three", "a|b"], "steps": 5, "lr": 1e-05,
                                  "exact_wording": True, "no_default_keep": False, "anchor": "-x", "threshold": None,
                                  "set": {"dual_lr": 0.03}, "eval-samples": 2})
    assert argv == ["--concept=three", "--concept=a|b", "--steps=5", "--lr=1e-05", "--exact-wording", "--anchor=-x",
                    "--set=dual_lr=0.03", "--eval-samples=2"]


def fingerprint(options: dict) -> str:
    parser = batch.unlearn_parser()
    return batch.job_fingerprint(parser.parse_args(batch.options_to_argv(options, parser)))[1]


def test_fingerprint_is_the_resolved_options_not_their_spelling_or_place():
    base = fingerprint({"concept": "three"})
    assert fingerprint({"concept": ["three"], "steps": unlearn.DEFAULTS["steps"], "out": "elsewhere",
                        "quiet": True, "overwrite": True, "micro_batch": 4}) == base
    assert fingerprint({"concept": "three", "set": {"dual_lr": 0.030}}) == \
        fingerprint({"concept": "three", "set": ["dual_lr=0.03"]})
    assert fingerprint({"concept": "three", "steps": 3}) != base
    assert fingerprint({"concept": "three", "set": {"dual_lr": 0.04}}) != fingerprint({"concept": "three"})


def test_summary_table_shows_forget_rate_and_achieved_over_requested():
    rows = [{"index": 1, "name": "a", "status": "done", "seconds": 12.0, "forget_rate": 0.75, "out": "runs/a",
             "constraints": [{"achieved": 1.0, "requested": 2.0}, {"achieved": 3.0, "requested": 3.0}]},
            {"index": 2, "name": "b", "status": "failed", "seconds": 0.5, "message": "no GPU"}]
    lines = batch.format_table(rows).splitlines()
    assert lines[1].split() == ["1", "a", "done", "12.0", "75%", "50%,100%", "runs/a"]
    assert lines[2].split() == ["2", "b", "failed", "0.5", "–", "–"]
    assert lines[3].strip() == "2: no GPU"


# ------------------------------------------------------------------------------------------------ fake ComfyUI
def _combo(options, **kw):
    return ["COMBO", {"options": options, **kw}]


def _info(required: dict, optional: dict | None = None) -> dict:
    inputs = {"required": required, **({"optional": optional} if optional else {})}
    return {"input": inputs, "input_order": {k: list(v) for k, v in inputs.items()}}


SAMPLERS = ["euler", "dpmpp_2m"]
# the node definitions example_workflows/01_erase_a_concept.json uses, as ComfyUI 0.3.75's /object_info lists them
OBJECT_INFO = {
    "CheckpointLoaderSimple": _info({"ckpt_name": [["v1-5-pruned-emaonly-fp16.safetensors", "other.safetensors"], {}]}),
    "CLIPTextEncode": _info({"text": ["STRING", {"multiline": True}], "clip": ["CLIP", {}]}),
    "EmptyLatentImage": _info({"width": ["INT", {}], "height": ["INT", {}], "batch_size": ["INT", {}]}),
    "KSampler": _info({"model": ["MODEL", {}], "seed": ["INT", {"control_after_generate": True}],
                       "steps": ["INT", {}], "cfg": ["FLOAT", {}], "sampler_name": [SAMPLERS, {}],
                       "scheduler": [["normal", "karras"], {}], "positive": ["CONDITIONING", {}],
                       "negative": ["CONDITIONING", {}], "latent_image": ["LATENT", {}], "denoise": ["FLOAT", {}]}),
    "VAEDecode": _info({"samples": ["LATENT", {}], "vae": ["VAE", {}]}),
    "SaveImage": _info({"images": ["IMAGE", {}], "filename_prefix": ["STRING", {}]}),
    "PreviewImage": _info({"images": ["IMAGE", {}]}),
    "PreviewAny": _info({"source": ["*", {}]}),
    "Unlearn_UnlearnConcept": _info(
        {"model": ["MODEL", {}], "clip": ["CLIP", {}], "concept": ["STRING", {"multiline": True}],
         "anchor": ["STRING", {}], "method": _combo(["RU", "LU", "ESD"]), "threshold": ["FLOAT", {}],
         "steps": ["INT", {}], "rank": ["INT", {}], "targets": _combo(["xattn", "attn", "all"]),
         "learning_rate": ["FLOAT", {}], "seed": ["INT", {"control_after_generate": True}], "width": ["INT", {}],
         "height": ["INT", {}], "batch": ["INT", {}], "esd_eta": ["FLOAT", {}]},
        {"keep_prompts": ["STRING", {"multiline": True}], "trajectory_steps": ["INT", {}], "micro_batch": ["INT", {}]}),
    "Unlearn_SaveUnlearningLora": _info({"unlearn_lora": ["UNLEARN_LORA", {}], "filename": ["STRING", {}],
                                         "dtype": _combo(["fp16", "bf16", "fp32"]), "overwrite": ["BOOLEAN", {}]}),
}


class FakeComfy:
    """Just enough of ComfyUI's HTTP API: validates KSampler's sampler_name (HTTP 400 with node_errors, as the real
    /prompt does), "runs" a prompt at once (or never, for a concept listed in ``hold``), fails the Unlearn node for a
    concept listed in ``fail`` (an execution_error in /history), and keeps saved LoRAs' metadata for /view_metadata."""

    def __init__(self):
        self.posted: list[dict] = []
        self.calls: list[tuple[str, str, dict | None]] = []
        self.history: dict[str, dict] = {}
        self.loras: dict[str, dict] = {}
        self.fail: dict[str, str] = {}
        self.hold: set[str] = set()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body=None):
                blob = json.dumps(body).encode() if body is not None else b""
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(blob)))
                self.end_headers()
                self.wfile.write(blob)

            def do_GET(self):
                url = urllib.parse.urlparse(self.path)
                fake.calls.append(("GET", url.path, None))
                if url.path == "/object_info":
                    return self._send(200, OBJECT_INFO)
                if url.path.startswith("/history/"):
                    pid = url.path.rsplit("/", 1)[1]
                    return self._send(200, {pid: fake.history[pid]} if pid in fake.history else {})
                if url.path == "/view_metadata/loras":
                    name = urllib.parse.parse_qs(url.query)["filename"][0]
                    return self._send(200, fake.loras[name]) if name in fake.loras else self._send(404)
                self._send(404)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
                fake.calls.append(("POST", self.path, body))
                if self.path == "/prompt":
                    code, answer = fake.queue(body)
                    return self._send(code, answer)
                self._send(200)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def queue(self, body: dict) -> tuple[int, dict]:
        self.posted.append(body)
        prompt, pid = body["prompt"], body.get("prompt_id")
        for nid, node in prompt.items():
            if node["class_type"] == "KSampler" and node["inputs"]["sampler_name"] not in SAMPLERS:
                details = f"sampler_name: '{node['inputs']['sampler_name']}' not in {SAMPLERS}"
                return 400, {"error": {"type": "prompt_outputs_failed_validation", "details": details,
                                       "message": "Prompt outputs failed validation", "extra_info": {}},
                             "node_errors": {nid: {"errors": [{"type": "value_not_in_list", "details": details,
                                                               "message": "Value not in list", "extra_info": {}}],
                                                   "dependent_outputs": ["7"], "class_type": "KSampler"}}}
        unl = next(n for n in prompt.values() if n["class_type"] == "Unlearn_UnlearnConcept")["inputs"]
        save = next(n for n in prompt.values() if n["class_type"] == "Unlearn_SaveUnlearningLora")["inputs"]
        concept = unl["concept"]
        if concept not in self.hold:
            self.history[pid] = self.execute(pid, unl, save)
        return 200, {"prompt_id": pid, "number": len(self.posted), "node_errors": {}}

    def execute(self, pid: str, unl: dict, save: dict) -> dict:
        start = ["execution_start", {"prompt_id": pid, "timestamp": 0}]
        filename = save["filename"] + ".safetensors"
        error = None
        if unl["concept"] in self.fail:
            error = ("8", "Unlearn_UnlearnConcept", self.fail[unl["concept"]])
        elif filename in self.loras and not save["overwrite"]:
            error = ("12", "Unlearn_SaveUnlearningLora",
                     f"Save Unlearning LoRA: models/loras/{filename} already exists — choose another name")
        if error:
            nid, kind, msg = error
            return {"prompt": [], "outputs": {}, "status": {"status_str": "error", "completed": False, "messages": [
                start, ["execution_error", {"prompt_id": pid, "node_id": nid, "node_type": kind, "executed": [],
                                            "exception_message": msg, "exception_type": "ValueError",
                                            "traceback": [], "current_inputs": {}, "current_outputs": []}]]}}
        words = [[w.strip() for w in line.split("|")] for line in unl["concept"].splitlines() if line.strip()]
        self.loras[filename] = {
            "unlearn.method": unl["method"].lower(), "unlearn.concepts": json.dumps([" | ".join(w) for w in words]),
            "unlearn.anchors": json.dumps([unl["anchor"]] * len(words)), "unlearn.steps": str(unl["steps"]),
            "unlearn.seed": str(unl["seed"]), "unlearn.lora_targets": unl["targets"],
            "ss_network_dim": str(unl["rank"]),
            "unlearn.constraints": json.dumps([{"name": w[0], "requested": 2.0, "achieved": 1.8, "lambda": 0.4}
                                               for w in words])}
        return {"prompt": [], "outputs": {
                    "12": {"text": [f"saved models/loras/{filename}"]},
                    "14": {"text": [f"method {unl['method']}: {unl['steps']} steps in 1.0 s"]},
                    "11": {"images": [{"filename": "after_00001_.png", "subfolder": "unlearn", "type": "output"}]}},
                "status": {"status_str": "success", "completed": True,
                           "messages": [start, ["execution_success", {"prompt_id": pid, "timestamp": 1}]]}}

    def posts(self, path: str) -> list[dict]:
        return [body for method, p, body in self.calls if method == "POST" and p == path]


@pytest.fixture()
def comfy():
    fake = FakeComfy()
    fake.thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


COMFY_JOBS = {"defaults": {"steps": 3, "seed": 7,
                           "comfyui": {"CheckpointLoaderSimple": {"ckpt_name": "other.safetensors"}}},
              "jobs": [{"name": "no_van_gogh", "concept": "Van Gogh | painting by Van Gogh", "anchor": "a painting",
                        "threshold": 1.5, "lr": 1e-4, "keep": ["a photo of a cat"], "rank": 8},
                       {"concept": ["Picasso", "Monet"], "method": "lu", "model": "third.safetensors",
                        "out": "ignored-with-comfyui", "micro_batch": 4}]}


def run_comfy(tmp_path: Path, comfy: FakeComfy, jobs: dict, *extra: str) -> tuple[int, dict, str]:
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps(jobs))
    rc, out, err = run_cli(["batch", str(path), "--comfyui", comfy.url, "--poll", "0", "--summary",
                            str(tmp_path / "summary.json"), *extra])
    return rc, (last_json(out) if out.strip() else {}), err


def test_comfyui_jobs_are_queued_as_the_example_workflow_with_each_jobs_settings(tmp_path, comfy):
    rc, summary, _ = run_comfy(tmp_path, comfy, COMFY_JOBS)
    assert rc == 0 and statuses(summary) == ["done", "done"]
    first, second = (body["prompt"] for body in comfy.posted)
    assert first["8"]["class_type"] == "Unlearn_UnlearnConcept"
    unl = first["8"]["inputs"]
    assert {k: unl[k] for k in ("concept", "anchor", "threshold", "steps", "rank", "learning_rate", "seed",
                                "keep_prompts")} == {
        "concept": "Van Gogh | painting by Van Gogh", "anchor": "a painting", "threshold": 1.5, "steps": 3, "rank": 8,
        "learning_rate": 1e-4, "seed": 7, "keep_prompts": "a photo of a cat"}
    assert unl["method"] == "RU" and unl["model"] == ["1", 0]  # the workflow's value and wiring stay
    assert first["12"]["inputs"]["filename"] == "no_van_gogh" and first["12"]["inputs"]["overwrite"] is False
    assert first["1"]["inputs"]["ckpt_name"] == "other.safetensors"  # the job's 'comfyui' node inputs
    assert second["8"]["inputs"]["concept"] == "Picasso\nMonet" and second["8"]["inputs"]["method"] == "LU"
    assert second["12"]["inputs"]["filename"] == "lu-picasso_monet"  # ComfyUI's Save node takes no '+'
    assert second["1"]["inputs"]["ckpt_name"] == "third.safetensors"  # `model` names the checkpoint
    assert second["8"]["inputs"]["micro_batch"] == 4 and first["8"]["inputs"]["micro_batch"] == 0  # else the file's
    assert "15" not in first  # the workflow's note is not a server node
    assert all(body["client_id"] == comfy.posted[0]["client_id"] for body in comfy.posted)


def test_comfyui_results_are_collected_into_the_summary(tmp_path, comfy):
    rc, summary, _ = run_comfy(tmp_path, comfy, COMFY_JOBS)
    job = summary["jobs"][0]
    assert summary["mode"] == "comfyui" and summary["comfyui"] == comfy.url
    assert job["lora"] == "models/loras/no_van_gogh.safetensors" and job["prompt_id"] in comfy.history
    assert job["constraints"] == [{"name": "Van Gogh", "requested": 2.0, "achieved": 1.8, "lambda": 0.4}]
    assert job["outputs"]["12"] == ["saved models/loras/no_van_gogh.safetensors"]
    assert job["images"] == ["unlearn/after_00001_.png"]
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


def test_comfyui_failures_are_reported_per_job_and_the_batch_goes_on(tmp_path, comfy):
    comfy.fail["Van Gogh"] = "Unlearn Concept: CUDA out of memory"
    jobs = {"jobs": [{"name": "a", "concept": "Van Gogh"},
                     {"name": "b", "concept": "Picasso", "comfyui": {"KSampler": {"sampler_name": "nope"}}},
                     {"name": "c", "concept": "Monet"}]}
    rc, summary, _ = run_comfy(tmp_path, comfy, jobs)
    assert rc == 1 and statuses(summary) == ["failed", "failed", "done"]
    a, b, _ = summary["jobs"]
    assert a["message"] == ("the workflow failed on the server: Unlearn_UnlearnConcept (node 8): "
                            "Unlearn Concept: CUDA out of memory")
    assert b["message"].startswith("ComfyUI refused the workflow (HTTP 400): node 5 (KSampler): Value not in list")
    assert "'nope'" in b["message"]


def test_comfyui_rerun_skips_loras_already_on_the_server_with_the_same_settings(tmp_path, comfy):
    assert run_comfy(tmp_path, comfy, COMFY_JOBS)[0] == 0
    posted = len(comfy.posted)
    rc, summary, _ = run_comfy(tmp_path, comfy, COMFY_JOBS)
    assert rc == 0 and statuses(summary) == ["skipped", "skipped"] and len(comfy.posted) == posted
    assert summary["jobs"][0]["constraints"][0]["achieved"] == 1.8  # read from the LoRA's metadata


def test_comfyui_lora_of_other_settings_is_refused_unless_overwrite(tmp_path, comfy):
    assert run_comfy(tmp_path, comfy, COMFY_JOBS)[0] == 0
    changed = {**COMFY_JOBS, "defaults": {**COMFY_JOBS["defaults"], "steps": 4}}
    rc, summary, _ = run_comfy(tmp_path, comfy, {**changed, "jobs": changed["jobs"][:1]})
    (job,) = summary["jobs"]
    assert rc == 1 and "exists on the server with other settings (steps: 3 on the server, 4 in this job)" \
        in job["message"]
    rc, summary, _ = run_comfy(tmp_path, comfy, {**changed, "jobs": [{**changed["jobs"][0], "overwrite": True}]})
    assert rc == 0 and comfy.posted[-1]["prompt"]["12"]["inputs"]["overwrite"] is True
    assert comfy.loras["no_van_gogh.safetensors"]["unlearn.steps"] == "4"


def test_ctrl_c_during_a_comfyui_job_cancels_that_prompt_on_the_server(tmp_path, comfy, monkeypatch):
    comfy.hold.add("Picasso")  # queued, never finishes

    def ctrl_c(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(batch, "_wait", ctrl_c)
    jobs = {"jobs": [{"name": "a", "concept": "Van Gogh"}, {"name": "b", "concept": "Picasso"},
                     {"name": "c", "concept": "Monet"}]}
    rc, summary, _ = run_comfy(tmp_path, comfy, jobs)
    assert rc == 130 and statuses(summary) == ["done", "interrupted", "not run"]
    pid = summary["jobs"][1]["prompt_id"]
    assert comfy.posts("/interrupt") == [{"prompt_id": pid}] and comfy.posts("/queue") == [{"delete": [pid]}]
    assert len(comfy.posted) == 2


def test_a_comfyui_job_past_its_timeout_is_cancelled_and_fails(tmp_path, comfy):
    comfy.hold.add("Picasso")
    jobs = {"jobs": [{"name": "b", "concept": "Picasso"}, {"name": "c", "concept": "Monet"}]}
    rc, summary, _ = run_comfy(tmp_path, comfy, jobs, "--timeout", "0.05", "--poll", "0.01")
    assert rc == 1 and statuses(summary) == ["failed", "done"]
    assert summary["jobs"][0]["message"] == "did not finish within 0.05 s (--timeout); cancelled it on the server"
    assert comfy.posts("/interrupt") == [{"prompt_id": summary["jobs"][0]["prompt_id"]}]


@pytest.mark.parametrize("option", [{"threshold_raw": 3.0}, {"tokenizer": "tok/"}, {"resolution": 256}])
def test_comfyui_options_it_cannot_express_are_bad_input(tmp_path, comfy, option):
    rc, summary, err = run_comfy(tmp_path, comfy, {"jobs": [{"concept": "x", **option}]})
    assert rc == 2 and summary == {} and not comfy.posted
    assert f"{next(iter(option))}: not available with --comfyui" in err


def test_an_unreachable_comfyui_is_one_line_exit_code_2(tmp_path, comfy):
    url = comfy.url
    comfy.server.shutdown()
    comfy.server.server_close()
    jobs = tmp_path / "jobs.json"
    jobs.write_text('[{"concept": "Van Gogh"}]')
    rc, out, err = run_cli(["batch", str(jobs), "--comfyui", url])
    assert rc == 2 and out == "" and err.strip().splitlines() == [
        f"error: cannot reach ComfyUI at {url} ([Errno 111] Connection refused); start it, or check --comfyui"]
