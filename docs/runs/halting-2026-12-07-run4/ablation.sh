#!/usr/bin/env bash
while pgrep -f grid.sh >/dev/null; do sleep 5; done
C=/work/run4/runs/pipelines/camvid/ray/camvid-step-bbf4a7b0bbcc/checkpoint_00001500
D=/work/run4/runs/pipelines/camvid/data/c1e9169b043a
O=/work/main/docs/runs/halting-2026-12-07-run4
for spec in "margin 0.3 0.1,0.2,0.3,0.5,0.7" "confidence 0.7 0.5,0.6,0.7,0.8,0.9"; do
  set -- $spec
  PYTHONPATH=/work/run4 RAY_AUTH_MODE=disabled /work/main/.venv/bin/step analyze --checkpoint $C --data $D/val \
    --merge-thresholds 0.2 --top-k 1 --thresholds $2 --exit-score $1 --ablation-thresholds ${3//,/ } \
    --no-mlflow --json $O/ablation_$1.json > $O/ablation_$1.log 2>&1
  echo "ablation $1 rc=$? $(date +%T)"
done
