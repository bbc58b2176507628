#!/usr/bin/env bash
# The halting protocol over a grid of exit scores, thresholds, merge thresholds and contexts.
set -u
CKPT=$1; OUT=$2; shift 2
D=/work/run4/runs/pipelines/camvid/data/c1e9169b043a
mkdir -p "$OUT"
run() { # name merge exit score context
  local f="$OUT/$1.json"; [ -s "$f" ] && return
  PYTHONPATH=/work/run4 RAY_AUTH_MODE=disabled /work/main/.venv/bin/step analyze --checkpoint "$CKPT" \
    --data "$D/val" --halting-only --merge-thresholds "$2" --top-k 1 --thresholds "$3" \
    --exit-score "$4" --halted-context "$5" --groups.pattern '^([^_]+)_' \
    --holdout-data "$D/train" --holdout-groups 0001TP --no-mlflow --json "$f" > "$OUT/$1.log" 2>&1
  echo "$1 rc=$?"
}
for spec in "$@"; do run $spec; done
