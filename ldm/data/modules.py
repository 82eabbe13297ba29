"""The Lightning side of the data: the LightningDataModules the configs in configs/data/ name.

Each takes its data options as flat config keys (`data.image_size`, `data.mode`, ...), builds
one `ldm.data.options.DataOptions` from them and hands it to the plain-PyTorch readers
(`ldm.data.webdataset`, `ldm.data.latents`); what Lightning adds is `prepare_data` on one
process per node, and the count of batches trained, which places a resumed run's reading.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Callable

import lightning as L
import torch
from torch import nn

from ldm.data.latents import (
    CacheError,
    cached_extras,
    check_data_settings,
    check_models,
    make_latent_dataset,
    read_cache_metadata,
    require_frozen,
    warn_other_precision,
)
from ldm.data.latents_write import build_cache, cache_folder
from ldm.data.options import DataOptions
from ldm.data.shards import DataError, expand_shards, parse_sources, read_stats_count
from ldm.data.webdataset import EpochLoader, make_dataset, rank_and_world
from ldm.models.text_encoder import TextEncoder
from ldm.precision import device_type
from ldm.precision import resolve as resolve_precision

__all__ = ["ImageTextDataModule", "LatentDataModule"]
log = logging.getLogger(__name__)


def batches_trained(trainer: L.Trainer) -> int:
    """Training batches started in the run so far (restored with a checkpoint)."""
    return trainer.fit_loop.epoch_loop.batch_progress.total.ready


class ImageTextDataModule(L.LightningDataModule):
    """Train/validation loaders over shard patterns.

    Args:
        train_shards / val_shards: brace patterns, globs, URLs, lists of them, or for training a
            list of `{urls: pattern(s), weight: w}` sources mixed by weight.
        batches_per_epoch: batches per rank per training epoch in "stream" mode; None sizes the
            epoch from img2dataset's `_stats.json` (samples / (batch_size * world size)).
        prepare: optional callable run once before loading (e.g. renders the shapes shards).
        **options: the fields of `ldm.data.options.DataOptions` (image_size, mode, filters,
            caption_key, bucketing, max_pixels, ...), as flat keys.
    """

    def __init__(
        self,
        train_shards,
        val_shards=None,
        batch_size: int = 64,
        global_batch_size: int | None = None,
        num_workers: int = 1,
        batches_per_epoch: int | None = 1000,
        prepare: Callable[[], object] | None = None,
        **options,
    ) -> None:
        super().__init__()
        self.global_batch_size = global_batch_size  # applied by train.py (apply_global_batch)
        self.train_shards, self.val_shards, self.prepare = train_shards, val_shards, prepare
        self.batch_size, self.num_workers = batch_size, num_workers
        self.batches_per_epoch = batches_per_epoch
        self.options = DataOptions(**options)

    def prepare_data(self) -> None:
        if self.prepare is not None:
            self.prepare()

    def _batches_per_worker(self) -> int:
        per_rank = self.batches_per_epoch
        if per_rank is None:
            urls = [u for s in parse_sources(self.train_shards)[0] for u in s]
            n = read_stats_count(urls)
            if n is None:
                raise DataError(
                    "batches_per_epoch is null but the shards have no img2dataset "
                    "_stats.json beside them: set data.batches_per_epoch"
                )
            per_rank = max(1, n // (self.batch_size * rank_and_world()[1]))
            log.info("epoch sized from _stats.json: %d samples -> %d batches per rank", n, per_rank)
        return max(1, per_rank // max(1, self.num_workers))

    def _batches_done(self) -> int:
        return batches_trained(self.trainer) if self.trainer is not None else 0

    def train_dataloader(self) -> EpochLoader:
        stream = self.options.mode == "stream"
        ds = make_dataset(
            self.train_shards,
            self.options,
            self.batch_size,
            True,
            self._batches_per_worker() if stream else None,
            num_workers=self.num_workers,
        )
        return EpochLoader(ds, self.num_workers, self._batches_done)

    def val_dataloader(self) -> EpochLoader | list:
        if not self.val_shards:
            return []
        options = replace(self.options, bucketing=False)  # validation losses compare at one shape
        ds = make_dataset(
            self.val_shards, options, self.batch_size, False, num_workers=self.num_workers
        )
        return EpochLoader(ds, self.num_workers)


class LatentDataModule(L.LightningDataModule):
    """Train loader over cached-latent shards (made by data/latents/prepare.py, or built here).

    `options` (`ldm.data.options.DataOptions` fields as flat keys) are the data settings of the
    image config the cache replaces: image_size, random_crop and flip are checked against the
    cache, shuffle_buffer and seed order the stream. `use_encoders(vae, text_encoder)` hands over
    the model's frozen encoders (train.py does it once the model exists): `setup` then refuses
    encoders the cache was not made with, and where `source_shards` names the image shards the
    cache comes from, `prepare_data` (Lightning runs it on one process per node) first builds a
    missing, unfinished or outdated cache from them: with text embeddings when `cache_text`
    (the text encoder must then be frozen), else latents only; `cache_text=None` caches them
    exactly when the text encoder is frozen. Validation needs images (the module's
    validation step encodes them): point `val_shards` at image shards.
    """

    def __init__(
        self,
        train_shards: str | list[str],
        val_shards: str | list[str] | None = None,
        batch_size: int = 64,
        global_batch_size: int | None = None,
        num_workers: int = 1,
        batches_per_epoch: int = 1000,
        source_shards: str | list[str] | None = None,
        cache_text: bool | None = None,
        cache_dtype: str = "float16",
        prepare: Callable[[], object] | None = None,
        **options,
    ) -> None:
        super().__init__()
        self.global_batch_size = global_batch_size  # applied by train.py (apply_global_batch)
        self.train_shards, self.val_shards = train_shards, val_shards
        self.batch_size, self.num_workers = batch_size, num_workers
        self.batches_per_epoch, self.options = batches_per_epoch, DataOptions(**options)
        self.source_shards, self.cache_text, self.cache_dtype = (
            source_shards,
            cache_text,
            cache_dtype,
        )
        self.prepare, self.encoders, self.precision = prepare, None, "auto"
        self._meta: tuple[dict, torch.Tensor | None] | None = None

    def use_encoders(
        self, vae: nn.Module, text_encoder: nn.Module, precision: str = "auto"
    ) -> None:
        """The model's encoders, and the precision the run trains in (a cache is built in it)."""
        self.encoders, self.precision = (vae, text_encoder), precision

    def prepare_data(self) -> None:
        if self.prepare is not None:
            self.prepare()  # e.g. renders the shapes set the cache is made from
        if self.source_shards is not None:
            if self.encoders is None:
                raise CacheError(
                    "building a latent cache needs the model's encoders: call "
                    "use_encoders(vae, text_encoder) first"
                )
            self.build(*self.encoders)

    def setup(self, stage: str) -> None:
        meta, _ = self.cache()
        if self.encoders is not None:
            check_models(meta, *self.encoders)
        warn_other_precision(meta, resolve_precision(self.precision, device_type("auto")).value)

    def cache(self) -> tuple[dict, torch.Tensor | None]:
        if self._meta is None:
            meta, empty = read_cache_metadata(expand_shards(self.train_shards))
            check_data_settings(meta, self.options)
            self._meta = meta, empty
        return self._meta

    def text_to_cache(self, text_encoder: TextEncoder) -> TextEncoder | None:
        """The text encoder whose embeddings the cache holds, or None for latents only."""
        if self.cache_text is None:
            return None if text_encoder.trains else text_encoder
        if self.cache_text:
            require_frozen(text_encoder)
            return text_encoder
        return None

    def build(self, vae: nn.Module, text_encoder: nn.Module) -> None:
        out, text = cache_folder(self.train_shards), self.text_to_cache(text_encoder)
        args = self.options, self.batch_size, self.cache_dtype, self.precision
        if build_cache(out, self.source_shards, vae, text, *args):
            self._meta = None

    def train_dataloader(self) -> EpochLoader:
        meta, empty = self.cache()
        per_worker = max(1, self.batches_per_epoch // max(1, self.num_workers))
        urls, extras = expand_shards(self.train_shards), cached_extras(meta)
        ds = make_latent_dataset(
            urls, empty, self.batch_size, True, self.options, per_worker, extras
        )
        done = (lambda: batches_trained(self.trainer)) if self.trainer is not None else None
        return EpochLoader(ds, self.num_workers, done)

    def val_dataloader(self) -> EpochLoader | list:
        if not self.val_shards:
            return []
        images = DataOptions(self.options.image_size)  # the cache's centre crop, no flip
        ds = make_dataset(
            expand_shards(self.val_shards),
            images,
            self.batch_size,
            train=False,
            num_workers=self.num_workers,
        )
        return EpochLoader(ds, self.num_workers)
