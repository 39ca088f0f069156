#!/usr/bin/env bash
# Fresh machine -> running server: set up, export the default models, serve on the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${RERANKD_VENV:-.venv}/bin/rerankd" serve "$@"
