"""Files written so that a reader never sees half of one, and tar members written one way."""

from __future__ import annotations

import contextlib
import ctypes
import io
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


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """One regular file in a tar, with a fixed date and mode: shards are byte-reproducible."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))
