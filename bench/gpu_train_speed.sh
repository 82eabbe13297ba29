#!/usr/bin/env bash
# Training speed of the SD 1.5 U-Net on one GPU, bf16, from precomputed latents and text
# embeddings: our loop against diffusers' at 256 and 512 px (images/s, U-Net TFLOP/s, MFU, the
# memory a step needs), then our speed options at 512 px, two at a time (each loop holds its
# own weights, gradients, AdamW state and EMA: ~17 GB for this U-Net). Runs as it is where a
# CUDA GPU is present:   bash bench/gpu_train_speed.sh [OUT_DIR]
# (For reference: the MLPerf Stable Diffusion reference reaches about 128 images/s per H200 at
# 512 px, about 31% MFU.)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results/train_speed}
sd15="experiment=sd15_finetune unet.use_checkpoint=false"  # as the diffusers loop: no checkpointing
run() { python bench/train_vs_diffusers.py --device cuda --precision bf16-mixed --steps 20 --warmup 5 "$@"; }
run --batch 64 --config "$sd15 data.image_size=256" --out "$out/gpu_sd15_256.json"
run --batch 32 --config "$sd15 data.image_size=512" --out "$out/gpu_sd15_512.json"
run --batch 32 --config "$sd15 data.image_size=512" --no-diffusers-example \
    --flags channels_last,attention_math --out "$out/gpu_sd15_512_flags_a.json"
run --batch 32 --config "$sd15 data.image_size=512" --no-diffusers-example \
    --flags gradient_checkpointing,ema_every_10,ema_cpu_every_10 --compile --out "$out/gpu_sd15_512_flags_b.json"
