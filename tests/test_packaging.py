"""The package imports without ComfyUI, the CLI refuses bad input with one line and exit code 2, tests run on
one torch thread."""

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run_py(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args] if not code else [sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_unlearn_core_imports_without_comfyui():
    r = run_py("import sys, unlearn_core, unlearn_core.cli, unlearn_core.trainer, unlearn_core.lora; "
               "assert not any(m == 'comfy' or m.startswith(('comfy.', 'comfy_api')) for m in sys.modules), "
               "[m for m in sys.modules if m.startswith('comfy')]")
    assert r.returncode == 0, r.stderr


def test_no_comfy_import_anywhere_in_unlearn_core():
    for path in (ROOT / "unlearn_core").rglob("*.py"):
        text = path.read_text()
        assert "import comfy" not in text and "from comfy" not in text, path


def test_comfyui_entry_imports_cleanly_without_comfyui():
    r = run_py("import importlib.util, sys; spec = importlib.util.spec_from_file_location('cu', "
               f"{str(ROOT / '__init__.py')!r}, submodule_search_locations=[{str(ROOT)!r}]); "
               "m = importlib.util.module_from_spec(spec); sys.modules['cu'] = m; spec.loader.exec_module(m); "
               "print(m.WEB_DIRECTORY)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "./web"


def cli(*args: str) -> subprocess.CompletedProcess:
    return run_py("", "-m", "unlearn_core", *args)


def test_cli_refuses_a_non_positive_threshold_with_one_line_and_exit_2():
    r = cli("toy", "--threshold", "-1")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: --threshold must be > 0, got -1.0"]


def test_cli_refuses_an_unknown_method():
    r = cli("toy", "--method", "magic")
    assert r.returncode == 2 and "invalid choice: 'magic'" in r.stderr


def test_cli_refuses_a_lambda_bound_out_of_range():
    r = cli("toy", "--method", "ru", "--lam-max", "1.5", "--steps", "1", "--no-oracle")
    assert r.returncode == 2
    assert "must be in (0, 1)" in r.stderr and "Traceback" not in r.stderr


def test_tests_run_on_one_torch_thread():
    assert torch.get_num_threads() == int(os.environ.get("UNLEARN_TEST_THREADS", "1"))
