"""LoRA training speed and memory, ours beside diffusers' LoRA training example, on one device.

    python bench/gpu_lora.py [--image-size 512] [--batch-size 8] [--rank 8] [--steps 20]
        [--channels 320] [--out bench/results/gpu_lora]

Both loops train a rank-`--rank` LoRA on the attention projections (to_q, to_k, to_v, to_out.0:
what diffusers' `train_text_to_image_lora.py` adapts) of an SD 1.5 U-Net with random weights
(no download), the frozen U-Net in bf16, the adapters in float32, gradient checkpointing,
AdamW, bf16 autocast, on the same precomputed latents and text embeddings:
- ours: `UNetModel` + `ldm.models.lora` (the `attention` preset), and the `kohya` preset too;
- diffusers: `UNet2DConditionModel` + PEFT `LoraConfig` + `unet.add_adapter`, the example's
  set-up.
Reported per loop: images/s (median of `--steps` after a warm-up) and peak allocated memory.
Runs on a CUDA GPU; on the CPU (tiny `--channels` / `--image-size`) it only checks it runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

from ldm.config import ROOT


def data(args, device, generator):
    h = args.image_size // 8
    latents = torch.randn(args.batch_size, 4, h, h, generator=generator).to(device)
    context = torch.randn(args.batch_size, 77, 768, generator=generator).to(device)
    return latents, context


def timed_loop(step, args, device) -> dict:
    times = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    med = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"images_per_s": args.batch_size / med, "median_step_s": med, "peak_GiB": peak}


def ours(args, device, preset: str) -> dict:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from ldm.config import register_resolvers

    register_resolvers()
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "unet=sd15",
                f"+lora_preset={preset}",
                f"lora_preset.rank={args.rank}",
                f"lora_preset.alpha={args.rank}",
            ],
        )
    unet_cfg = {**cfg.unet, "context_dim": 768, "use_checkpoint": True}
    if args.channels:
        unet_cfg["model_channels"] = args.channels
    torch.manual_seed(0)
    unet = instantiate(unet_cfg).to(device, torch.bfloat16).requires_grad_(False)
    network = instantiate(cfg.lora_preset)(unet).to(device).attach()
    unet.train()
    opt = torch.optim.AdamW(network.parameters(), lr=1e-4)
    latents, context = data(args, device, torch.Generator().manual_seed(0))
    t = torch.randint(0, 1000, (args.batch_size,), device=device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = (unet(latents, t, context).float() - latents).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return {
        "loop": f"ours ({preset})",
        "adapters": len(network.paths),
        **timed_loop(step, args, device),
    }


def theirs(args, device) -> dict:
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from ldm.checkpoints.diffusers_configs import diffusers_unet_config

    cfg = {**dict(compose_unet()), "context_dim": 768}
    if args.channels:
        cfg["model_channels"] = args.channels
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**diffusers_unet_config(cfg)).to(device, torch.bfloat16)
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=args.rank,
            lora_alpha=args.rank,
            init_lora_weights="gaussian",
            target_modules=["to_k", "to_q", "to_v", "to_out.0"],
        )
    )
    for p in unet.parameters():  # the example casts the trainable LoRA parameters to float32
        if p.requires_grad:
            p.data = p.data.float()
    unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    latents, context = data(args, device, torch.Generator().manual_seed(0))
    t = torch.randint(0, 1000, (args.batch_size,), device=device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = (unet(latents, t, context).sample.float() - latents).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    n = sum(1 for m in unet.modules() if hasattr(m, "lora_A"))
    return {"loop": "diffusers example (PEFT)", "adapters": n, **timed_loop(step, args, device)}


def compose_unet():
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(ROOT / "configs/unet/sd15.yaml"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--channels", type=int, default=None, help="U-Net base width (SD: 320)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/gpu_lora")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = [ours(args, device, "attention"), theirs(args, device), ours(args, device, "kohya")]
    for r in rows:
        print(r, flush=True)
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    result = {
        "date": str(date.today()),
        "device": name,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "rank": args.rank,
        "channels": args.channels or 320,
        "command": "python bench/gpu_lora.py " + " ".join(sys.argv[1:]),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{device}_{args.image_size}px_b{args.batch_size}.json").write_text(
        json.dumps(result, indent=2) + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
