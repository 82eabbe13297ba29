#!/bin/bash
# Side by side at the same budget: experiment=shapes_sdxl, then the default run, each judged.
set -x
. .venv/bin/activate
export WANDB_MODE=offline
for exp in ${EXPS:-shapes_sdxl shapes}; do   # EXPS=shapes_sdxl: one of them
  d=${OUT:-bench/runs/shapes_sdxl}/$exp
  rm -rf $d; mkdir -p $d
  start=$(date +%s)
  python train.py experiment=$exp hydra.run.dir=$d/run data.prepare.out_dir=$d/shards data.source_shards=$d/shards/train/*.tar data.train_shards=$d/latents/*.tar data.val_shards=$d/shards/val/*.tar > $d/train.out 2>&1
  echo "train_seconds $(( $(date +%s) - start ))" >> $d/times.txt
  cat /proc/loadavg >> $d/times.txt
  python sample.py ckpt=$d/run/model.safetensors prompt=bench/results/shapes_quality/prompts.txt n=4 seed=0 out_dir=$d/samples > $d/sample.out 2>&1
  python -m ldm.shapes.judge $d/samples --json $d/scores.json > $d/judge.out 2>&1
  cat $d/scores.json
done
