"""A real ComfyUI 0.3.75 server for the tests: a random SD1.5 checkpoint, a private folder layout, HTTP helpers.

* :func:`sd15_checkpoint` writes a randomly initialised, architecture-true SD1.5 checkpoint once into the cache
  (``<cache>/models/random-sd15-fp16.safetensors``, 2.1 GB, ~30 s; see ``make_sd15_checkpoint.py``).
* :class:`ComfyServer` runs ``main.py --cpu`` from the cached ComfyUI tree with ``--base-directory`` pointing at a
  temporary folder (models, custom_nodes, input, output, user, database): nothing is written into the cached tree.
  This repository is linked into its ``custom_nodes`` as ``ComfyUI-Unlearn``; the checkpoint, if one is given, is
  linked into ``models/checkpoints`` (the front-end tests need none). The server's output goes to ``server.log`` in
  that folder; :meth:`stop` kills it by PID (its own process group).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from comfy_env import cache_dir

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_NAME = "ComfyUI-Unlearn"
CHECKPOINT = "random-sd15-fp16.safetensors"


def sd15_checkpoint(comfy_root: Path) -> Path:
    """The cached random SD1.5 checkpoint, generated on first use in a child process (3.7 GB peak)."""
    path = cache_dir() / "models" / CHECKPOINT
    if not path.is_file():
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, str(Path(__file__).with_name("make_sd15_checkpoint.py")), str(comfy_root),
                        str(path), "fp16"], check=True, env=env, timeout=900)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_group(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` s, to the process group of ``proc`` (started with
    ``start_new_session=True``, so its group id is its PID): children it spawned get the signal too."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue


class ComfyServer:
    """One ComfyUI process on 127.0.0.1 with its own base directory."""

    def __init__(self, comfy_root: Path, base: Path, checkpoint: Path | None = None):
        self.root, self.base = comfy_root, base
        for sub in ("custom_nodes", "models/checkpoints", "models/loras", "input", "output", "user"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        (base / "custom_nodes" / PACKAGE_NAME).symlink_to(ROOT, target_is_directory=True)
        if checkpoint is not None:
            (base / "models" / "checkpoints" / checkpoint.name).symlink_to(checkpoint)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def loras(self) -> Path:
        return self.base / "models" / "loras"

    @property
    def output(self) -> Path:
        return self.base / "output"

    def start(self, timeout: float = 300.0) -> None:
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--database-url", f"sqlite:///{self.base / 'user' / 'comfyui.db'}"]
        # bytecode goes to the cache, not into the ComfyUI tree or this checkout
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
               "HF_HUB_OFFLINE": "1", "PYTHONPYCACHEPREFIX": str(cache_dir() / "pycache")}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} at startup:\n{self.log()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)  # polling for readiness, not timing anything
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        kill_group(self.proc)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    # ------------------------------------------------------------------ HTTP
    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return json.load(r)

    def post(self, path: str, body: Any = None) -> Any:
        data = json.dumps(body if body is not None else {}).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                text = r.read().decode()
        except urllib.error.HTTPError as e:  # /prompt answers 400 with the validation errors
            raise PromptRejected(e.code, e.read().decode()) from None
        return json.loads(text) if text.strip() else None

    def queue(self, prompt: dict, client_id: str | None = None) -> str:
        return self.post("/prompt", {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 900.0) -> dict:
        """The /history entry of a finished prompt (success or error)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died (exit {self.proc.returncode}):\n{self.log()[-3000:]}")
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None \
                    and entry["status"].get("status_str") in ("success", "error"):
                return entry
            time.sleep(0.25)  # polling, not timing
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log()[-3000:]}")

    def run(self, prompt: dict, timeout: float = 900.0) -> dict:
        return self.wait(self.queue(prompt), timeout)


class PromptRejected(RuntimeError):
    """/prompt refused the prompt (validation errors), with the server's JSON answer."""

    def __init__(self, status: int, body: str):
        super().__init__(f"/prompt answered {status}: {body[:3000]}")
        self.status, self.body = status, body


def messages(entry: dict, kind: str) -> list[dict]:
    """The payloads of the status messages of one kind (``execution_error``, ``execution_interrupted``, …)."""
    return [m[1] for m in entry["status"].get("messages", []) if m[0] == kind]


def output_images(server: ComfyServer, entry: dict, node_id: str) -> list[Path]:
    """Files a SaveImage node wrote in this run."""
    out = entry["outputs"].get(node_id, {}).get("images", [])
    return [server.output / i["subfolder"] / i["filename"] for i in out if i.get("type") == "output"]
