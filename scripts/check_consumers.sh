#!/usr/bin/env bash
# Consumer check: the third parties' own code, in their own environments, on folders sparse-export writes.
#   bash scripts/check_consumers.sh            (from anywhere; needs PyPI and ../shared/assets)
# Builds throwaway venvs under $CONSUMER_ROOT (default /tmp/sparse-export-consumers, never inside the repo):
#   ds      deepsparse[llm]==1.8.0 (transformers 4.39, tokenizers 0.15), pyarrow<16
#   hf4     transformers 4.57.6 + compressed-tensors 0.14.0.1 + psutil + accelerate
#   hf5     transformers 5.24.0 + compressed-tensors >= 0.15 (shows the silent random-weight load there)
#   lmeval  lm-eval[hf] 0.4.13
# torch is pinned to 2.13.0 everywhere (the CPU wheel; an unpinned torch pulls a multi-GB CUDA build).
# Artifacts: SmolLM2 pruned 50% and 2:4 (or PRUNED50=DIR PRUNED24=DIR to reuse folders from `prune`), then
# `export onnx` (plain), `export onnx --kv-cache --max-length 256`, `export compressed`.
# Writes benchmarks/results/consumers.md and $CONSUMER_ROOT/work/*.json / *.log. Each check runs on its own;
# a failure is recorded, not fatal. Only the reference (transformers 5 greedy generate) runs in .venv.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
ROOT=${CONSUMER_ROOT:-/tmp/sparse-export-consumers}
case "$(realpath -m "$ROOT")/" in "$REPO"/*) echo "error: CONSUMER_ROOT must be outside the repository" >&2; exit 2;; esac
W=$ROOT/work
mkdir -p "$W"
PY=${PYTHON:-python3.11}
SE="$REPO/.venv/bin/sparse-export"
CALIB="$REPO/../shared/assets/c4-sample/c4-train.00000-of-01024.head1041.jsonl"
PROMPT=${PROMPT:-"chat:Write a short story about a cat who learns to fly."}
NEW=${NEW_TOKENS:-32}
MAXLEN=256
C="$REPO/scripts/consumers"

venv() {  # venv NAME PACKAGES...: create once, install, record versions
  local name=$1; shift
  if [ ! -x "$ROOT/$name/bin/python" ] || [ ! -f "$ROOT/$name/.installed" ]; then
    rm -rf "${ROOT:?}/$name"
    "$PY" -m venv "$ROOT/$name" || return 1
    local t0=$SECONDS
    "$ROOT/$name/bin/pip" install -q "$@" > "$W/install-$name.log" 2>&1 || { echo "install $name failed: see $W/install-$name.log"; return 1; }
    echo "$((SECONDS - t0))" > "$ROOT/$name/.installed"
  fi
  "$ROOT/$name/bin/pip" list --format=freeze 2>/dev/null > "$W/freeze-$name.txt"
}
step() {  # step NAME COMMAND...: run, keep its log and exit code
  local name=$1; shift
  echo "== $name"
  local t0=$SECONDS
  "$@" > "$W/$name.log" 2>&1
  echo "{\"rc\": $?, \"seconds\": $((SECONDS - t0))}" > "$W/$name.rc.json"
  tail -n 3 "$W/$name.log"
}

echo "== venvs in $ROOT"
# ---- artifacts, written by sparse-export as a user would
P50=${PRUNED50:-$W/pruned50}; P24=${PRUNED24:-$W/pruned24}
[ -d "$P50" ] || step prune50 "$SE" prune smollm2 --out "$P50" --calib "$CALIB" --nsamples 8 --seqlen 256
[ -d "$P24" ] || step prune24 "$SE" prune smollm2 --out "$P24" --pattern 2:4 --calib "$CALIB" --nsamples 8 --seqlen 256
step export-plain "$SE" export onnx "$P50" --out "$W/plain" --force
step export-kv "$SE" export onnx "$P50" --out "$W/kv" --kv-cache --max-length $MAXLEN --force
step export-compressed "$SE" export compressed "$P24" --out "$W/compressed" --force
step reference50 "$REPO/.venv/bin/python" "$C/reference.py" "$P50" "$PROMPT" $NEW "$W/ref50.json" $MAXLEN
step reference24 "$REPO/.venv/bin/python" "$C/reference.py" "$P24" "$PROMPT" $NEW "$W/ref24.json" $MAXLEN force

# ---- DeepSparse's TextGeneration pipeline (it rewrites model.onnx in place: give it a copy)
venv ds 'deepsparse[llm]==1.8.0' 'pyarrow<16' 'torch==2.13.0'
rm -rf "$W/kv-copy" && cp -r "$W/kv" "$W/kv-copy"
step ds-pipeline "$ROOT/ds/bin/python" "$C/ds_pipeline.py" "$W/kv-copy" "$W/ref50.json" "$W/ds-pipeline.json"

# ---- deepsparse.benchmark: without -shapes (falls back to ONNX Runtime), with -shapes on a copy
rm -rf "$W/plain-copy" && cp -r "$W/plain" "$W/plain-copy"
step ds-benchmark-dynamic "$ROOT/ds/bin/deepsparse.benchmark" "$W/plain-copy/model.onnx" -t 5 -w 2
rm -rf "$W/plain-copy" && cp -r "$W/plain" "$W/plain-copy"
step ds-benchmark-shapes "$ROOT/ds/bin/deepsparse.benchmark" "$W/plain-copy/model.onnx" -shapes "[1,400],[1,400]" -t 10 -w 2
cmp -s "$W/plain/model.onnx" "$W/plain-copy/model.onnx"; echo "{\"copy_rewritten\": $([ $? -ne 0 ] && echo true || echo false)}" > "$W/ds-benchmark-rewrite.json"

# ---- the 2:4 compressed folder with transformers' own from_pretrained
venv hf4 'torch==2.13.0' 'transformers==4.57.6' 'compressed-tensors==0.14.0.1' psutil accelerate
step ct-hf4 "$ROOT/hf4/bin/python" "$C/ct_load.py" "$W/compressed" "$P24" "$W/ref24.json" "$W/ct-hf4.json" float32
step ct-hf4-default "$ROOT/hf4/bin/python" "$C/ct_load.py" "$W/compressed" "$P24" "$W/ref24.json" "$W/ct-hf4-default.json" default
venv hf5 'torch==2.13.0' 'transformers==5.24.0' 'compressed-tensors>=0.15' psutil accelerate
step ct-hf5 "$ROOT/hf5/bin/python" "$C/ct_load.py" "$W/compressed" "$P24" "$W/ref24.json" "$W/ct-hf5.json" float32

# ---- lm-evaluation-harness with the local WikiText-2 task (first LMEVAL_LIMIT articles)
venv lmeval 'torch==2.13.0' 'lm-eval[hf]==0.4.13'
(cd "$REPO" && step lm-eval "$ROOT/lmeval/bin/lm_eval" --model hf --model_args "pretrained=$P50,dtype=float32" \
  --include_path scripts/lm_eval --tasks wikitext2_local --device cpu --batch_size 1 \
  --limit "${LMEVAL_LIMIT:-2}" --output_path "$W/lm-eval")

"$REPO/.venv/bin/python" "$C/report.py" "$ROOT" "$REPO/benchmarks/results/consumers.md"
