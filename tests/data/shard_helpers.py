"""Shards written by the tests, in img2dataset's layout, with every kind of broken input."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def sample(
    key: str,
    size=(80, 64),
    colour=(200, 10, 10),
    mode="RGB",
    fmt="PNG",
    caption: str | None = None,
    **meta,
) -> tuple[str, dict[str, bytes]]:
    """One img2dataset sample: KEY.<fmt>, KEY.txt, KEY.json with `meta` fields."""
    if mode == "I;16":
        image = Image.fromarray(np.full(size[::-1], 40000, dtype=np.uint16))
    else:
        image = Image.new("RGB", size, colour).convert(mode)
    ext = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}[fmt]
    meta = {"key": key, "width": size[0], "height": size[1], **meta}
    return key, {
        ext: image_bytes(image, fmt),
        "txt": (caption or f"caption {key}").encode(),
        "json": json.dumps(meta).encode(),
    }


def write_keyed_shards(root: Path, sizes: list[int], prefix: str = "") -> list[str]:
    """Shards of the given sample counts, keys `<shard><index>`; returns every key."""
    keys = []
    for s, n in enumerate(sizes):
        samples = [sample(f"{prefix}{s:05d}{i:04d}", size=(24, 20)) for i in range(n)]
        write_shard(root / f"{prefix}{s:05d}.tar", samples)
        keys += [k for k, _ in samples]
    return keys


def write_sparse_shard(path: Path, samples: list[tuple[str, dict[str, bytes | int]]]) -> Path:
    """A shard whose members given as a size (an int) are that many zero bytes left as a hole
    of a sparse file: a 1 GiB member costs a header on disk, and nothing to write."""
    with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                if isinstance(data, bytes):
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                    continue
                info.size = data
                tar.fileobj.write(info.tobuf(tar.format, tar.encoding, tar.errors))
                padded = -(-data // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                f.seek(padded, io.SEEK_CUR)  # the hole: written as nothing
                tar.offset += tarfile.BLOCKSIZE + padded
    return path


def png_strip(width: int = 1, height: int = 32000) -> bytes:
    """A tiny PNG file of a huge, thin image (a few hundred bytes)."""
    return image_bytes(Image.new("L", (width, height)))


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height grey pixels and holds none: PIL opens it (the header is
    all `Image.open` reads), decoding it fails. A huge image for the price of 57 bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")
