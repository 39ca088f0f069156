#!/usr/bin/env bash
# Regenerate the committed gRPC stubs in service/rerankd/v1/ (generated code: do not edit by hand).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-service}"
# The repo's venv when there is one (a bare `python` outside it lacks grpc_tools); PYTHON overrides.
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
"$PY" -m grpc_tools.protoc -I proto --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" proto/rerankd/v1/rerankd.proto
