#!/usr/bin/env bash
# Verify the `cuda` backend on a GPU machine lent through the `device` tool (15 min a task, 64 MiB
# carried per call). Three steps; only the last one needs more than a few seconds.
#
# 1. Here, once (needs `rerankd export --defaults --fp16` into ./models and SciFact):
#      bash scripts/gpu_check.sh prepare
#    -> .gpucheck/<bundle>/{manifest.json,tokenizer.json,model.fp16.onnx,gpu-probe.npz}
#       (reranker ~45 MiB; the embedder goes in a second call, see below),
#       .gpucheck/corpus50.jsonl (50 SciFact passages for the engine timing),
#       .whl/part-* (the onnxruntime-gpu cp312 wheel, 244 MiB, in 55 MiB parts).
#    Both folders are git-ignored (.git/info/exclude), so they travel only when carried.
# 2. On the device, one call per wheel part, back to back (carry [".whl/part-aa"], then -ab, -ac,
#    -ad, -ae; a machine idle ~30 s is given back with /tmp/w, and `run` then says so):
#      bash scripts/gpu_check.sh part
# 3. On the device (carry [".gpucheck"]; no pipe after it: a timed-out pipeline returns nothing):
#      OUT=$OUT bash scripts/gpu_check.sh run
#    -> $OUT/gpu-check.json: providers, the load-time probe figures (fp16 drift on the GPU's
#       arithmetic), raw batch latencies and the engine's 50-passage rerank latency.
# The device image has CUDA 13 and cuDNN as pip packages; onnxruntime.preload_dlls() finds them.
# The 64 MiB a call counts the working tree too, and the tracked reranker weights alone are 43 MiB:
# keep them out of the tree for these calls, and put them back afterwards (commit nothing between):
#   git rm -q --cached checkpoints/rerankd-ce-MiniLM-L6/model.safetensors
#   echo /checkpoints/rerankd-ce-MiniLM-L6/model.safetensors >> .git/info/exclude
#   ... device calls ...
#   git reset -q checkpoints/rerankd-ce-MiniLM-L6/model.safetensors
#   sed -i '\#/checkpoints/rerankd-ce-MiniLM-L6/model.safetensors#d' .git/info/exclude
# (the rest of the tree is ~2 MiB; a wheel part is 55 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
ORT_GPU=${ORT_GPU:-onnxruntime-gpu==1.31.1}
BUNDLES=${BUNDLES:-rerankd-ce-MiniLM-L6}
MODELS=${MODELS_DIR:-models}  # where `rerankd export --fp16` wrote the bundles

case "${1:-}" in
prepare)
  grep -qx '/.gpucheck/' .git/info/exclude 2>/dev/null || echo /.gpucheck/ >> .git/info/exclude
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
  rm -rf .gpucheck && mkdir -p .gpucheck
  for b in $BUNDLES; do
    test -f "$MODELS/$b/model.fp16.onnx" || { echo "$MODELS/$b has no fp16 variant: run rerankd export --defaults --fp16" >&2; exit 1; }
    mkdir -p ".gpucheck/$b"
    cp "$MODELS/$b/"{manifest.json,tokenizer.json,model.fp16.onnx,gpu-probe.npz} ".gpucheck/$b/"
  done
  head -n 50 "${SCIFACT:-../shared/datasets/scifact}/corpus.jsonl" > .gpucheck/corpus50.jsonl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    -d .whl "$ORT_GPU"
  wheel=$(ls .whl/onnxruntime_gpu-"${ORT_GPU##*==}"-cp312-*.whl)
  rm -f .whl/part-*
  split -b 55m "$wheel" .whl/part-
  # pip reads the tags from the file name; the part count and checksum catch a lost part (the
  # machine is given back after ~30 s idle, and /tmp/w with it).
  { basename "$wheel"; ls .whl/part-* | wc -l; sha256sum < "$wheel" | cut -d' ' -f1; } > .gpucheck/wheel.txt
  du -sh .gpucheck .whl/part-*
  ;;
part)
  mkdir -p /tmp/w
  cp .whl/part-* /tmp/w/
  ls -la /tmp/w
  ;;
run)
  : "${OUT:?set OUT}"
  if [ ! -d /tmp/site/onnxruntime ]; then
    { read -r name; read -r parts; read -r sum; } < .gpucheck/wheel.txt
    have=$(ls /tmp/w/part-* 2>/dev/null | wc -l)
    [ "$have" -eq "$parts" ] || { echo "/tmp/w has $have of $parts wheel parts: the machine was given back; carry them again" >&2; exit 3; }
    wheel=/tmp/w/$name
    cat /tmp/w/part-* > "$wheel"
    [ "$(sha256sum < "$wheel" | cut -d' ' -f1)" = "$sum" ] || { echo "wheel checksum mismatch" >&2; exit 3; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheel"
  fi
  export PYTHONPATH=/tmp/site:service
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/nvidia-smi.csv" 2>&1 || true
  python3 scripts/gpu_check.py --models .gpucheck --passages .gpucheck/corpus50.jsonl --json "$OUT/gpu-check.json" \
    > "$OUT/gpu-check.log" 2>&1 || { tail -c 6000 "$OUT/gpu-check.log"; exit 1; }
  tail -c 6000 "$OUT/gpu-check.log"
  ;;
*)
  echo "usage: bash scripts/gpu_check.sh prepare | part | run" >&2
  exit 2
  ;;
esac
