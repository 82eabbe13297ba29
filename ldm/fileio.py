"""Files written so that a reader never sees half of one, and the one shard writer."""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import os
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path


def temporary_path(path: str | os.PathLike) -> Path:
    """A hidden name beside `path` (same folder, so the final rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path` in one rename, on any
    error it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden empty folder beside `path` to fill; on success it takes `path`'s place
    (`replace_folder`), on any error it is removed and `path` is left as it was: a reader finds
    the old folder or the whole new one, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a write cut short
    tmp.mkdir()
    try:
        yield tmp
        replace_folder(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system or
    file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_folder(new: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Put the complete folder `new` (a sibling of `path`) at `path`, replacing a folder there,
    which is then removed. A reader sees the old folder or the new one, never a mix: the two
    are swapped in one step where the system can (Linux), else the old one is renamed aside
    first (a reader looking in between finds no folder)."""
    new, path = Path(new), Path(path)
    aside = path.with_name(f".{path.name}.old")
    shutil.rmtree(aside, ignore_errors=True)  # left by a replacement killed midway
    if not path.exists():
        os.replace(new, path)
    elif _exchange(new, path):
        shutil.rmtree(new)  # now the old folder
    else:
        os.replace(path, aside)
        os.replace(new, path)
        shutil.rmtree(aside, ignore_errors=True)
    return path


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """One regular file in a tar, with a fixed date and mode: shards are byte-reproducible."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def shard_name(index: int) -> str:
    """`00000.tar`: img2dataset's shard names (its `00000_stats.json` beside)."""
    return f"{index:05d}.tar"


def shard_stats(tried: int, written: int) -> dict:
    """img2dataset's `NNNNN_stats.json`: samples tried, written, and the rest as unreadable."""
    return {
        "count": tried,
        "successes": written,
        "failed_to_download": 0,
        "failed_to_resize": tried - written,
        "status_dict": {
            "success": written,
            **({"unreadable": tried - written} if tried > written else {}),
        },
    }


class ShardWriter:
    """Samples into `folder/NNNNN.tar` shards, numbered from `first`, as webdataset's TarWriter
    lays them out (members `KEY.ext`, a sample's extensions sorted) with fixed dates and modes:
    the same samples give the same bytes. Each shard is written under a hidden name and renamed
    into place once closed, so a reader never sees half of one; on an error (leaving a `with`
    block) the open one is removed. A new shard begins every `shard_size` samples (None: one
    shard, until `close`). With `stats`, img2dataset's `NNNNN_stats.json` is written beside
    each shard (`skip` counts a sample that could not be written); with `keep_empty`, `close`
    writes a shard even when no sample came (one shard per source, an empty source too)."""

    def __init__(
        self,
        folder: str | os.PathLike,
        shard_size: int | None = None,
        first: int = 0,
        stats: bool = False,
        keep_empty: bool = False,
    ) -> None:
        self.folder, self.shard_size, self.index = Path(folder), shard_size, first
        self.stats, self.keep_empty = stats, keep_empty
        self.key_digits = max(4, len(str(shard_size - 1))) if shard_size else 4
        self.n, self.tried, self.written, self.shards = 0, 0, 0, []
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None

    def next_key(self) -> str:
        """img2dataset's key for the next sample: the shard's number, then the sample's."""
        return f"{self.index:05d}{self.n:0{self.key_digits}d}"

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """One sample: `members` maps extensions (`png`, `mean.npy`, ...) to bytes."""
        tar = self._open()
        for ext in sorted(members):
            _add_member(tar, f"{key}.{ext}", members[ext])
        self.n, self.tried = self.n + 1, self.tried + 1
        if self.n == self.shard_size:
            self._finish()

    def skip(self) -> None:
        """A sample that could not be written: counted in the next shard's stats."""
        self.tried += 1

    def close(self) -> None:
        """Finish the open shard (renamed into place); nothing when none is open."""
        if self.keep_empty and self._tar is None and not self.shards:
            self._open()
        if self._tar is not None:
            self._finish()

    def abort(self) -> None:
        """Drop the open shard; those already closed stay."""
        if self._tar is not None:
            self._tar.close()
            self._tmp.unlink(missing_ok=True)
            self._tar = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    def _open(self) -> tarfile.TarFile:
        if self._tar is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._tmp = temporary_path(self.folder / shard_name(self.index))
            self._tar = tarfile.open(self._tmp, "w", format=tarfile.PAX_FORMAT)
        return self._tar

    def _finish(self) -> None:
        self._tar.close()
        name = shard_name(self.index)
        os.replace(self._tmp, self.folder / name)
        if self.stats:
            stats = json.dumps(shard_stats(self.tried, self.n), indent=4) + "\n"
            write_text(self.folder / f"{self.index:05d}_stats.json", stats)
        self.shards.append(name)
        self.written += self.n
        self.index, self.n, self.tried, self._tar = self.index + 1, 0, 0, None
