#!/usr/bin/env bash
# Set up (idempotent) and run the main job: erase "three" from the embedded demo model, write the LoRA,
# report.html and metrics.json to runs/three (replaced on a rerun). Arguments replace the defaults and go to
# `python -m unlearn_core unlearn`, e.g.  bash scripts/main.sh --concept seven --out runs/seven
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(bash "$ROOT/scripts/setup.sh" | tail -1)"
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ $# -eq 0 ]; then
  set -- --concept three --out runs/three --overwrite
fi
exec "$VENV/bin/python" -m unlearn_core unlearn "$@"
