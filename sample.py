"""Images from a checkpoint: `python sample.py ckpt=FILE prompt="a red circle" n=8`.

Writes one PNG per image (prompt, negative prompt, seed, sampler, steps and guidance scale in its
text metadata) and a grid of them all into `out_dir`.
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
from ldm.config import exit_on, register_resolvers
from ldm.diffusion.samplers import SamplerConfig
from ldm.pipeline import Pipeline, image_grid

log = logging.getLogger("sample")
register_resolvers()


def read_prompts(prompt: str) -> list[str]:
    """A prompt, or a text file (one prompt per line) when it names a .txt file or an existing
    path."""
    path = Path(prompt)
    if path.suffix == ".txt" or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(
                f'prompt file {prompt!r} does not exist; pass prompt="some text" '
                f"or prompt=FILE with one prompt per line"
            )
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"prompt file {prompt!r} holds no prompt")
        return prompts
    return [prompt]


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
    files = [files] if isinstance(files, str) else list(files)
    scales = [scales] if isinstance(scales, (int, float)) else list(scales)
    if len(scales) == 1:
        scales = scales * len(files)
    if len(scales) != len(files):
        raise ValueError(
            f"{len(files)} LoRA files but {len(scales)} lora_scale values: give "
            f"one scale, or one per file"
        )
    for f in files:
        if not Path(f).is_file():
            raise FileNotFoundError(f"LoRA file {f!r} does not exist")
    return list(zip(files, map(float, scales)))


def png_info(fields: dict) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    for k, v in fields.items():
        info.add_text(k, str(v))
    return info


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@hydra.main(version_base="1.3", config_path="configs", config_name="sample")
@exit_on(CheckpointError, FileNotFoundError, ValueError)
def main(cfg: DictConfig) -> None:
    prompts = read_prompts(str(cfg.prompt))
    sampler = make_sampler(cfg.sampler)
    loras = lora_list(cfg.lora, cfg.lora_scale)
    pipe, config = Pipeline.load(
        cfg.ckpt,
        pick_device(cfg.device),
        cfg.precision,
        loras,
        as_list(cfg.embedding),
        prediction=cfg.prediction,
        use_ema=cfg.use_ema,
        vae=cfg.vae_ckpt,
        text_encoder=cfg.text_encoder_ckpt,
    )
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
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
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
        Image.fromarray(img.numpy()).save(out / f"{seed:06d}.png", pnginfo=png_info(meta))
    image_grid(images, ncols=cfg.n if len(prompts) > 1 else None).save(out / "grid.png")
    print(f"wrote {len(images)} images and grid.png to {out}")


if __name__ == "__main__":
    main()
