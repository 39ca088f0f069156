#!/usr/bin/env bash
# One-time (idempotent) setup: virtualenv, dependencies, default model bundles.
#   RERANKD_VENV   virtualenv path (default .venv)
#   RERANKD_MODELS_DIR   where bundles go (default ./models)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${RERANKD_VENV:-.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.rerankd-installed"
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  # CPU-only torch first: a plain `torch` requirement would pull GBs of CUDA wheels. Here and in CI
  # pip finds the CPU wheel on its own; elsewhere point RERANKD_TORCH_INDEX_URL at
  # https://download.pytorch.org/whl/cpu.
  "$VENV/bin/python" -m pip install --quiet ${RERANKD_TORCH_INDEX_URL:+--index-url "$RERANKD_TORCH_INDEX_URL"} "torch==2.13.0"
  "$VENV/bin/python" -m pip install --quiet -e ".[export,eval,bench,dev,loadtest,tracing]"
  touch "$STAMP"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$VENV/bin/rerankd" export --defaults --models-dir "${RERANKD_MODELS_DIR:-models}"
