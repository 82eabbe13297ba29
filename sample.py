"""Images from a checkpoint: `python sample.py ckpt=FILE prompt="a red circle" n=8`.

Writes one PNG per image (prompt, negative prompt, seed, sampler, steps and guidance scale in its
text metadata) and a grid of them all into `out_dir`.

Nothing is ever overwritten: image `{seed:06d}.png` and `grid.png` keep those names when none of
this run's names is taken in `out_dir`; otherwise every file of the run gets the first suffix
`-1`, `-2`, ... free for all of them (`000000-1.png`, ..., `grid-1.png`), so a run's images and
its grid share one suffix. Files are created exclusively: should another run take a name in the
meantime, that one file moves on to the next free suffix.

`prompt` is read as a file of prompts (one per line) when it names an existing file; a value
ending in `.txt` without any whitespace that names no file is an error (a mistyped file name, not
a prompt); anything else is the prompt itself, whatever its length or characters.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image, PngImagePlugin
from tqdm import tqdm

from ldm.checkpoints import CheckpointError
from ldm.checkpoints.lora import pair_scales
from ldm.config import exit_on, register_resolvers
from ldm.diffusion.samplers import SamplerConfig
from ldm.pipeline import Pipeline, image_grid, is_file, read_prompts
from ldm.precision import device_type

log = logging.getLogger("sample")
register_resolvers()


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


@hydra.main(version_base="1.3", config_path="configs", config_name="sample")
@exit_on(CheckpointError, FileNotFoundError, ValueError)
def main(cfg: DictConfig) -> None:
    prompts = read_prompts(str(cfg.prompt))
    sampler = make_sampler(cfg.sampler)
    loras = lora_list(cfg.lora, cfg.lora_scale)
    pipe, config = Pipeline.load(
        cfg.ckpt,
        torch.device(device_type(cfg.device) if cfg.device == "auto" else cfg.device),
        cfg.precision,
        loras,
        as_list(cfg.embedding),
        prediction=cfg.prediction,
        use_ema=cfg.use_ema,
        vae=cfg.vae_ckpt,
        text_encoder=cfg.text_encoder_ckpt,
    )
    out = output_dir(cfg.out_dir)  # before sampling: a bad out_dir is known in seconds
    height = cfg.height or config["image_size"]
    width = cfg.width or config["image_size"]
    jobs = [(p, cfg.seed + i * cfg.n + j) for i, p in enumerate(prompts) for j in range(cfg.n)]
    images = []
    for k in tqdm(range(0, len(jobs), cfg.batch_size), desc="sampling", unit="batch"):
        batch = jobs[k : k + cfg.batch_size]
        images.append(
            pipe(
                [p for p, _ in batch],
                [s for _, s in batch],
                sampler,
                [cfg.negative_prompt] * len(batch),
                height,
                width,
            )
        )
    images = torch.cat(images)
    free = free_suffix(out, [f"{seed:06d}" for _, seed in jobs] + ["grid"])
    for (prompt, seed), img in zip(jobs, images):
        meta = {
            "prompt": prompt,
            "negative_prompt": cfg.negative_prompt,
            "seed": seed,
            "sampler": sampler.name,
            "sigmas": sampler.sigmas,
            "steps": sampler.steps,
            "cfg_scale": sampler.cfg_scale,
            "precision": pipe.precision.value,
            "ckpt": Path(cfg.ckpt).name,
            **({"lora": ", ".join(f"{Path(f).name}:{s:g}" for f, s in loras)} if loras else {}),
            **(
                {"embedding": ", ".join(Path(f).name for f in as_list(cfg.embedding))}
                if cfg.embedding
                else {}
            ),
        }
        save_new(Image.fromarray(img.numpy()), out, f"{seed:06d}", free, pnginfo=png_info(meta))
    grid = save_new(
        image_grid(images, ncols=cfg.n if len(prompts) > 1 else None), out, "grid", free
    )
    print(f"wrote {len(images)} images and {grid.name} to {out}")


if __name__ == "__main__":
    main()
