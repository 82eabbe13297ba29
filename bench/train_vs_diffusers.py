"""Our training step against a plain diffusers training loop on the same U-Net, side by side,
and the gain of each speed option of ours.

    python bench/train_vs_diffusers.py [--steps 10] [--warmup 3] [--out FILE.json] \
        [--config "OVERRIDES"] [--device cpu|cuda] [--precision auto|32-true|bf16-mixed] \
        [--batch N] [--flags all|NAME,...] [--compile]

Both loops train the U-Net of the composed config (default: the default run's shapes U-Net,
batch 64) on one batch held in memory of cached VAE posteriors and text embeddings (what the
default run trains on), with v-prediction on the config's schedule, AdamW with the same
settings, gradient clipping at 1.0 and an EMA of the U-Net:

- ours: `LatentDiffusion.training_step`, backward, clipping, the optimizer and LR schedule
  steps, the EMA update (what Lightning runs each step, without Lightning's own overhead);
- diffusers: `UNet2DConditionModel` with the same weights (our diffusers export's key map and
  config), the loop of diffusers' `train_text_to_image.py`: `DDPMScheduler.add_noise`,
  `get_velocity` (or the noise, for eps models), MSE, backward, clipping, the same optimizer as
  ours (the config's AdamW, fused by default), `EMAModel(foreach=True)`;
- diffusers_example: that loop as the example script writes it: `torch.optim.AdamW` with the
  same hyperparameters but PyTorch's default implementation, and `EMAModel`'s default (a
  Python loop over the parameters).

The loops alternate step by step (every one sees the same machine load); reported are median
seconds per step, images/s and the ratio to the `diffusers` loop. `--flags all` (or a comma
list) adds our speed options one at a time: channels_last, the math attention kernel,
gradient checkpointing, EMA every 10 steps, and AdamW without fusing (fused is the default);
`--compile` adds torch.compile, which compiles for minutes on a CPU. On a GPU
(`--device cuda`) it also reports MFU and the memory a step needs beyond the persistent state
(every loop keeps its own weights, gradients, optimizer state and EMA, so compare a few loops
at a time on big U-Nets: bench/gpu_train_speed.sh). Write the CPU kind beside the figures: on
CPUs without bf16 instructions `auto` is float32.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm import precision
from ldm.checkpoints.diffusers_configs import diffusers_unet_config, scheduler_config
from ldm.checkpoints.keymaps import sd_unet_to_diffusers
from ldm.config import ROOT, register_resolvers
from ldm.shapes.render import random_prompts
from ldm.training.callbacks import device_peak_tflops, unet_train_flops

FLAGS = {
    "channels_last": ["model.speed.channels_last=true"],
    "adamw_unfused": ["optim.fused=false"],
    "attention_math": ["model.speed.attention_backend=math"],
    "gradient_checkpointing": ["unet.use_checkpoint=true"],
    "ema_every_10": ["model.ema.every=10"],
    "ema_cpu_every_10": ["model.ema.device=cpu", "model.ema.every=10"],
}


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=overrides)


class Ours:
    """Our module's step, as Lightning would run it (training_step, backward, clip, step)."""

    def __init__(self, cfg, device: str) -> None:
        torch.manual_seed(0)
        self.module = instantiate(cfg.model).to(device).train()
        self.module.log = lambda *a, **k: None  # no trainer attached
        opt = self.module.configure_optimizers()
        self.opt, self.sched = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
        self.every, self.steps = self.module.ema_every, 0

    def state(self) -> list[torch.Tensor]:
        return [*self.module.state_dict().values(), *optimizer_tensors(self.opt)]

    def step(self, batch: dict, ctx) -> None:
        m = self.module
        with ctx():
            loss = m.training_step(batch, 0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.trainable_parameters(), 1.0)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.steps += 1
        if m.ema is not None and self.steps % self.every == 0:
            m.ema.update(m.unet, steps=self.every)


class Diffusers:
    """The loop of diffusers' train_text_to_image.py on the same U-Net weights."""

    def __init__(
        self, cfg, unet: torch.nn.Module, shift_scale: tuple, device: str, as_written: bool
    ) -> None:
        import diffusers
        from diffusers.training_utils import EMAModel

        ucfg = OmegaConf.to_container(cfg.unet, resolve=True)
        self.unet = diffusers.UNet2DConditionModel(**diffusers_unet_config(ucfg))
        self.unet.load_state_dict(sd_unet_to_diffusers(unet.state_dict(), ucfg))
        self.unet.to(device).train()
        self.shift, self.scale = shift_scale  # the VAE's latent shift and scale
        diffusion = OmegaConf.to_container(cfg.diffusion, resolve=True)
        sched = {k: v for k, v in scheduler_config(diffusion).items() if not k.startswith("_")}
        sched = {k: v for k, v in sched.items() if k not in ("set_alpha_to_one", "steps_offset")}
        self.noise = diffusers.DDPMScheduler(**sched)
        optim = instantiate(cfg.optim)
        if as_written:  # the example's torch.optim.AdamW(lr, betas, weight_decay, eps)
            optim.keywords.pop("fused", None)
        self.opt = optim(self.unet.parameters())
        warmup = cfg.model.lr_schedule.warmup_steps
        self.lr = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: min(1.0, (s + 1) / max(1, warmup))
        )
        # The example's EMAModel(...) steps parameter by parameter; foreach=True in one call.
        self.ema = EMAModel(
            self.unet.parameters(), decay=cfg.model.ema.decay or 0.999, foreach=not as_written
        )
        self.ema.to(device)

    def state(self) -> list[torch.Tensor]:
        weights = [*self.unet.parameters(), *self.ema.shadow_params]
        return weights + optimizer_tensors(self.opt)

    def step(self, batch: dict, ctx) -> None:
        mean, std, context = batch["latent_mean"], batch["latent_std"], batch["context"]
        latents = mean + std * torch.randn_like(mean)  # the posterior sample (then scaled)
        latents = (latents - self.shift) * self.scale
        noise = torch.randn_like(latents)
        t = torch.randint(0, self.noise.config.num_train_timesteps, (latents.shape[0],))
        t = t.to(latents.device)
        noisy = self.noise.add_noise(latents, noise, t)
        if self.noise.config.prediction_type == "v_prediction":
            target = self.noise.get_velocity(latents, noise, t)
        else:
            target = noise
        with ctx():
            pred = self.unet(noisy, t, context).sample
        loss = F.mse_loss(pred.float(), target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.opt.step()
        self.lr.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.step(self.unet.parameters())


def make_batch(ours: Ours, batch_size: int, image_size: int, device: str) -> dict:
    """Cached posteriors and text embeddings, made by the config's VAE and text encoder."""
    m = ours.module
    captions = random_prompts(batch_size, 0)
    images = torch.rand(batch_size, 3, image_size, image_size, device=device) * 2 - 1
    with torch.no_grad():
        post = m.vae.posterior(images)
        context = m.text_encoder(captions).float()
        empty = m.text_encoder([""]).float()
    return {
        "latent_mean": post.mean,
        "latent_std": post.std,
        "context": context,
        "empty_context": empty,
        "caption": captions,
    }


def optimizer_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]


def resident_gib(loop) -> float:
    """GiB of GPU memory a loop keeps between steps (gradients are freed): weights, frozen parts
    included, optimizer state, EMA."""
    tensors = {t.data_ptr(): t for t in loop.state() if t.is_cuda}
    return sum(t.nbytes for t in tensors.values()) / 2**30


def timed_step(loop, batch: dict, ctx, device: str) -> tuple[float, float]:
    """(seconds, GiB the step needed beyond the memory held before it: activations and
    temporaries; GPU only, else 0)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
    start = time.perf_counter()
    loop.step(batch, ctx)
    extra = 0.0
    if device == "cuda":
        torch.cuda.synchronize()
        extra = (torch.cuda.max_memory_allocated() - held) / 2**30
    return time.perf_counter() - start, extra


def describe_machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    from step_time import cpu_model

    isa = torch.backends.cpu.get_cpu_capability()
    return f"{cpu_model()}, {torch.get_num_threads()} threads, {isa}"


def commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        return out.stdout.strip() or None
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="", help="train.py overrides, e.g. 'unet=sd15 ...'")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto")
    p.add_argument("--batch", type=int, default=None, help="default: data.batch_size")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--flags", default="", help="also these speed options of ours: all, or NAME,NAME,..."
    )
    p.add_argument("--compile", action="store_true", help="also torch.compile (slow to build)")
    p.add_argument("--no-diffusers-example", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    register_resolvers()
    base = [o for o in args.config.split() if o]
    cfg = compose_cfg(base)
    batch_size = args.batch or cfg.data.batch_size
    chosen = precision.resolve(args.precision, args.device)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(chosen.value)

    def ctx():
        if dtype is None:
            return torch.autocast(args.device, enabled=False)
        return torch.autocast(args.device, dtype=dtype)

    ours = Ours(cfg, args.device)
    batch = make_batch(ours, batch_size, cfg.data.image_size, args.device)
    loops = {"ours": ours}
    start_unet = copy.deepcopy(ours.module.unet).cpu()
    vae = ours.module.vae
    scale = (float(vae.shift_factor), float(vae.scale_factor))
    loops["diffusers"] = Diffusers(cfg, start_unet, scale, args.device, as_written=False)
    if not args.no_diffusers_example:
        loops["diffusers_example"] = Diffusers(cfg, start_unet, scale, args.device, True)
    wanted = list(FLAGS) if args.flags == "all" else [f for f in args.flags.split(",") if f]
    variants = {name: FLAGS[name] for name in wanted}
    if args.compile:
        variants["compile"] = ["model.speed.compile=true"]
    for name, extra in variants.items():
        loops[f"ours+{name}"] = Ours(compose_cfg(base + extra), args.device)
    times: dict[str, list[float]] = {name: [] for name in loops}
    memory: dict[str, float] = {name: 0.0 for name in loops}
    for i in range(args.warmup + args.steps):
        for name, loop in loops.items():
            seconds, extra = timed_step(loop, batch, ctx, args.device)
            memory[name] = max(memory[name], extra)
            if i >= args.warmup:
                times[name].append(seconds)
            print(f"step {i} {name}: {seconds:.3f} s", file=sys.stderr)
    flops = unet_train_flops(ours.module.unet, batch["latent_mean"], batch["context"])
    peak = device_peak_tflops(torch.device(args.device), dtype is not None)
    result = {
        "date": datetime.date.today().isoformat(),
        "commit": commit(),
        "command": "python bench/train_vs_diffusers.py " + " ".join(sys.argv[1:]),
        "device": describe_machine(args.device),
        "torch": torch.__version__,
        "precision": chosen.value,
        "config": args.config or "(the default run's)",
        "batch_size": batch_size,
        "unet_train_gflop_per_image": flops / 1e9,
        "loops": {},
    }
    reference = statistics.median(times["diffusers"])
    for name, ts in times.items():
        med = statistics.median(ts)
        row = {
            "median_s": round(med, 4),
            "images_per_s": batch_size / med,
            "speedup_vs_diffusers": reference / med,
            "unet_tflops": batch_size * flops / med / 1e12,
        }
        if peak:
            row["mfu"] = row["unet_tflops"] / peak
        if args.device == "cuda":
            row["step_memory_gib"] = memory[name]  # beyond weights, gradients, optimizer, EMA
            row["resident_gib"] = resident_gib(loops[name])  # those, between steps
        result["loops"][name] = row
        print(
            f"{name:>30}: {row['images_per_s']:8.1f} img/s  {med:.3f} s/step  "
            f"x{row['speedup_vs_diffusers']:.2f} vs diffusers  {row['unet_tflops']:.3f} TFLOP/s"
            + (f"  MFU {row['mfu']:.1%}" if peak else "")
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
