"""DreamBooth's class images: generated once by the base model, kept as shards, reused.

Prior preservation (Ruiz et al., 2023) trains on the instance images of a subject or style and,
beside them, on images the base model itself makes for the plain class prompt(s), so that the
fine-tune keeps what the base did for prompts without the trigger. `ClassImages.ensure` renders
`n` images with the model about to be fine-tuned (before its first step) into `out_dir` as
img2dataset-layout shards (`NNNNN.tar` with `KEY.png` + `KEY.txt` + `KEY.json`), unless shards
made with the same prompts, count, seed, sampler and base weights are already there. Mix them
into training as a weighted source with a `loss_weight` (the prior-preservation weight):
`data.train_shards=[{urls: instance/*.tar, weight: 0.5}, {urls: OUT/*.tar, weight: 0.5,
loss_weight: 1.0}]`.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import torch
from PIL import Image

from ldm.data.shards import INFO_FILE
from ldm.diffusion.samplers import SamplerConfig
from ldm.fileio import ShardWriter, write_text
from ldm.pipeline import read_prompts

log = logging.getLogger(__name__)


class ClassImages:
    """`n` images of the class prompt(s) (cycled), made by the base model into `out_dir`."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        prompts: str | list[str],
        n: int = 200,
        seed: int = 0,
        sampler: SamplerConfig | None = None,
        batch_size: int = 16,
        shard_size: int = 1000,
        image_size: int | None = None,
    ) -> None:
        if n < 1:
            raise ValueError(f"class images: n must be positive, got {n}")
        self.out_dir, self.prompts, self.n, self.seed = (
            Path(out_dir),
            read_prompts(prompts),
            n,
            seed,
        )
        if not self.prompts:
            raise ValueError("class images need at least one class prompt")
        self.sampler = sampler or SamplerConfig(name="dpmpp_2m", steps=20, sigmas="exponential")
        self.batch_size, self.shard_size, self.image_size = batch_size, shard_size, image_size

    def settings(self, base_fingerprint: str) -> dict:
        return {
            "prompts": self.prompts,
            "n": self.n,
            "seed": self.seed,
            "sampler": vars(self.sampler),
            "base": base_fingerprint,
        }

    def ready(self, settings: dict) -> bool:
        try:
            return json.loads((self.out_dir / INFO_FILE).read_text()).get("settings") == settings
        except (OSError, ValueError, AttributeError, RecursionError):  # damaged: made anew
            return False

    @torch.no_grad()
    def ensure(self, pipe, base_fingerprint: str, image_size: int) -> Path:
        """Generate the images with `pipe` (an `ldm.pipeline.Pipeline` of the base model)
        unless they are there already; returns `out_dir`."""
        settings = self.settings(base_fingerprint)
        if self.ready(settings):
            log.info("class images: reusing %s", self.out_dir)
            return self.out_dir
        from tqdm import tqdm

        size = self.image_size or image_size
        jobs = [(self.prompts[i % len(self.prompts)], self.seed + i) for i in range(self.n)]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / INFO_FILE).unlink(missing_ok=True)
        with (
            tqdm(total=self.n, desc="class images", unit="img") as bar,
            ShardWriter(self.out_dir, self.shard_size) as writer,
        ):
            for start in range(0, self.n, self.shard_size):
                shard = jobs[start : start + self.shard_size]
                for k in range(0, len(shard), self.batch_size):  # batches within a shard
                    batch = shard[k : k + self.batch_size]
                    self._draw(writer, batch, pipe, size)
                    bar.update(len(batch))
        shards = writer.shards
        write_text(
            self.out_dir / INFO_FILE,
            json.dumps({"source": "class_images", "settings": settings, "shards": shards}, indent=2)
            + "\n",
        )
        return self.out_dir

    def _draw(self, writer: ShardWriter, batch: list, pipe, size: int) -> None:
        images = pipe([p for p, _ in batch], [s for _, s in batch], self.sampler, None, size, size)
        for (prompt, seed), image in zip(batch, images):
            key = f"{seed:09d}"
            buffer = io.BytesIO()
            Image.fromarray(image.numpy()).save(buffer, format="PNG")
            record = {
                "key": key,
                "caption": prompt,
                "seed": seed,
                "width": size,
                "height": size,
                "original_width": size,
                "original_height": size,
            }
            members = {"json": json.dumps(record).encode(), "png": buffer.getvalue()}
            writer.write(key, {**members, "txt": prompt.encode()})
