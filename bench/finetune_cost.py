"""Memory, step time and file size of LoRA, LoCon and a full fine-tune of the same model.

    python bench/finetune_cost.py [--unet sd15] [--image-size 256] [--batch-size 2] [--steps 5]
        [--precision auto] [--checkpointing] [--variants lora,locon,full]
        [--out bench/results/finetune_cost]
    python bench/finetune_cost.py --unet sdxl --image-size 1024 --batch-size 1 --checkpointing \
        --variants lora --warmup 0 --steps 1      # SDXL's U-Net LoRA step at 1024 px

Each variant runs in its own process (so that peak memory is its own): the U-Net config
`configs/unet/<--unet>.yaml` with random weights (no download; SD 1.5's text width, SDXL's
own with its vector conditioning), frozen parts as fine-tuning holds them, a training step
(forward, backward, AdamW step) on one batch of
latents and context held in memory, repeated `--steps` times after a warm-up. Reported per
variant: trainable parameters, median step seconds, peak resident memory (CPU) or peak
allocated memory (GPU), and the size of the file the variant writes (the adapters in the kohya
layout, or the U-Net in float16).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ldm import precision
from ldm.config import ROOT

VARIANTS = ("lora", "locon", "full")


def unet_config(name: str) -> dict:
    cfg = OmegaConf.load(ROOT / "configs" / "unet" / f"{name}.yaml")
    if name != "sdxl":  # SDXL's config has its own width (2048: two towers)
        cfg.context_dim = 768 if name == "sd15" else 1024 if name == "sd21" else 64
    return OmegaConf.to_container(cfg)


def preset(name: str):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return instantiate(compose("train", overrides=[f"+lora_preset={name}"]).lora_preset)


def one_variant(args: argparse.Namespace) -> dict:
    """Runs in the child process: build, train a few steps, measure."""
    from hydra.utils import instantiate

    from ldm.checkpoints.layout import save
    from ldm.checkpoints.lora_networks import save_networks

    device = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = precision.resolve(args.precision, device)
    torch.manual_seed(0)
    cfg = unet_config(args.unet)
    cfg["use_checkpoint"] = args.checkpointing
    if args.channels:
        cfg["model_channels"] = args.channels
    unet = instantiate(cfg).to(device)
    network = None
    if args.variant != "full":
        unet.requires_grad_(False)
        network = preset("kohya" if args.variant == "lora" else "locon")(unet).attach()
    params = [p for p in (network or unet).parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    h = args.image_size // 8
    x = torch.randn(args.batch_size, 4, h, h, device=device)
    context = torch.randn(args.batch_size, 77, cfg["context_dim"], device=device)
    t = torch.randint(0, 1000, (args.batch_size,), device=device)
    adm = cfg.get("adm_in_channels")  # SDXL: the pooled vector and micro-conditioning
    y = torch.randn(args.batch_size, adm, device=device) if adm else None
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        with precision.autocast(chosen, device):
            loss = (unet(x, t, context, y=y).float() - x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "out.safetensors"
        if network is not None:
            save_networks(path, {"unet": network}, cfg, "eps")
        else:
            save(path, {"unet": unet}, dtype=torch.float16)
        size = path.stat().st_size
    peak = (
        torch.cuda.max_memory_allocated()
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "variant": args.variant,
        "trainable_M": sum(p.numel() for p in params) / 1e6,
        "median_step_s": statistics.median(times),
        "images_per_s": args.batch_size / statistics.median(times),
        "peak_memory_GiB": peak / 2**30,
        "file_MB": size / 2**20,
        "device": device,
        "precision": chosen.value,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--unet", default="sd15")
    ap.add_argument("--channels", type=int, default=None, help="base width (SD: 320)")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="which, comma-separated")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/finetune_cost")
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the child's
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(one_variant(args)))
        return 0
    rows = []
    for variant in args.variants.split(","):
        child = [a for a in sys.argv[1:]] + ["--variant", variant]
        out = subprocess.run(
            [sys.executable, __file__, *child], capture_output=True, text=True, check=True
        ).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    result = {
        "command": "python bench/finetune_cost.py " + " ".join(sys.argv[1:]),
        "unet": args.unet,
        "model_channels": args.channels,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "gradient_checkpointing": args.checkpointing,
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}",
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    width = f"_w{args.channels}" if args.channels else ""
    name = f"{args.unet}{width}_{args.image_size}px_b{args.batch_size}_{rows[0]['device']}.json"
    (args.out / name).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
