"""The shapes dataset on disk: WebDataset shards in the img2dataset layout.

``write_shards`` renders the train and val splits (``ldm.shapes.render``) into
``OUT/{train,val}/NNNNN.tar`` plus ``_info.json``, byte-for-byte the same for the same
arguments whatever the number of processes; ``shards_ready`` tells whether a finished set
with given settings is there, and ``ensure_shards`` (the data module's prepare step) writes
one unless it is.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import shutil
import tempfile
from pathlib import Path

from PIL import Image

from ldm.data.shards import INFO_FILE
from ldm.fileio import ShardWriter, shard_name
from ldm.shapes.render import SPLITS, caption, render_sample, sample_rng

# Bump whenever rendering or the shard layout changes, so that shards_ready()
# rejects shards written by an older version.
FORMAT_VERSION = 1
# The embedded set's size: write_shards' and ensure_shards' defaults, data/shapes/prepare.py's
# and configs/data/shapes.yaml's (tests/shapes/test_dataset.py holds them equal).
N_TRAIN, N_VAL, SIZE, SHARD_SIZE = 20000, 512, 64, 2000
_MAX_PER_SHARD = 10_000  # keys have 4 digits for the index within a shard


def _sample_record(key: str, meta: dict, size: int) -> dict:
    """The per-sample JSON, with img2dataset's fields plus the render parameters."""
    return {
        "key": key,
        "caption": (
            caption(meta["shape_colour"], meta["shape"], meta["background"])
            if isinstance(meta["background"], str)
            else f"a {meta['shape']}"  # colours outside the palette have no names
        ),
        "status": "success",
        "error_message": None,
        "width": size,
        "height": size,
        "original_width": size,
        "original_height": size,
        "shape": meta["shape"],
        "shape_colour": meta["shape_colour"],
        "background": meta["background"],
        "centre": list(meta["centre"]),
        "size_px": meta["size_px"],
        "angle": meta["angle"],
    }


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_shard(job: tuple[str, str, int, int, int, int, int]) -> int:
    """Render samples ``[start, start + count)`` of a split into one tar shard.

    Written by `ldm.fileio.ShardWriter` (webdataset's TarWriter layout with the
    stdlib, which keeps worker processes free of the torch that importing
    webdataset would load).  Takes one tuple so that it can be mapped over a
    process pool.
    """
    split_dir, split, shard_index, start, count, size, seed, colours = job
    with ShardWriter(split_dir, first=shard_index, stats=True) as writer:
        for offset in range(count):
            image, meta = render_sample(sample_rng(seed, split, start + offset), size, colours)
            key = writer.next_key()
            record = _sample_record(key, meta, size)
            members = {"json": json.dumps(record).encode(), "png": _png_bytes(image)}
            writer.write(key, {**members, "txt": record["caption"].encode()})
    return count


def _shard_jobs(
    root: Path, counts: dict[str, int], size: int, seed: int, shard_size: int, colours: str
) -> list:
    jobs = []
    for split, n in counts.items():
        split_dir = root / split
        split_dir.mkdir(parents=True)
        for shard_index, start in enumerate(range(0, n, shard_size)):
            count = min(shard_size, n - start)
            jobs.append((str(split_dir), split, shard_index, start, count, size, seed, colours))
    return jobs


def _run_jobs(jobs: list, workers: int, progress: bool, total: int) -> None:
    from tqdm import tqdm

    with tqdm(total=total, unit="img", desc="shapes", disable=not progress) as bar:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                bar.update(_write_shard(job))
            return
        # Spawn rather than fork: the caller may hold threads or a CUDA context.
        context = multiprocessing.get_context("spawn")
        with context.Pool(workers) as pool:
            for done in pool.imap_unordered(_write_shard, jobs):
                bar.update(done)


def _info(n_train: int, n_val: int, size: int, seed: int, shard_size: int, jobs: list) -> dict:
    splits: dict[str, list[str]] = {split: [] for split in SPLITS}
    for _, split, shard_index, *_ in jobs:
        splits[split].append(shard_name(shard_index))
    return {
        "dataset": "shapes",
        "format_version": FORMAT_VERSION,
        "n_train": n_train,
        "n_val": n_val,
        "size": size,
        "seed": seed,
        "shard_size": shard_size,
        "shards": splits,
    }


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Replace ``out`` by the finished ``tmp`` directory, never leaving a partial set."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_shards(
    out_dir: str | os.PathLike,
    n_train: int = N_TRAIN,
    n_val: int = N_VAL,
    size: int = SIZE,
    seed: int = 0,
    shard_size: int = SHARD_SIZE,
    progress: bool = True,
    workers: int | None = None,
    colours: str = "palette",
) -> Path:
    """Render the train and val splits into ``out_dir/{train,val}/NNNNN.tar``.

    Output bytes depend only on the arguments other than ``progress`` and
    ``workers`` (default: one process per CPU core).  Everything is written to
    a temporary sibling directory that replaces ``out_dir`` only once complete,
    with ``_info.json`` written last; see :func:`shards_ready`.
    """
    if not 1 <= shard_size <= _MAX_PER_SHARD:
        raise ValueError(f"shard_size must be in [1, {_MAX_PER_SHARD}], got {shard_size}")
    if n_train < 0 or n_val < 0:
        raise ValueError("n_train and n_val must be non-negative")
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the final directory should not be
    try:
        counts = {"train": n_train, "val": n_val}
        jobs = _shard_jobs(tmp, counts, size, seed, shard_size, colours)
        _run_jobs(jobs, workers or os.cpu_count() or 1, progress, n_train + n_val)
        info = _info(n_train, n_val, size, seed, shard_size, jobs)
        if colours != "palette":  # palette sets keep the format they always had
            info["colours"] = colours
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        try:
            _swap_into_place(tmp, out)
        except OSError:
            # Another process may have finished the same set first.
            if not shards_ready(out, n_train, n_val, size, seed, colours):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def shards_ready(
    out_dir: str | os.PathLike,
    n_train: int,
    n_val: int,
    size: int,
    seed: int,
    colours: str = "palette",
) -> bool:
    """Whether ``out_dir`` holds a complete shard set written with these settings."""
    out = Path(out_dir)
    try:
        info = json.loads((out / INFO_FILE).read_text())
    except (OSError, ValueError):
        return False
    expected = {
        "format_version": FORMAT_VERSION,
        "n_train": n_train,
        "n_val": n_val,
        "size": size,
        "seed": seed,
    }
    if any(info.get(name) != value for name, value in expected.items()):
        return False
    if info.get("colours", "palette") != colours:
        return False
    shards = info.get("shards", {})
    return all((out / split / name).is_file() for split in SPLITS for name in shards.get(split, []))


def shard_paths(out_dir: str | os.PathLike, split: str) -> list[Path]:
    """The tar files of one split of a finished shard set, in order."""
    out = Path(out_dir)
    info = json.loads((out / INFO_FILE).read_text())
    return [out / split / name for name in info["shards"][split]]


def ensure_shards(
    out_dir: str | os.PathLike,
    n_train: int = N_TRAIN,
    n_val: int = N_VAL,
    size: int = SIZE,
    seed: int = 0,
    shard_size: int = SHARD_SIZE,
    colours: str = "palette",
) -> Path:
    """Render the shard set unless an identical one is already there (the data module's
    `prepare` step, so `python train.py` works on a fresh checkout)."""
    if not shards_ready(out_dir, n_train, n_val, size, seed, colours):
        write_shards(out_dir, n_train, n_val, size, seed, shard_size, colours=colours)
    return Path(out_dir)
