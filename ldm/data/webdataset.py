"""Image-text pairs from WebDataset shards in img2dataset's layout, streamed or in exact epochs.

A sample is `KEY.<image ext>` + a caption (`KEY.txt`, or a field of `KEY.json`) + optional
`KEY.json` metadata, which the filters of `ldm.data.filters` read. Each batch is
{"image": (B, 3, H, W) in [-1, 1], "caption": [str], "key": [str], "time_ids": (B, 6),
"counts": {name: int}}; `time_ids` are each sample's SDXL micro-conditioning, the truth of it:
original (height, width) from img2dataset's `original_height/width` or the image, the crop's
(top, left) as `ImageTransform.apply` made it (flips included), the target (height, width);
`counts` holds the samples kept and rejected (per reason) since the reader's previous batch:
readers are worker processes, so the counts travel with the data, and the `DataCounts` callback
(`ldm.training.callbacks`) logs them.

Modes (every rank gets the same number of batches in both, so DDP never waits on a rank):
- "stream": shards drawn with replacement from each source, sources mixed per sample by weight,
  a fixed number of batches per epoch. For LAION-scale sets.
- "exact": each sample once per epoch: a per-epoch permutation cut into global batches, each
  rank taking its slice of each (`ldm.data.shards.dealt_batches`), the remainder padded with a
  few repeats (or dropped). A global batch holds the same samples whatever the number of ranks.
  Needs an index (one pass over the tar headers at start): for small sets.
Validation deals its samples the same way, in their own order: every rank gets the same number
of batches (a rank without data would leave the others waiting in a collective).

Resuming: `EpochLoader` places each pass by the batches the run has trained (a count Lightning
restores with a checkpoint), so a resumed run reads exactly the batches the uninterrupted one
would have read next.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
from dataclasses import replace
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ldm.data.buckets import bucket_batches, nearest_bucket
from ldm.data.filters import (
    add_counts,
    new_counts,
    parse_metadata,
    rejection_reason,
)
from ldm.data.images import ImageRejected, open_image
from ldm.data.options import DataOptions
from ldm.data.shards import (
    IMAGE_EXTS,
    MAX_MEMBER_BYTES,
    DataError,
    dealt_batches,
    loss_weights,
    parse_sources,
    rank_part,
    read_sample,
    read_shard,
    resampled,
    worker_batches,
)
from ldm.data.transforms import original_size, time_ids

__all__ = ["ImageTextStream", "make_dataset", "EpochLoader"]
log = logging.getLogger(__name__)
# Broken or hostile input (logged as a warning); the other reasons are filters at work.
BROKEN = (
    "no_image",
    "bad_image",
    "no_caption",
    "bad_metadata",
    "too_many_pixels",
    "bad_aspect",
    "member_too_large",
)
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


def read_meta(sample: dict) -> dict | None:
    """KEY.json's object ({} without one), None when it is broken (`parse_metadata`)."""
    return parse_metadata(sample.get("json"))


def precheck(sample: dict, options: DataOptions) -> tuple[str | None, str, str | None]:
    """(rejection reason or None, caption, image extension): every check short of decoding."""
    meta = read_meta(sample)
    if meta is None:
        reason, meta = "bad_metadata", {}
    else:
        reason = rejection_reason(meta, options.filters) if options.filters.active else None
    caption = caption_of(sample, meta, options.caption_key)
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if reason is None and ext is None:
        reason = "no_image"
    if reason is None and options.skip_empty_captions and not caption:
        reason = "no_caption"
    return reason, caption, ext


class ImageTextStream(IterableDataset):
    """The reader run in each dataloader worker; yields collated batches (see module doc).

    A batch is made in two stages: samples are read, checked (metadata, caption, image present)
    and grouped without decoding, then the group is decoded. A resumed run (`resume_at`) thus
    skips the batches its rank already trained by reading, not decoding: a stream replays the
    current epoch's reading (bounded by `batches_per_epoch`), exact epochs and validation jump
    straight to the batch (samples are read by their offset in the shard). An image that fails
    to decode leaves its batch one sample short; a batch that loses every image repeats the
    previous one, so each reader still yields its fixed number of batches.
    """

    def __init__(
        self,
        sources: list[list[str]],
        weights: list[float],
        batch_size: int,
        options: DataOptions,
        batches_per_worker: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        loss_weights: list[float] | None = None,
    ) -> None:
        mode = options.mode
        if mode not in ("stream", "exact", "once"):
            raise DataError(f"data mode {mode!r}: use 'stream' or 'exact' ('once' for validation)")
        if mode == "exact" and options.bucketing:
            raise DataError(
                "aspect-ratio bucketing gives batch counts that depend on the shapes "
                "met, so it runs in mode='stream' (set batches_per_epoch) only"
            )
        if loss_weights is not None and mode != "stream":
            raise DataError("per-source loss weights need sources mixed in mode='stream'")
        self.sources, self.weights, self.loss_weights = sources, weights, loss_weights
        self.batch_size, self.batches_per_worker = batch_size, batches_per_worker
        self.options, self.mode, self.seed = options, mode, options.seed
        self.transform, self.buckets = options.transform(), options.buckets
        self.index: list[dict] | None = None  # what exact epochs and validation deal out
        self.index_counts: dict[str, int] | None = None
        self.rank, self.world_size = (rank, world_size) if rank is not None else rank_and_world()
        self.epoch, self.resume_at = 0, 0
        self.counts = new_counts()

    def batches_per_epoch(self, workers: int) -> int:
        """Batches a rank reads in one epoch (every epoch the same) with `workers` workers."""
        if self.mode == "stream":
            return self.batches_per_worker * workers
        return len(
            dealt_batches(
                len(self.index),
                0,
                self.seed,
                self.batch_size,
                self.world_size,
                shuffle=False,
                drop_remainder=self.options.drop_remainder and self.mode == "exact",
            )
        )

    def set_epoch(self, epoch: int, resume_at: int = 0) -> None:
        """The epoch to read next, and how many of this rank's batches of it to skip."""
        self.epoch, self.resume_at = epoch, resume_at

    def worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info else (0, 1)

    def slot(self) -> tuple[int, int]:
        """(this reader's index, number of readers) over all ranks and workers."""
        worker, workers = self.worker()
        return self.rank * workers + worker, self.world_size * workers

    def count(self, name: str) -> None:
        name = name if name == "kept" else f"rejected/{name}"
        self.counts[name] = self.counts.get(name, 0) + 1

    # -- checking and decoding (what a reader of other sample kinds overrides) ---------------
    def rejection(self, sample: dict) -> str | None:
        """Why a sample is rejected short of decoding it, or None."""
        return precheck(sample, self.options)[0]

    def check(self, sample: dict) -> dict | None:
        """The sample with its caption, image extension (and bucket), or None if rejected."""
        reason, caption, ext = precheck(sample, self.options)
        bucket = None
        if reason is None:
            try:  # the header alone: its size is checked (and bucketed) before any decoding
                with open_image(sample[ext], self.options.image_limits) as im:
                    bucket = nearest_bucket(*im.size, self.buckets) if self.buckets else None
            except ImageRejected as e:
                reason = e.reason
            except Exception:
                reason = "bad_image"
        if reason is not None:
            self.count(reason)
            # broken input is news; a metadata filter at work is not
            level = logging.WARNING if reason in BROKEN else logging.DEBUG
            log.log(level, "skipping %s (%s): %s", sample["__key__"], sample.get("__url__"), reason)
            return None
        return {**sample, "__caption__": caption, "__ext__": ext, "bucket": bucket}

    def decode(self, sample: dict) -> dict | None:
        key, ext = sample["__key__"], sample["__ext__"]
        try:
            with open_image(sample[ext], self.options.image_limits) as im:
                original = original_size(read_meta(sample), im)  # before a reduced-scale decode
                image, crop, _ = self.transform.apply(im, sample["bucket"])
        except Exception as e:  # a corrupt or hostile image must not end a long run
            reason = e.reason if isinstance(e, ImageRejected) else "bad_image"
            self.count(reason)
            log.warning("skipping %s (%s): %s: %s", key, sample.get("__url__"), reason, e)
            return None
        self.count("kept")
        return {
            "image": image,
            "caption": sample["__caption__"],
            "key": key,
            "loss_weight": sample.get("__loss_weight__"),
            "time_ids": time_ids(original, crop, tuple(image.shape[1:])),
        }

    def collate(self, samples: list[dict]) -> dict:
        counts, self.counts = self.counts, new_counts()
        batch = {
            "image": torch.stack([s["image"] for s in samples]),
            "caption": [s["caption"] for s in samples],
            "key": [s["key"] for s in samples],
            "time_ids": torch.stack([s["time_ids"] for s in samples]),  # (B, 6): SDXL's
            "counts": counts,
        }
        if self.loss_weights is not None:  # (B,): the loss weight of each sample's source
            batch["loss_weight"] = torch.tensor([s["loss_weight"] for s in samples])
        return batch

    # -- streams --------------------------------------------------------------------------
    def _read(self, urls) -> Iterator[dict]:
        failures = 0
        for url in urls:
            got = False
            for sample in read_shard(url, self.count, self.options.max_member_bytes):
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

    def _shuffled(self, samples: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        buffer = []
        for sample in samples:
            buffer.append(sample)
            if len(buffer) >= self.options.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def _checked(self, raw: Iterator[dict]) -> Iterator[dict]:
        rejected = 0
        for sample in map(self.check, raw):
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

    def stream_groups(self) -> Iterator[list[dict]]:
        """This worker's groups of checked, undecoded samples of a streaming epoch.

        Batch t of a rank's epoch is group t // W of stream t % W (W workers; a stream seeded
        by seed, rank, its number and the epoch alone). The loader asks worker 0 first, so
        after `resume_at` = k batches worker w serves batches k + w + jW: stream (k + w) % W
        from its group (k + w) // W, and the resumed run reads what the first one did."""
        worker, workers = self.worker()
        stream, done = (self.resume_at + worker) % workers, (self.resume_at + worker) // workers
        rng = random.Random(f"{self.seed}/{self.rank * workers + stream}/{self.epoch}")
        samples = self._checked(self._shuffled(self._mixed(rng), rng))
        if self.buckets:
            groups = bucket_batches(samples, self.batch_size, partial=False)
        else:
            groups = _fixed_batches(samples, self.batch_size)
        for i, group in enumerate(itertools.islice(groups, self.batches_per_worker)):
            if i >= done:
                yield group
            elif i == done - 1:
                self.counts = new_counts()  # counted before the resume already

    def indexed_groups(self) -> Iterator[list[dict]]:
        """This worker's share of the dealt global batches (`dealt_batches`), read by offset."""
        worker, workers = self.worker()
        batches = dealt_batches(
            len(self.index),
            self.epoch,
            self.seed,
            self.batch_size,
            self.world_size,
            shuffle=self.mode == "exact",
            drop_remainder=self.options.drop_remainder and self.mode == "exact",
        )
        if worker == 0 and self.rank == 0 and self.index_counts:  # the index pass's rejections
            add_counts(self.counts, self.index_counts)
        for t in worker_batches(len(batches), worker, workers, self.resume_at):
            part = rank_part(batches[t], self.rank, self.world_size)
            yield [s for s in (self.check(read_sample(**self.index[i])) for i in part) if s]

    def __iter__(self) -> Iterator[dict]:
        groups = self.stream_groups() if self.mode == "stream" else self.indexed_groups()
        last = None
        for group in groups:
            samples = [s for s in map(self.decode, group) if s is not None]
            if samples:
                last = samples
            elif last is None:
                raise DataError(
                    "every image of this reader's first batch failed to decode; nothing "
                    "to pad it with (see the bad_image warnings)"
                )
            else:
                log.warning("a batch lost every image: repeating the previous one")
            yield self.collate(samples or last)


def _fixed_batches(samples: Iterator[dict], batch_size: int) -> Iterator[list[dict]]:
    while batch := list(itertools.islice(samples, batch_size)):
        if len(batch) == batch_size:
            yield batch


def build_index(
    urls: list[str],
    rejection: Callable[[dict], str | None],
    max_member_bytes: int = MAX_MEMBER_BYTES,
) -> tuple[list[dict], dict[str, int]]:
    """{url, key, offsets} of every sample that passes the checks short of decoding (a reader's
    `rejection`), and the counts of those that do not: what an exact epoch or a validation
    deals out. One read of every shard (uncompressed tars: samples are then read by offset)."""
    index, counts = [], new_counts()

    def count(reason: str) -> None:
        counts[f"rejected/{reason}"] = counts.get(f"rejected/{reason}", 0) + 1

    for url in urls:
        if url.endswith((".gz", ".tgz", ".xz", ".bz2", ".zst")):
            raise DataError(f"{url}: exact epochs and validation read uncompressed tars only")
        for sample in read_shard(url, count, max_member_bytes):
            reason = rejection(sample)
            if reason in BROKEN:
                log.warning("skipping %s (%s): %s", sample["__key__"], url, reason)
            if reason is None:
                index.append(
                    {"url": url, "key": sample["__key__"], "offsets": sample["__offsets__"]}
                )
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
    options: DataOptions,
    batch_size: int,
    train: bool,
    batches_per_epoch: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    num_workers: int = 1,
) -> ImageTextStream:
    """The batch stream over `urls` (a shard list, patterns, or `{urls, weight}` sources).

    Training streams (`batches_per_epoch` batches per worker) or reads exact epochs
    (`options.mode`); validation (`train=False`) reads each sample once, in order.
    `rank`/`world_size` default to torch.distributed's, else the RANK/WORLD_SIZE environment
    variables; `num_workers` (the loader's) only sizes the warning about fewer shards than
    readers. Images over the options' limits (by their header) and tar members over their
    `max_member_bytes` are skipped and counted, never decoded or read.
    """
    sources, weights = parse_sources(urls)
    options = options if train else replace(options, mode="once")
    ds = ImageTextStream(
        sources,
        weights,
        batch_size,
        options,
        batches_per_worker=batches_per_epoch,
        rank=rank,
        world_size=world_size,
        loss_weights=loss_weights(urls) if train else None,
    )
    if options.mode != "stream":
        ds.index, ds.index_counts = build_index(
            [u for s in sources for u in s], ds.rejection, options.max_member_bytes
        )
    n_shards, readers = sum(map(len, sources)), ds.world_size * max(1, num_workers)
    if options.mode == "stream" and n_shards < readers:
        log.warning(
            "%d shards for %d ranks x %d workers: readers share shards (each in its own order)",
            n_shards,
            ds.world_size,
            max(1, num_workers),
        )
    return ds


class EpochLoader(DataLoader):
    """A DataLoader whose passes are the dataset's epochs, placed by `batches_done()`: the
    batches this rank has trained in the run (Lightning's count, which a resumed run restores).
    Epoch e is the batches e * B ... (e + 1) * B - 1 (B = `dataset.batches_per_epoch()`), so a
    pass started after n batches reads epoch n // B from its batch n % B: a run resumed from
    any checkpoint reads exactly what the uninterrupted run read next, whatever Lightning's own
    epoch counter says. Without `batches_done` each pass is the next epoch, from its start.
    Workers start anew each pass, with the epoch (so an exact epoch reshuffles)."""

    def __init__(
        self, dataset, num_workers: int, batches_done: Callable[[], int] | None = None
    ) -> None:
        super().__init__(dataset, batch_size=None, num_workers=num_workers)
        self.batches_done, self.passes = batches_done, 0

    def __iter__(self):
        if self.batches_done is None:
            epoch, skip = self.passes, 0
        else:
            per_epoch = self.dataset.batches_per_epoch(max(1, self.num_workers))
            epoch, skip = divmod(self.batches_done(), per_epoch)
        self.dataset.set_epoch(epoch, skip)
        self.passes += 1
        return super().__iter__()
