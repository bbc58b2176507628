# The commands that wrote this folder (run in the fifth run's code directory; C, D as below).
C=runs/pipelines/camvid/ray/camvid-step-bbf4a7b0bbcc/checkpoint_00001500
D=runs/pipelines/camvid/data/c1e9169b043a
P="--groups.pattern ^([^_]+)_ --holdout-data $D/train --holdout-groups 0001TP --no-mlflow"
step analyze --checkpoint $C --data $D/val --halting-only --merge-thresholds 0.2 --top-k 1 \
  --thresholds 0.5 --exit-score margin $P --json margin_m0.2_e0.5.json
step analyze --checkpoint $C --data $D/val --halting-only --merge-thresholds 0.2 --top-k 1 \
  --thresholds 0.7 --exit-score confidence $P --json confidence_m0.2_e0.7.json
# two labelled dusk frames (0001TP_007140, 0001TP_008070), sharded with the recipe's layout
step prep --dataset folder --layout configs/camvid/layout.yaml --src few/src --out few/shards \
  --split train --samples-per-shard 2
step eval --fit-exit-temperature --checkpoint $C --data few/shards --json temperature_dusk2.json
step eval --fit-exit-temperature --perturb-levels 4 --checkpoint $C --data $D/val \
  --json temperature_val_perturbed.json
for t in 0.5 0.4; do
  step analyze --checkpoint $C --data $D/val --halting-only --merge-thresholds 0.2 --top-k 1 \
    --thresholds $t --exit-score margin --exit-temperature 1.671,1.572 $P \
    --json margin_m0.2_e${t}_Tdusk2.json
  step analyze --checkpoint $C --data $D/val --halting-only --merge-thresholds 0.2 --top-k 1 \
    --thresholds $t --exit-score margin --exit-temperature 1.264,1.198 $P \
    --json margin_m0.2_e${t}_Tvalpert.json
done
