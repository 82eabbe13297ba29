"""Image-text pairs from WebDataset shards in img2dataset's layout, streamed or in exact epochs.

A sample is `KEY.<image ext>` + a caption (`KEY.txt`, or a field of `KEY.json`) + optional
`KEY.json` metadata, which the filters of `ldm.data.filters` read. Each batch is
{"image": (B, 3, H, W) in [-1, 1], "caption": [str], "key": [str], "counts": {name: int}};
`counts` holds the samples kept and rejected (per reason) since the reader's previous batch:
readers are worker processes, so the counts travel with the data, and the `DataCounts` callback
(`ldm.training.callbacks`) logs them.

Modes (every rank gets the same number of batches in both, so DDP never waits on a rank):
- "stream": shards drawn with replacement from each source, sources mixed per sample by weight,
  a fixed number of batches per epoch. For LAION-scale sets.
- "exact": each sample once per epoch across all ranks and workers (a per-epoch permutation
  dealt round-robin, see `exact_assignment`), the remainder padded with a few repeats (or
  dropped). Needs a key index (one pass over the tar headers at start): for small sets.
Validation reads each shard once, shards split across ranks and workers.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
from typing import Callable, Iterator

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ldm.data.buckets import bucket_batches, make_buckets, nearest_bucket
from ldm.data.filters import MetadataFilter, add_counts, new_counts, rejection_reason
from ldm.data.shards import (
    IMAGE_EXTS,
    DataError,
    exact_assignment,
    loss_weights,
    parse_sources,
    read_shard,
    read_stats_count,
    resampled,
)
from ldm.data.transforms import ImageTransform

__all__ = ["make_dataset", "ImageTextDataModule"]
log = logging.getLogger(__name__)
BROKEN = ("no_image", "bad_image", "no_caption")
# A training stream that rejects this many samples in a row would otherwise spin forever (filters
# that nothing passes): it stops with the counts instead. At a 1% keep rate the chance of such
# a run is 0.99^10000 ~ 1e-44.
MAX_REJECTED_IN_A_ROW = 10_000


def rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def caption_of(sample: dict, meta: dict, caption_key: str) -> str:
    """`KEY.<caption_key>` if the sample has that file, else the json field `caption_key`."""
    value = sample.get(caption_key, meta.get(caption_key))
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value.strip() if isinstance(value, str) else ""


def read_meta(sample: dict) -> dict:
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except ValueError:
        meta = {}
    return meta if isinstance(meta, dict) else {}


def precheck(
    sample: dict, filters: MetadataFilter, caption_key: str, skip_empty_captions: bool
) -> tuple[str | None, str, str | None]:
    """(rejection reason or None, caption, image extension): every check short of decoding."""
    meta = read_meta(sample)
    reason = rejection_reason(meta, filters) if filters.active else None
    caption = caption_of(sample, meta, caption_key)
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if reason is None and ext is None:
        reason = "no_image"
    if reason is None and skip_empty_captions and not caption:
        reason = "no_caption"
    return reason, caption, ext


class ImageTextStream(IterableDataset):
    """The reader run in each dataloader worker; yields collated batches (see module doc)."""

    def __init__(
        self,
        sources: list[list[str]],
        weights: list[float],
        transform: ImageTransform,
        batch_size: int,
        mode: str = "stream",
        batches_per_worker: int | None = None,
        shuffle_buffer: int = 1000,
        filters: MetadataFilter = MetadataFilter(),
        caption_key: str = "txt",
        skip_empty_captions: bool = True,
        buckets: list[tuple[int, int]] | None = None,
        seed: int = 0,
        drop_remainder: bool = False,
        index: list[tuple[str, str]] | None = None,
        index_counts: dict[str, int] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        loss_weights: list[float] | None = None,
    ) -> None:
        if mode not in ("stream", "exact", "once"):
            raise DataError(f"data mode {mode!r}: use 'stream' or 'exact' ('once' for validation)")
        if mode == "exact" and buckets:
            raise DataError(
                "aspect-ratio bucketing gives batch counts that depend on the shapes "
                "met, so it runs in mode='stream' (set batches_per_epoch) only"
            )
        if loss_weights is not None and mode != "stream":
            raise DataError("per-source loss weights need sources mixed in mode='stream'")
        self.sources, self.weights, self.transform = sources, weights, transform
        self.loss_weights = loss_weights
        self.batch_size, self.mode, self.batches_per_worker = batch_size, mode, batches_per_worker
        self.shuffle_buffer, self.filters, self.caption_key = shuffle_buffer, filters, caption_key
        self.skip_empty_captions, self.buckets, self.seed = skip_empty_captions, buckets, seed
        self.drop_remainder, self.index, self.index_counts = drop_remainder, index, index_counts
        self.rank, self.world_size = (rank, world_size) if rank is not None else rank_and_world()
        self.epoch, self._iterations = 0, 0
        self.counts = new_counts()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def slot(self) -> tuple[int, int]:
        """(this reader's index, number of readers) over all ranks and workers."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return self.rank * workers + worker, self.world_size * workers

    def count(self, name: str) -> None:
        self.counts[name if name == "kept" else f"rejected/{name}"] += 1

    # -- decoding ---------------------------------------------------------------------------
    def decode(self, sample: dict) -> dict | None:
        key = sample["__key__"]
        reason, caption, ext = precheck(
            sample, self.filters, self.caption_key, self.skip_empty_captions
        )
        if reason is not None:
            self.count(reason)
            # broken input is news; a metadata filter at work is not
            level = logging.WARNING if reason in BROKEN else logging.DEBUG
            log.log(level, "skipping %s (%s): %s", key, sample.get("__url__"), reason)
            return None
        try:
            with Image.open(io.BytesIO(sample[ext])) as im:
                bucket = nearest_bucket(*im.size, self.buckets) if self.buckets else None
                image = self.transform(im, bucket)
        except Exception as e:  # a corrupt image must not end a long run
            self.count("bad_image")
            log.warning("skipping %s (%s): bad_image: %s", key, sample.get("__url__"), e)
            return None
        self.count("kept")
        return {
            "image": image,
            "caption": caption,
            "key": key,
            "bucket": bucket,
            "loss_weight": sample.get("__loss_weight__"),
        }

    def collate(self, samples: list[dict]) -> dict:
        counts, self.counts = self.counts, new_counts()
        batch = {
            "image": torch.stack([s["image"] for s in samples]),
            "caption": [s["caption"] for s in samples],
            "key": [s["key"] for s in samples],
            "counts": counts,
        }
        if self.loss_weights is not None:  # (B,): the loss weight of each sample's source
            batch["loss_weight"] = torch.tensor([s["loss_weight"] for s in samples])
        return batch

    # -- sample streams -----------------------------------------------------------------------
    def _rng(self) -> random.Random:
        slot, _ = self.slot()
        return random.Random(
            f"{self.seed}/{slot}/{self.epoch}/{self._iterations}/{torch.initial_seed()}"
        )

    def _read(self, urls) -> Iterator[dict]:
        failures = 0
        for url in urls:
            got = False
            for sample in read_shard(url, self.count):
                got, failures = True, 0
                yield sample
            failures = 0 if got else failures + 1
            if failures >= max(50, 10 * sum(map(len, self.sources))):
                raise DataError(
                    f"{failures} shards in a row gave no sample (last: {url}); "
                    f"check the shard URLs and credentials"
                )

    def _mixed(self, rng: random.Random) -> Iterator[dict]:
        streams = [self._read(resampled(urls, rng)) for urls in self.sources]
        while True:
            i = rng.choices(range(len(streams)), self.weights)[0] if len(streams) > 1 else 0
            sample = next(streams[i])
            if self.loss_weights is not None:
                sample["__loss_weight__"] = self.loss_weights[i]
            yield sample

    def _exact(self, rng: random.Random) -> Iterator[dict]:
        slot, n_slots = self.slot()
        mine = exact_assignment(
            len(self.index), self.epoch, self.seed, slot, n_slots, self.drop_remainder
        )
        wanted: dict[tuple[str, str], int] = {}
        for i in mine:  # a padding repeat may land on the reader that has the original
            wanted[self.index[i]] = wanted.get(self.index[i], 0) + 1
        urls = sorted({url for url, _ in wanted})
        rng.shuffle(urls)
        if slot == 0 and self.index_counts:  # rejections of the index pass, once per epoch
            add_counts(self.counts, self.index_counts)
        for sample in self._read(urls):
            for _ in range(wanted.get((sample["__url__"], sample["__key__"]), 0)):
                yield sample

    def _shuffled(self, samples: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        buffer = []
        for sample in samples:
            buffer.append(sample)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[dict]:
        rng = self._rng()
        self._iterations += 1  # persistent workers keep this object: a new order each epoch
        if self.mode == "stream":
            raw = self._mixed(rng)
        elif self.mode == "exact":
            raw = self._exact(rng)
        else:
            slot, n_slots = self.slot()
            raw = self._read([u for urls in self.sources for u in urls][slot::n_slots])
        if self.mode != "once" and self.shuffle_buffer > 1:
            raw = self._shuffled(raw, rng)
        yield from self._batches(self._decoded(raw))

    def _decoded(self, raw: Iterator[dict]) -> Iterator[dict]:
        rejected = 0
        for sample in map(self.decode, raw):
            if sample is not None:
                rejected = 0
                yield sample
                continue
            rejected += 1
            if rejected >= MAX_REJECTED_IN_A_ROW:
                raise DataError(
                    f"{rejected} samples in a row rejected "
                    f"({ {k: v for k, v in self.counts.items() if v} }); "
                    f"check the filters and caption_key against the shards' json"
                )

    def _batches(self, decoded: Iterator[dict]) -> Iterator[dict]:
        partial = self.mode != "stream"
        if self.buckets:
            groups = bucket_batches(decoded, self.batch_size, partial)
        else:
            groups = _fixed_batches(decoded, self.batch_size, partial)
        limit = self.batches_per_worker if self.mode == "stream" else None
        if self.mode == "exact":
            slot, n_slots = self.slot()
            n = len(exact_assignment(len(self.index), 0, 0, slot, n_slots, self.drop_remainder))
            limit = -(-n // self.batch_size)
        n_out, last = 0, None
        for group in groups:
            yield self.collate(group)
            n_out, last = n_out + 1, group
            if limit is not None and n_out >= limit:
                return
        if self.mode == "exact" and n_out < limit:  # images that failed to decode: same count
            if last is None:
                raise DataError(
                    "every sample of this reader failed to decode; nothing to pad "
                    "the epoch with (see the bad_image warnings)"
                )
            log.warning("padding %d batches with repeats of decoded samples", limit - n_out)
            for _ in range(limit - n_out):
                yield self.collate(last)


def _fixed_batches(samples: Iterator[dict], batch_size: int, partial: bool):
    batch = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch and partial:
        yield batch


def build_index(
    urls: list[str],
    filters: MetadataFilter,
    caption_key: str = "txt",
    skip_empty_captions: bool = True,
) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """(url, key) of every sample that passes the checks short of decoding, and the counts of
    those that do not: what an exact epoch deals out. One read of every shard."""
    index, counts = [], new_counts()

    def count(reason: str) -> None:
        counts[f"rejected/{reason}"] += 1

    for url in urls:
        for sample in read_shard(url, count):
            reason = precheck(sample, filters, caption_key, skip_empty_captions)[0]
            if reason is None:
                index.append((url, sample["__key__"]))
            else:
                count(reason)
    rejected = {k: v for k, v in counts.items() if v}
    if not index:
        raise DataError(f"no usable sample in {len(urls)} shards (rejected: {rejected})")
    log.info(
        "exact epochs over %d samples in %d shards (rejected: %s)", len(index), len(urls), rejected
    )
    return index, counts


def make_dataset(
    urls,
    transform: ImageTransform,
    batch_size: int,
    train: bool,
    shuffle_buffer: int = 1000,
    batches_per_epoch: int | None = None,
    mode: str = "stream",
    filters: MetadataFilter | None = None,
    caption_key: str = "txt",
    skip_empty_captions: bool = True,
    buckets: list[tuple[int, int]] | None = None,
    seed: int = 0,
    drop_remainder: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    num_workers: int = 1,
) -> ImageTextStream:
    """The batch stream over `urls` (a shard list, patterns, or `{urls, weight}` sources).

    Training streams (`batches_per_epoch` batches per worker) or reads exact epochs (`mode`);
    validation (`train=False`) reads each shard once. `rank`/`world_size` default to
    torch.distributed's, else the RANK/WORLD_SIZE environment variables; `num_workers` (the
    loader's) only sizes the warning about fewer shards than readers.
    """
    sources, weights = parse_sources(urls)
    filters = filters or MetadataFilter()
    mode = mode if train else "once"
    index, index_counts = None, None
    if mode == "exact":
        index, index_counts = build_index(
            [u for s in sources for u in s], filters, caption_key, skip_empty_captions
        )
    ds = ImageTextStream(
        sources,
        weights,
        transform,
        batch_size,
        mode,
        batches_per_epoch,
        shuffle_buffer,
        filters,
        caption_key,
        skip_empty_captions,
        buckets,
        seed,
        drop_remainder,
        index,
        index_counts,
        rank,
        world_size,
        loss_weights(urls) if train else None,
    )
    n_shards, readers = sum(map(len, sources)), ds.world_size * max(1, num_workers)
    if mode != "exact" and n_shards < readers:
        log.warning(
            "%d shards for %d ranks x %d workers: %s",
            n_shards,
            ds.world_size,
            max(1, num_workers),
            "readers share shards (each in its own order)"
            if train
            else "some readers get no validation shard and idle",
        )
    return ds


class EpochLoader(DataLoader):
    """A DataLoader that tells its dataset the epoch before each pass (new workers are forked
    with it), so an exact epoch reshuffles; the epoch comes from `epoch_fn` (the trainer's, so
    a resumed run continues the sequence) or counts passes."""

    def __init__(
        self,
        dataset,
        num_workers: int,
        epoch_fn: Callable[[], int | None] = lambda: None,
        persistent_workers: bool = False,
    ) -> None:
        super().__init__(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            persistent_workers=persistent_workers and num_workers > 0,
        )
        self.epoch_fn, self.passes = epoch_fn, 0

    def __iter__(self):
        epoch = self.epoch_fn()
        self.dataset.set_epoch(self.passes if epoch is None else epoch)
        self.passes += 1
        return super().__iter__()


class ImageTextDataModule(L.LightningDataModule):
    """Train/validation loaders over shard patterns.

    Args:
        train_shards / val_shards: brace patterns, globs, URLs, lists of them, or for training a
            list of `{urls: pattern(s), weight: w}` sources mixed by weight.
        batches_per_epoch: batches per rank per training epoch in "stream" mode; None sizes the
            epoch from img2dataset's `_stats.json` (samples / (batch_size * world size)).
        mode: "stream" (resampled shards, LAION scale) or "exact" (each sample once per epoch).
        filters: a `MetadataFilter` (or its fields as a dict) applied to `KEY.json`.
        caption_key: `txt` reads `KEY.txt`; another name reads that file or json field.
        bucketing: aspect-ratio buckets around image_size^2 ("stream" mode).
        prepare: optional callable run once before loading (e.g. renders the shapes shards).
    """

    def __init__(
        self,
        train_shards,
        val_shards=None,
        batch_size: int = 64,
        image_size: int = 64,
        num_workers: int = 1,
        batches_per_epoch: int | None = 1000,
        random_crop: bool = False,
        flip: bool = False,
        shuffle_buffer: int = 1000,
        prepare: Callable[[], object] | None = None,
        mode: str = "stream",
        filters: MetadataFilter | dict | None = None,
        caption_key: str = "txt",
        skip_empty_captions: bool = True,
        bucketing: bool = False,
        bucket_step: int = 64,
        bucket_max_ratio: float = 2.0,
        seed: int = 0,
        drop_remainder: bool = False,
    ) -> None:
        super().__init__()
        self.train_shards, self.val_shards, self.prepare = train_shards, val_shards, prepare
        self.batch_size, self.num_workers, self.image_size = batch_size, num_workers, image_size
        self.batches_per_epoch, self.shuffle_buffer = batches_per_epoch, shuffle_buffer
        self.transform = ImageTransform(image_size, random_crop=random_crop, flip=flip)
        filters = filters or MetadataFilter()
        self.options = dict(
            mode=mode,
            caption_key=caption_key,
            skip_empty_captions=skip_empty_captions,
            filters=filters if isinstance(filters, MetadataFilter) else MetadataFilter(**filters),
            buckets=make_buckets(image_size, bucket_step, bucket_max_ratio) if bucketing else None,
            seed=seed,
            drop_remainder=drop_remainder,
        )

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

    def _epoch(self) -> int | None:
        return self.trainer.current_epoch if self.trainer is not None else None

    def train_dataloader(self) -> EpochLoader:
        stream = self.options["mode"] == "stream"
        ds = make_dataset(
            self.train_shards,
            self.transform,
            self.batch_size,
            True,
            self.shuffle_buffer,
            self._batches_per_worker() if stream else None,
            num_workers=self.num_workers,
            **self.options,
        )
        return EpochLoader(ds, self.num_workers, self._epoch, persistent_workers=stream)

    def val_dataloader(self) -> EpochLoader | list:
        if not self.val_shards:
            return []
        options = {**self.options, "buckets": None}  # validation losses compare at one shape
        ds = make_dataset(
            self.val_shards,
            self.transform,
            self.batch_size,
            False,
            num_workers=self.num_workers,
            **options,
        )
        return EpochLoader(ds, self.num_workers)
