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
  LOG="$CACHE/setup-$KEY.log"
  echo "setting up $VENV (first run: a few minutes; log: $LOG)" >&2
  mkdir -p "$CACHE"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  if ! { "$VENV/bin/python" -m pip install -q --upgrade pip &&
         "$VENV/bin/python" -m pip install -q -c "$ROOT/constraints.txt" torch torchvision \
           -r "$ROOT/requirements.txt" -r "$ROOT/requirements-dev.txt" -r "$ROOT/requirements-test.txt"; } >"$LOG" 2>&1
  then
    tail -n 30 "$LOG" >&2
    echo "set-up failed; full log: $LOG" >&2
    exit 1
  fi
  touch "$VENV/.ready"
fi
echo "$VENV"
