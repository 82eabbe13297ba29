"""Images from a checkpoint, as `sample.py` makes them: `sample_from_config(cfg)` reads the
composed `configs/sample.yaml`, samples every (prompt, seed) in batches with `ldm.pipeline` and
writes one PNG per image (prompt, negative prompt, seed, sampler, steps and guidance scale in its
text metadata) and a grid of them all into `out_dir`.

Nothing is ever overwritten: image `{seed:06d}.png` and `grid.png` keep those names when none of
the run's names is taken in `out_dir`; otherwise every file of the run gets the first suffix
`-1`, `-2`, ... free for all of them (`000000-1.png`, ..., `grid-1.png`), so a run's images and
its grid share one suffix. Files are created exclusively: should another run take a name in the
meantime, that one file moves on to the next free suffix.

`prompt` is read by `ldm.pipeline.read_prompts`: a file of prompts (one per line) when it names an
existing file; a value ending in `.txt` without any whitespace that names no file is an error (a
mistyped file name, not a prompt); anything else is the prompt itself.
"""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image, PngImagePlugin
from tqdm import tqdm

from ldm.checkpoints.lora import pair_scales
from ldm.diffusion.samplers import SamplerConfig
from ldm.pipeline import Pipeline, image_grid, is_file, read_prompts
from ldm.precision import device_type

Job = tuple[str, int]  # (prompt, seed) of one image


def make_sampler(cfg: DictConfig) -> SamplerConfig:
    """`sampler=NAME` (configs/sampler/) with its overrides; a bad option is the config's own
    ValueError, not Hydra's wrapped one."""
    try:
        return instantiate(cfg)
    except InstantiationException as e:
        if isinstance(e.__cause__, ValueError):
            raise e.__cause__ from None
        raise


def as_list(value) -> list:
    return [] if not value else [value] if isinstance(value, str) else list(value)


def lora_list(files, scales) -> list[tuple[str, float]]:
    """(file, scale) of `lora=` (a file or a list) and `lora_scale=` (one scale, or one each)."""
    if not files:
        return []
    pairs = pair_scales([files] if isinstance(files, str) else list(files), scales)
    for f, _ in pairs:
        if not is_file(f):
            raise FileNotFoundError(f"LoRA file {f!r} does not exist")
    return pairs


def png_info(fields: dict) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    for k, v in fields.items():
        info.add_text(k, str(v))
    return info


def free_suffix(out: Path, stems: list[str], start: int = 0) -> int:
    """The first k >= start such that no `{stem}{suffix(k)}.png` of `stems` exists in `out`."""
    k = start
    while any((out / f"{stem}{suffix(k)}.png").exists() for stem in stems):
        k += 1
    return k


def suffix(k: int) -> str:
    return f"-{k}" if k else ""


def save_new(image: Image.Image, out: Path, stem: str, k: int, **options) -> Path:
    """Save a PNG as `{stem}{suffix(k)}.png`, created exclusively: a file that exists already
    (another run's, written since the suffix was chosen) is never replaced; the next free
    suffix is taken instead."""
    while True:
        path = out / f"{stem}{suffix(k)}.png"
        try:
            f = open(path, "xb")
        except FileExistsError:
            k = free_suffix(out, [stem], k + 1)
            continue
        try:
            with f:
                image.save(f, format="PNG", **options)
        except BaseException:
            path.unlink(missing_ok=True)  # ours, half written: no truncated PNG is left
            raise
        return path


def output_dir(out_dir: str) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {out_dir!r} is a file, not a folder; pass another out_dir=")
    out.mkdir(parents=True, exist_ok=True)
    return out


def load_pipeline(cfg: DictConfig, loras: list[tuple[str, float]]) -> tuple[Pipeline, dict]:
    """The Pipeline of `ckpt=` (with its LoRAs and embeddings) on `device=`, and its config."""
    device = device_type(cfg.device) if cfg.device == "auto" else cfg.device
    return Pipeline.load(
        cfg.ckpt,
        torch.device(device),
        cfg.precision,
        loras,
        as_list(cfg.embedding),
        prediction=cfg.prediction,
        use_ema=cfg.use_ema,
        vae=cfg.vae_ckpt,
        text_encoder=cfg.text_encoder_ckpt,
    )


def sample_jobs(
    pipe: Pipeline, jobs: list[Job], sampler: SamplerConfig, cfg: DictConfig, size: tuple[int, int]
) -> torch.Tensor:
    """Images (len(jobs), H, W, 3) uint8, `cfg.batch_size` jobs at a time."""
    images = []
    for k in tqdm(range(0, len(jobs), cfg.batch_size), desc="sampling", unit="batch"):
        batch = jobs[k : k + cfg.batch_size]
        prompts, seeds = [p for p, _ in batch], [s for _, s in batch]
        negative = [cfg.negative_prompt] * len(batch)
        images.append(pipe(prompts, seeds, sampler, negative, *size, **micro_conditioning(cfg)))
    return torch.cat(images)


def micro_conditioning(cfg: DictConfig) -> dict:
    """`crop=` and `original_size=` as Pipeline arguments (SDXL's; SD 1/2 ignore them)."""

    def pair(value, name: str) -> tuple[int, int]:
        if value is None or len(value) != 2:
            raise ValueError(f"{name}= takes two numbers in pixels, e.g. {name}=[0,0]; got {value}")
        return int(value[0]), int(value[1])

    size = cfg.get("original_size")
    return {
        "crop": pair(cfg.get("crop", [0, 0]), "crop"),
        "original_size": None if size is None else pair(size, "original_size"),
    }


def image_metadata(
    cfg: DictConfig, job: Job, sampler: SamplerConfig, pipe: Pipeline, loras: list
) -> dict:
    """The text fields of one image's PNG: what made it, with file names (not paths)."""
    prompt, seed = job
    embeddings = as_list(cfg.embedding)
    return {
        "prompt": prompt,
        "negative_prompt": cfg.negative_prompt,
        "seed": seed,
        "sampler": sampler.name,
        "sigmas": sampler.sigmas,
        "steps": sampler.steps,
        "cfg_scale": sampler.cfg_scale,
        "precision": pipe.precision.value,
        **(micro_metadata(cfg) if hasattr(pipe.unet, "label_emb") else {}),
        "ckpt": Path(cfg.ckpt).name,
        **({"lora": ", ".join(f"{Path(f).name}:{s:g}" for f, s in loras)} if loras else {}),
        **({"embedding": ", ".join(Path(f).name for f in embeddings)} if cfg.embedding else {}),
    }


def micro_metadata(cfg: DictConfig) -> dict:
    micro = micro_conditioning(cfg)
    size = micro["original_size"]
    return {"crop": list(micro["crop"]), **({"original_size": list(size)} if size else {})}


def sample_from_config(cfg: DictConfig) -> Path:
    """What `python sample.py` does with its composed `configs/sample.yaml`: the images and their
    grid written into `out_dir` (see the module docstring); returns the grid's path. Bad input
    raises CheckpointError, FileNotFoundError or ValueError with a message for the user."""
    prompts = read_prompts(str(cfg.prompt))
    sampler = make_sampler(cfg.sampler)
    micro_conditioning(cfg)  # a bad crop= is known before the model loads
    loras = lora_list(cfg.lora, cfg.lora_scale)
    pipe, config = load_pipeline(cfg, loras)
    out = output_dir(cfg.out_dir)  # before sampling: a bad out_dir is known in seconds
    size = (cfg.height or config["image_size"], cfg.width or config["image_size"])
    jobs = [(p, cfg.seed + i * cfg.n + j) for i, p in enumerate(prompts) for j in range(cfg.n)]
    images = sample_jobs(pipe, jobs, sampler, cfg, size)
    free = free_suffix(out, [f"{seed:06d}" for _, seed in jobs] + ["grid"])
    for job, img in zip(jobs, images):
        meta = png_info(image_metadata(cfg, job, sampler, pipe, loras))
        save_new(Image.fromarray(img.numpy()), out, f"{job[1]:06d}", free, pnginfo=meta)
    ncols = cfg.n if len(prompts) > 1 else None
    grid = save_new(image_grid(images, ncols=ncols), out, "grid", free)
    print(f"wrote {len(images)} images and {grid.name} to {out}")
    return grid
