"""Image-text pairs streamed from WebDataset shards in img2dataset's layout.

A sample is `KEY.<image ext>` + `KEY.txt` (caption) + optional `KEY.json` (metadata). Shards are
split across nodes/ranks and dataloader workers; training streams resampled shards (every rank
gets the same number of batches, so DDP never waits on a rank that ran dry), validation reads
each shard once.
"""
from __future__ import annotations

import glob
import io
import logging
from pathlib import Path
from typing import Callable

import lightning as L
import torch
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image

from ldm.data.transforms import ImageTransform

log = logging.getLogger(__name__)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")


class DataError(RuntimeError):
    """Shards that cannot be found or read; the message says what to fix."""


def expand_shards(pattern: str | list[str]) -> list[str]:
    """Brace-expand pattern(s); local paths must exist. URLs and `pipe:` are passed through."""
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    urls = [u for p in patterns for u in braceexpand(p)]
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    expanded = [u for u in urls if u not in local]
    for u in local:
        matches = sorted(glob.glob(u)) if any(c in u for c in "*?[") else ([u] if Path(u).is_file() else [])
        expanded += matches
    if not expanded:
        raise DataError(f"shard pattern {patterns} matches no file; check the path, or "
                        f"build shards first (e.g. python data/folder/prepare.py)")
    return expanded


def _decode(sample: dict, transform: ImageTransform) -> dict | None:
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    caption = sample.get("txt", b"")
    if ext is None:
        log.warning("skipping %s: no image", sample.get("__key__"))
        return None
    try:
        with Image.open(io.BytesIO(sample[ext])) as im:
            image = transform(im)
    except Exception as e:  # a corrupt image must not end a long run
        log.warning("skipping %s: unreadable image (%s)", sample.get("__key__"), e)
        return None
    text = caption.decode("utf-8", "replace").strip() if isinstance(caption, bytes) else str(caption)
    return {"image": image, "caption": text, "key": sample["__key__"]}


def _collate(samples: list[dict]) -> dict:
    return {"image": torch.stack([s["image"] for s in samples]),
            "caption": [s["caption"] for s in samples],
            "key": [s["key"] for s in samples]}


def make_dataset(urls: list[str], transform: ImageTransform, batch_size: int, train: bool,
                 shuffle_buffer: int = 1000, batches_per_epoch: int | None = None) -> wds.DataPipeline:
    stages = [wds.ResampledShards(urls) if train else wds.SimpleShardList(urls)]
    if not train:
        stages += [wds.split_by_node, wds.split_by_worker]
    stages += [wds.tarfile_to_samples(handler=wds.warn_and_continue)]
    if train:
        stages += [wds.shuffle(shuffle_buffer)]
    stages += [wds.map(lambda s: _decode(s, transform)), wds.select(lambda s: s is not None),
               wds.batched(batch_size, collation_fn=_collate, partial=not train)]
    pipeline = wds.DataPipeline(*stages)
    return pipeline.with_epoch(batches_per_epoch) if batches_per_epoch else pipeline


class ImageTextDataModule(L.LightningDataModule):
    """Train/validation loaders over shard patterns.

    Args:
        train_shards / val_shards: brace patterns, globs, lists of them, or URLs.
        batches_per_epoch: batches each dataloader worker yields per training epoch.
        prepare: optional callable run once before loading (e.g. renders the shapes shards).
    """

    def __init__(self, train_shards: str | list[str], val_shards: str | list[str] | None = None,
                 batch_size: int = 64, image_size: int = 64, num_workers: int = 1,
                 batches_per_epoch: int = 1000, random_crop: bool = False, flip: bool = False,
                 shuffle_buffer: int = 1000, prepare: Callable[[], object] | None = None) -> None:
        super().__init__()
        self.train_shards, self.val_shards, self.prepare = train_shards, val_shards, prepare
        self.batch_size, self.num_workers = batch_size, num_workers
        self.batches_per_epoch, self.shuffle_buffer = batches_per_epoch, shuffle_buffer
        self.transform = ImageTransform(image_size, random_crop=random_crop, flip=flip)

    def prepare_data(self) -> None:
        if self.prepare is not None:
            self.prepare()

    def _loader(self, pattern, train: bool) -> wds.WebLoader:
        urls = expand_shards(pattern)
        per_worker = max(1, self.batches_per_epoch // max(1, self.num_workers))
        ds = make_dataset(urls, self.transform, self.batch_size, train, self.shuffle_buffer,
                          per_worker if train else None)
        return wds.WebLoader(ds, batch_size=None, num_workers=self.num_workers,
                             persistent_workers=self.num_workers > 0 and train)

    def train_dataloader(self) -> wds.WebLoader:
        return self._loader(self.train_shards, train=True)

    def val_dataloader(self) -> wds.WebLoader | list:
        return self._loader(self.val_shards, train=False) if self.val_shards else []
