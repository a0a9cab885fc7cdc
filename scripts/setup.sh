#!/usr/bin/env bash
# Idempotent environment set-up. Creates (or reuses) a virtual environment and installs the pinned
# dependencies. Prints the venv's path on its last line. Reuse is keyed on the content of the requirement
# files, so a clean clone (CI) reuses the environment an earlier run built on the same machine.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${UNLEARN_CACHE:-$HOME/.cache/comfyui-unlearn}"
KEY="$(cat "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" "$ROOT/constraints.txt" "$ROOT/requirements-test.txt" 2>/dev/null | sha256sum | cut -c1-12)"
VENV="${UNLEARN_VENV:-$CACHE/venv-$KEY}"
PY="${PYTHON:-python3}"
if [ ! -f "$VENV/.ready" ]; then
  echo "setting up $VENV (first run: a few minutes)" >&2
  mkdir -p "$CACHE"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  "$VENV/bin/python" -m pip install -q -c "$ROOT/constraints.txt" torch torchvision \
      -r "$ROOT/requirements.txt" -r "$ROOT/requirements-dev.txt" \
      $( [ -f "$ROOT/requirements-test.txt" ] && echo "-r $ROOT/requirements-test.txt" ) >&2
  touch "$VENV/.ready"
fi
echo "$VENV"
