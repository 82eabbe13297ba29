"""Shard lists, shard reading that survives broken files, and the exact-epoch assignment.

A shard source is a pattern (brace pattern, glob, local path, fsspec URL such as `s3://b/{0..9}.tar`
or `gs://b/*.tar`, `http(s)://...`, or `pipe:<command>`), a list of them, or a list of
`{urls: ..., weight: ...}` sources mixed by weight.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import random
import tarfile
from pathlib import Path
from typing import Callable, Iterator

from braceexpand import braceexpand

log = logging.getLogger(__name__)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
INFO_FILE = "_info.json"  # written last into a shard folder by the tools that make one
# A tar member is read whole into memory, so its size is checked from its header first. 64 MiB
# is far above any sample image (LAION's are under 1 MiB; a JPEG at the 67 Mpx pixel limit of
# `ldm.data.transforms` is 10-30 MiB) and bounds what one member, read, can cost.
MAX_MEMBER_BYTES = 64 << 20


class DataError(RuntimeError):
    """Shards that cannot be found or read; the message says what to fix."""


def _glob_remote(url: str) -> list[str]:
    import fsspec  # only for remote globs; local paths and plain URLs need nothing

    fs, _, paths = fsspec.get_fs_token_paths(url)
    return sorted(fs.unstrip_protocol(p) for p in paths)


def expand_shards(pattern) -> list[str]:
    """Brace-expand pattern(s) (mixing sources are flattened); local paths must exist; remote
    globs are listed through fsspec; plain URLs and `pipe:` are passed through."""
    if isinstance(pattern, (str, dict)) or hasattr(pattern, "keys"):
        pattern = [pattern]
    patterns = [p for item in pattern for p in _source_patterns(item)]
    expanded = []
    for url in (u for p in patterns for u in braceexpand(p)):
        wild = any(c in url for c in "*?[")
        if url.startswith("pipe:"):
            expanded.append(url)
        elif "://" in url:
            expanded += _glob_remote(url) if wild else [url]
        else:
            expanded += sorted(glob.glob(url)) if wild else ([url] if Path(url).is_file() else [])
    if not expanded:
        raise DataError(
            f"shard pattern {patterns} matches no file; check the path, or "
            f"build shards first (e.g. python data/folder/prepare.py)"
        )
    return expanded


def _source_patterns(item) -> list[str]:
    if isinstance(item, str):
        return [item]
    urls = item["urls"] if hasattr(item, "keys") else item
    return [urls] if isinstance(urls, str) else list(urls)


def loss_weights(spec) -> list[float] | None:
    """Each source's `loss_weight` (default 1), or None when no source sets one: the
    prior-preservation weight of a DreamBooth class-image source, say."""
    items = [spec] if isinstance(spec, str) or hasattr(spec, "keys") else list(spec)
    given = [float(i["loss_weight"]) for i in items if hasattr(i, "keys") and "loss_weight" in i]
    if not given:
        return None
    return [float(i.get("loss_weight", 1.0)) if hasattr(i, "keys") else 1.0 for i in items]


def parse_sources(spec) -> tuple[list[list[str]], list[float]]:
    """Shard lists and mixing weights (normalised). A pattern or a list of patterns is one
    source; a list of `{urls, weight}` entries is one source per entry."""
    items = [spec] if isinstance(spec, str) or hasattr(spec, "keys") else list(spec)
    if not any(hasattr(i, "keys") for i in items):
        return [expand_shards(list(items))], [1.0]
    sources = [expand_shards(i) for i in items]
    weights = [float(i.get("weight", 1.0)) if hasattr(i, "keys") else 1.0 for i in items]
    if min(weights) < 0 or sum(weights) <= 0:
        raise DataError(f"mixing weights {weights} must be >= 0 with a positive sum")
    return sources, [w / sum(weights) for w in weights]


def open_shard(url: str):
    """A readable binary stream: local file, `pipe:` and http(s) through webdataset's gopen
    (curl), other URLs (s3://, gs://, ...) through fsspec (install s3fs/gcsfs for those)."""
    if url.startswith(("pipe:", "http://", "https://")):
        import webdataset as wds

        return wds.gopen(url, "rb")
    if "://" in url and not url.startswith("file://"):
        import fsspec

        return fsspec.open(url, "rb").open()
    return open(url.removeprefix("file://"), "rb")


def split_key(name: str) -> tuple[str, str]:
    """`dir/000001.jpg` -> (`dir/000001`, `jpg`): webdataset's rule (key = up to the basename's
    first dot), extension lower-cased so `.JPG` is an image too."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


class _StrictHeader(tarfile.TarInfo):
    """tarfile ends a stream quietly at a short header; a tar cut there is truncated, not done
    (a whole tar ends with a full block of zeros, which still ends it quietly)."""

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        if len(buf) != tarfile.BLOCKSIZE:
            raise tarfile.ReadError(f"tar ends inside a header ({len(buf)} bytes)")
        return super().frombuf(buf, encoding, errors)


def _open_tar(stream, url: str) -> tarfile.TarFile:
    """A local file is read with seeks (a member skipped unread costs nothing: a sparse 10 KB
    tar may claim a 1 GiB member); a remote or piped stream can only be read past, in blocks."""
    local = "://" not in url and not url.startswith("pipe:") or url.startswith("file://")
    mode = "r:*" if local and stream.seekable() else "r|*"
    return tarfile.open(fileobj=stream, mode=mode, tarinfo=_StrictHeader)


def read_shard(
    url: str, count: Callable[[str], None], max_member_bytes: int = MAX_MEMBER_BYTES
) -> Iterator[dict]:
    """Samples {'__key__', '__url__', ext: bytes, ...} of one tar; never raises. An unreadable
    shard counts `shard_unreadable`, a truncated one `shard_truncated` after its whole samples.
    A member over `max_member_bytes` (by its header) is never read: its sample is skipped and
    counted `member_too_large`."""
    sample, n = None, 0
    try:
        with open_shard(url) as stream, _open_tar(stream, url) as tar:
            while (member := tar.next()) is not None:
                tar.members.clear()  # tarfile keeps every header it read: memory per member
                if not member.isfile():
                    continue
                key, ext = split_key(member.name)
                if sample is not None and sample["__key__"] != key:
                    yield from _whole(sample, count)
                    sample, n = None, n + 1
                if sample is None:
                    sample = {"__key__": key, "__url__": url}
                if member.size > max_member_bytes:
                    sample["__rejected__"] = f"{ext} of {member.size} bytes"
                if "__rejected__" in sample:
                    continue  # the next header is found by seeking past these bytes
                data = tar.extractfile(member).read()
                sample.setdefault("__offsets__", {})[ext] = (member.offset_data, member.size)
                if len(data) != member.size:  # a stream read past the end comes back short
                    raise tarfile.ReadError(f"{member.name}: {len(data)} of {member.size} bytes")
                sample[ext] = data
    except Exception as e:  # a broken shard must not end a long run: skip it, count it, say why
        reason = "shard_truncated" if (n or sample) else "shard_unreadable"
        log.warning("%s %s after %d samples: %s: %s", reason, url, n, type(e).__name__, e)
        count(reason)
        return  # the sample being read when the tar broke may be incomplete: dropped
    if sample is not None:
        yield from _whole(sample, count)


def _whole(sample: dict, count: Callable[[str], None]) -> Iterator[dict]:
    """The sample, unless one of its members was too large to read (then counted)."""
    if "__rejected__" in sample:
        log.warning(
            "skipping %s (%s): member_too_large: %s",
            sample["__key__"],
            sample["__url__"],
            sample["__rejected__"],
        )
        count("member_too_large")
    else:
        yield sample


_local_copies: dict[str, str] = {}


def local_path(url: str) -> str:
    """A local file with the shard's bytes: the path itself, or (remote and `pipe:` shards) a
    copy fetched once per process into a temporary folder, so samples can be read by offset."""
    if "://" not in url and not url.startswith("pipe:") or url.startswith("file://"):
        return url.removeprefix("file://")
    if url not in _local_copies:
        import atexit
        import shutil
        import tempfile

        folder = tempfile.mkdtemp(prefix="ldm-shard-")
        atexit.register(shutil.rmtree, folder, True)
        path = str(Path(folder) / "shard.tar")
        with open_shard(url) as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)
        _local_copies[url] = path
    return _local_copies[url]


def read_sample(url: str, key: str, offsets: dict[str, tuple[int, int]]) -> dict:
    """One sample by the member offsets `read_shard` recorded (uncompressed tars)."""
    sample = {"__key__": key, "__url__": url}
    with open(local_path(url), "rb") as f:
        for ext, (offset, size) in offsets.items():
            f.seek(offset)
            sample[ext] = f.read(size)
            if len(sample[ext]) != size:
                raise DataError(f"{url}: {key}.{ext} is cut short; was the shard rewritten?")
    return sample


def _stats_successes(path: Path) -> int | None:
    """`successes` of an img2dataset stats file, or None when it is not a sane count."""
    try:
        value = (
            json.loads(path.read_text()).get("successes", 0)
            if path.stat().st_size < 1 << 20
            else None
        )
        value = int(value)
    except (ValueError, TypeError, AttributeError, RecursionError, OverflowError):
        return None
    return value if 0 <= value < 1 << 40 else None


def read_stats_count(urls: list[str]) -> int | None:
    """Successful samples according to img2dataset's `NNNNN_stats.json` (else `.parquet`)
    beside each local shard; None unless every shard has one. Never required."""
    total = 0
    for url in urls:
        stats, parquet = Path(url[:-4] + "_stats.json"), Path(url[:-4] + ".parquet")
        if "://" in url or url.startswith("pipe:") or not url.endswith(".tar"):
            return None
        if stats.is_file():
            count = _stats_successes(stats)
            if count is None:  # a stats file of another shape: the count is only a hint
                log.warning("%s: no usable 'successes' count; epoch size left unknown", stats)
                return None
            total += count
        elif parquet.is_file():
            try:
                import pyarrow.parquet as pq
            except ImportError:
                return None
            status = pq.read_table(parquet, columns=["status"]).column("status").to_pylist()
            total += sum(s == "success" for s in status)
        else:
            return None
    return total


def resampled(urls: list[str], rng: random.Random) -> Iterator[str]:
    """Shards drawn with replacement, forever: the stream of a streaming epoch."""
    while True:
        yield urls[rng.randrange(len(urls))]


def dealt_batches(
    n: int,
    epoch: int,
    seed: int,
    batch_size: int,
    world_size: int,
    shuffle: bool = True,
    drop_remainder: bool = False,
) -> list[list[int]]:
    """One epoch of global batches: indices into a fixed sample list, `batch_size * world_size`
    per batch, rank r's part of each batch the r-th contiguous slice (`rank_part`).

    The order is a per-epoch seeded permutation (`shuffle`) or the list's own. The sample list is
    padded by repeating its first samples to a multiple of `world_size` (every rank gets the same
    number of equal-sized batches: DDP never waits on a rank), or cut to whole global batches
    (`drop_remainder`). A global batch holds the same samples whatever the number of ranks that
    share it, so 1 process with batch 8 and 2 with batch 4 train on the same data.
    """
    order = list(range(n))
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    size = batch_size * world_size
    total = n // size * size if drop_remainder else math.ceil(n / world_size) * world_size
    order = (order * (1 + total // max(n, 1)))[:total]
    return [order[i : i + size] for i in range(0, total, size)]


def rank_part(batch: list[int], rank: int, world_size: int) -> list[int]:
    """Rank `rank`'s contiguous share of a global batch (its length divides by world_size)."""
    share = len(batch) // world_size
    return batch[rank * share : (rank + 1) * share]


def worker_batches(n_batches: int, worker: int, workers: int, skip: int = 0) -> range:
    """Which batches of a rank's epoch a dataloader worker makes: the DataLoader collects them
    round-robin from worker 0, so with the first `skip` already trained (a resumed run),
    worker w makes batches skip + w, skip + w + workers, ..."""
    return range(skip + worker, n_batches, workers)
