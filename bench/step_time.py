"""Training-step time of a composed config, per part, for several recipes side by side.

    python bench/step_time.py [--steps 10] [--warmup 3] [--precision auto] \
        --variant NAME "OVERRIDE ..." [--variant NAME "OVERRIDE ..." ...]

Each variant is a set of train.py overrides (default: the default run as it was, on images
with a text encoder that trains; on cached latents; and as it is, on cached latents and text
embeddings of the frozen text encoder). A step is what
`LatentDiffusion.training_step` does plus backward, optimizer step and EMA update, on one batch
of the configured size held in memory (loading is not counted: `bench/loader.py` measures it).
The variants alternate step by step, so that all see the same machine load; reported are the
median wall and CPU seconds per step, images/s, and the parts' share (VAE encode, text encoder,
U-Net forward + loss, backward, optimizer + EMA). Hold a fast CPU to the slow path with
`ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2` (bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from ldm import precision
from ldm.config import ROOT, register_resolvers
from ldm.shapes.render import random_prompts

DEFAULT_VARIANTS = {
    "images": "data=shapes text_encoder.frozen=false",
    "cached_latents": "text_encoder.frozen=false",
    "cached_latents_and_text": "",
}


def cpu_model() -> str:
    """The CPU's model name (Linux), else the platform's machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build(overrides: list[str]):
    """(module, optimizer, batch) of a composed train config, the batch made like the data's."""
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    torch.manual_seed(0)
    module = instantiate(cfg.model)
    module.train()
    module.log = lambda *a, **k: None  # no trainer attached
    opt = module.configure_optimizers()["optimizer"]
    b, size = cfg.data.batch_size, cfg.data.image_size
    captions = random_prompts(b, 0)
    images = torch.rand(b, 3, size, size) * 2 - 1
    if not str(cfg.data._target_).endswith("LatentDataModule"):
        return module, opt, {"image": images, "caption": captions}
    with torch.no_grad():
        post = module.vae.posterior(images)
        batch = {"latent_mean": post.mean, "latent_std": post.std, "caption": captions}
        dm = instantiate(cfg.data)
        if dm.text_to_cache(module.text_encoder) is not None:
            batch.update(
                context=module.text_encoder(captions), empty_context=module.text_encoder([""])
            )
    return module, opt, batch


def timed(fn, times: dict, name: str):
    start = time.perf_counter()
    out = fn()
    times[name] = times.get(name, 0.0) + time.perf_counter() - start
    return out


def step(module, opt, batch, chosen: precision.Precision) -> dict[str, float]:
    """Seconds of each part of one training step, plus wall and CPU totals."""
    parts: dict[str, float] = {}
    wall, cpu = time.perf_counter(), time.process_time()
    with precision.autocast(chosen, "cpu"):
        latents = timed(lambda: module.latents(batch), parts, "vae_encode")
        context = timed(lambda: module.condition(batch), parts, "text_encoder")
        loss = timed(lambda: module.objective(module.unet, latents, context), parts, "unet_forward")
    timed(loss.backward, parts, "backward")
    timed(
        lambda: (
            opt.step(),
            opt.zero_grad(set_to_none=True),
            module.ema is not None and module.ema.update(module.unet),
        ),
        parts,
        "optimizer_ema",
    )
    parts.update(wall=time.perf_counter() - wall, cpu=time.process_time() - cpu)
    return parts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "OVERRIDES"))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", default="auto")
    p.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    register_resolvers()
    variants = dict(args.variant) if args.variant else DEFAULT_VARIANTS
    chosen = precision.resolve(args.precision, "cpu")
    built = {name: build(o.split()) for name, o in variants.items()}
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for i in range(args.warmup + args.steps):
        for name, (module, opt, batch) in built.items():
            parts = step(module, opt, batch, chosen)
            if i >= args.warmup:
                runs[name].append(parts)
    result = {
        "command": "python bench/step_time.py " + " ".join(sys.argv[1:]),
        "precision": chosen.value,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "variants": {},
    }
    for name, rows in runs.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        batch_size = len(built[name][2]["caption"])
        result["variants"][name] = {
            "overrides": variants[name],
            "batch_size": batch_size,
            "images_per_s": batch_size / med["wall"],
            "median_s": {k: round(v, 4) for k, v in med.items()},
        }
        shares = " ".join(f"{k} {v:.3f}" for k, v in med.items() if k not in ("wall", "cpu"))
        print(
            f"{name:>26}: {batch_size / med['wall']:6.1f} img/s  wall {med['wall']:.3f} s "
            f"cpu {med['cpu']:.3f} s | {shares}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
