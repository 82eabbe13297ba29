"""Training-step time with cached latents + text embeddings against on-the-fly encoding.

    python bench/latent_cache.py [--model-channels 160] [--image-size 256] [--batch-size 2]
        [--steps 5] [--warmup 2] [--threads 1] [--optimizer adamw|sgd]
        [--out bench/results/latent_cache]

Parts of Stable Diffusion 1.x's shape with random weights (no download): the SD VAE at its real
size (83.7 M parameters), the CLIP ViT-L/14 text tower (open_clip's `ViT-L-14` text config,
frozen, 77 tokens), and a U-Net of SD 1.x's structure (channel_mult 1,2,4,4, 2 res blocks,
attention at 4,2,1 with 8 heads, context 768) whose base width is `--model-channels` (SD: 320).
A step is `LatentDiffusion.training_step` + backward + optimizer step (AdamW), in the precision
`ldm.precision` resolves (`--precision auto`: bf16 autocast where the CPU has bf16, else fp32),
on batches already
in memory (the cached path also saves image decoding, which is not counted here). The two
paths alternate step by step so that both see the same machine load. Reported: medians of the
CPU seconds the process used per step (one thread by default: on a shared machine this is the
stable measure of work) and of wall seconds, and the encoders' CPU time alone.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from ldm import precision
from ldm.data.latents_write import encode_batch
from ldm.diffusion.objective import DiffusionObjective
from ldm.diffusion.schedule import NoiseSchedule
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.text_encoder import TextEncoder
from ldm.models.unet import UNetModel
from ldm.training.module import LatentDiffusion
from ldm.training.options import LRSchedule

REPO_ROOT = Path(__file__).resolve().parents[1]


# SGD (no optimizer state) lets the full-width U-Net fit a small machine's memory.
OPTIMIZERS = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def build_unet(model_channels: int) -> UNetModel:
    """SD 1.x's U-Net structure at base width `model_channels` (SD: 320)."""
    return UNetModel(
        in_channels=4,
        out_channels=4,
        model_channels=model_channels,
        channel_mult=[1, 2, 4, 4],
        num_res_blocks=2,
        attention_resolutions=[4, 2, 1],
        num_heads=8,
        context_dim=768,
        transformer_depth=1,
    )


def build(model_channels: int, optimizer: str = "adamw") -> LatentDiffusion:
    torch.manual_seed(0)
    unet = build_unet(model_channels)
    vae = AutoencoderKL()  # the SD 1.x/2.x first stage
    text = TextEncoder(model_name="ViT-L-14", frozen=True, pad_with_eot=True)
    schedule = NoiseSchedule(
        kind="scaled_linear", num_steps=1000, beta_start=0.00085, beta_end=0.012
    )
    return LatentDiffusion(
        unet,
        vae,
        text,
        DiffusionObjective(schedule, prediction="eps"),
        optimizer=functools.partial(OPTIMIZERS[optimizer], lr=1e-5),
        lr_schedule=LRSchedule(warmup_steps=1),
    )


def batches(module: LatentDiffusion, batch_size: int, image_size: int) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch_size, 3, image_size, image_size, generator=g) * 2 - 1
    captions = [
        f"a photograph of an astronaut riding a horse, number {i}" for i in range(batch_size)
    ]
    enc = encode_batch(module.vae, module.text_encoder, images, captions, flips=False)
    with torch.no_grad():
        empty = module.text_encoder([""])  # (1, L, D)
    cached = {
        "latent_mean": enc["mean"],
        "latent_std": enc["std"],
        "context": enc["context"],
        "empty_context": empty,
        "caption": captions,
    }
    return {"image": images, "caption": captions}, cached


def step(
    module: LatentDiffusion, opt: torch.optim.Optimizer, batch: dict, chosen: precision.Precision
) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one training step."""
    start, cpu = time.perf_counter(), time.process_time()
    with precision.autocast(chosen, "cpu"):
        loss = module.training_step(batch, 0)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start, time.process_time() - cpu


@torch.no_grad()
def encoder_seconds(module: LatentDiffusion, batch: dict, repeats: int) -> dict[str, float]:
    """Median CPU seconds of the work caching removes: VAE posterior and text encoder."""
    out = {"vae_encode": [], "text_encode": []}
    for _ in range(repeats):
        cpu = time.process_time()
        module.vae.encode(batch["image"])
        out["vae_encode"].append(time.process_time() - cpu)
        cpu = time.process_time()
        module.text_encoder(batch["caption"])
        out["text_encode"].append(time.process_time() - cpu)
    return {k: statistics.median(v) for k, v in out.items()}


def count_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def flop_table(model_channels: list[int], image_sizes: list[int]) -> dict:
    """GFLOP per image of the encoders and of a U-Net forward + backward, counted by torch on
    the meta device (no memory, no time): the speedup a compute-bound machine would see."""
    with torch.device("meta"):
        vae, text = (
            AutoencoderKL(),
            TextEncoder(model_name="ViT-L-14", frozen=True, pad_with_eot=True),
        )
        unets = {w: build_unet(w) for w in model_channels}
    table = {
        "text_encode": count_flops(lambda: text(["a photograph of an astronaut riding a horse"]))
    }
    for px in image_sizes:
        x, z = (
            torch.empty(1, 3, px, px, device="meta"),
            torch.empty(1, 4, px // 8, px // 8, device="meta"),
        )
        t, context = (
            torch.zeros(1, dtype=torch.long, device="meta"),
            torch.empty(1, 77, 768, device="meta"),
        )
        table[f"vae_encode_{px}px"] = count_flops(lambda: vae.posterior(x))
        for w, unet in unets.items():
            unet_flops = count_flops(lambda: unet(z, t, context).sum().backward())
            encoders = table[f"vae_encode_{px}px"] + table["text_encode"]
            table[f"unet{w}_fwd_bwd_{px}px"] = unet_flops
            table[f"speedup_unet{w}_{px}px"] = (unet_flops + encoders) / unet_flops
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-channels", type=int, default=160)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adamw")
    p.add_argument("--precision", default="auto", help="auto, 32-true or bf16-mixed")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench/results/latent_cache")
    p.add_argument(
        "--flops",
        action="store_true",
        help="only count FLOPs (widths 160 and 320, 256 and 512 px) into flops.json",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.flops:
        table = flop_table([160, 320], [256, 512])
        print(json.dumps(table, indent=2))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "flops.json").write_text(json.dumps(table, indent=2) + "\n")
        return 0
    chosen = precision.resolve(args.precision, "cpu")
    module = build(args.model_channels, args.optimizer)
    module.train()
    module.log = lambda *a, **k: None  # no trainer attached: skip Lightning's logging
    opt = module.configure_optimizers()["optimizer"]
    on_the_fly, cached = batches(module, args.batch_size, args.image_size)
    times: dict[str, list[float]] = {"on_the_fly": [], "cached": []}
    cpu: dict[str, list[float]] = {"on_the_fly": [], "cached": []}
    for i in range(args.warmup + args.steps):
        for name, batch in (("on_the_fly", on_the_fly), ("cached", cached)):
            wall, used = step(module, opt, batch, chosen)
            if i >= args.warmup:
                times[name].append(wall)
                cpu[name].append(used)
            print(f"step {i} {name}: {wall:.2f} s wall, {used:.2f} s CPU", flush=True)
    result = summary(module, args, times, cpu, encoder_seconds(module, on_the_fly, args.steps))
    result["precision"] = chosen.value
    print(json.dumps(result, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"unet{args.model_channels}_{args.image_size}px_b{args.batch_size}_{args.optimizer}.json"
    (args.out / name).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def summary(
    module: LatentDiffusion, args: argparse.Namespace, times: dict, cpu: dict, encoders: dict
) -> dict:
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {
        "command": "python bench/latent_cache.py " + " ".join(sys.argv[1:]),
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "latent_size": args.image_size // 8,
        "unet_model_channels": args.model_channels,
        "params_M": {
            "unet": count(module.unet) / 1e6,
            "vae": count(module.vae) / 1e6,
            "text_encoder": count(module.text_encoder) / 1e6,
        },
        "optimizer": args.optimizer,
        "threads": args.threads,
        "warmup_steps": args.warmup,
        "median_step_cpu_s": med_cpu,
        "speedup_cpu": med_cpu["on_the_fly"] / med_cpu["cached"],
        "median_step_wall_s": med,
        "speedup_wall": med["on_the_fly"] / med["cached"],
        "encoders_alone_cpu_s": encoders,
        "step_cpu_s": cpu,
        "step_wall_s": times,
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
    }


if __name__ == "__main__":
    sys.exit(main())
