"""An image folder with captions -> WebDataset shards in img2dataset's layout.

Captions come from, in this order of precedence for each image:

1. a `metadata.jsonl` or `metadata.csv` as in Hugging Face `imagefolder`: a `file_name` column
   (relative to the metadata file's directory) and a caption column (`text` by default); the
   other columns are kept in the sample's JSON, like img2dataset's `save_additional_columns`;
2. a sidecar text file beside the image (`cat.jpg` + `cat.txt`);
3. the file name (`a_red_cat.jpg` -> "a red cat").

Each sample is `KEY.<ext>` (the original bytes, or re-encoded), `KEY.txt` and `KEY.json` (key,
caption, width, height, original_width, original_height, status, file_name, extra columns), with
`NNNNN_stats.json` beside each `NNNNN.tar` and `_info.json` with the totals. Shards are written to
a temporary name and renamed when complete; the output depends only on the folder and options.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ldm.data.images import ImageLimits, ImageRejected, open_image
from ldm.data.shards import IMAGE_EXTS, INFO_FILE, MAX_MEMBER_BYTES
from ldm.fileio import ShardWriter, write_text

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
FORMATS = ("keep", "jpg", "png", "webp")
_PIL_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


class FolderError(ValueError):
    """An input folder or option that cannot produce shards; the message says what to fix."""


@dataclass
class Counts:
    found: int = 0
    written: int = 0
    unreadable: list[str] = field(default_factory=list)
    rejected: dict[str, list[str]] = field(default_factory=dict)  # reason -> files
    caption_from: dict[str, int] = field(
        default_factory=lambda: {"metadata": 0, "txt": 0, "filename": 0}
    )
    shards: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "found": self.found,
            "written": self.written,
            "skipped_unreadable": len(self.unreadable),
            "unreadable_files": self.unreadable,
            "skipped_rejected": {reason: len(files) for reason, files in self.rejected.items()},
            "rejected_files": self.rejected,
            "caption_from": self.caption_from,
            "shards": self.shards,
        }


def find_images(root: Path) -> list[Path]:
    """Every image under `root`, recursively, in a stable (sorted) order."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower().lstrip(".") in IMAGE_EXTS
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def _metadata_rows(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        lines = path.read_text(encoding="utf-8").splitlines()
        try:
            return [json.loads(line) for line in lines if line.strip()]
        except (json.JSONDecodeError, RecursionError) as e:  # "[" * 100000 is the latter
            raise FolderError(f"{path}: not valid JSON lines ({type(e).__name__}: {e})") from e
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def read_metadata(root: Path, caption_column: str) -> dict[Path, dict]:
    """{image path: its metadata row} from every metadata.jsonl/.csv under `root`."""
    rows: dict[Path, dict] = {}
    for name in METADATA_FILES:
        for meta in sorted(root.rglob(name)):
            for row in _metadata_rows(meta):
                if "file_name" not in row:
                    raise FolderError(
                        f"{meta}: a row has no 'file_name' column (columns: {sorted(row)})"
                    )
                if caption_column not in row:
                    raise FolderError(
                        f"{meta}: no caption column {caption_column!r} (columns: "
                        f"{sorted(row)}); choose one with --caption-column"
                    )
                rows[(meta.parent / row["file_name"]).resolve()] = row
    return rows


def caption_for(image: Path, rows: dict[Path, dict], caption_column: str) -> tuple[str, str, dict]:
    """(caption, where it came from, extra metadata columns) for one image."""
    row = rows.get(image.resolve())
    if row is not None:
        extra = {k: v for k, v in row.items() if k not in ("file_name", caption_column)}
        return str(row[caption_column] or "").strip(), "metadata", extra
    sidecar = image.with_suffix(".txt")
    if sidecar.is_file():
        return sidecar.read_text(encoding="utf-8", errors="replace").strip(), "txt", {}
    return " ".join(image.stem.replace("_", " ").replace("-", " ").split()), "filename", {}


def load_image(
    path: Path,
    image_format: str,
    quality: int = 95,
    limits: ImageLimits = ImageLimits(),
    max_bytes: int = MAX_MEMBER_BYTES,
) -> tuple[bytes, str, tuple[int, int]]:
    """(bytes to store, extension, (width, height)); raises on an unreadable image, and
    `ImageRejected` on one a training run would refuse unread or undecoded: a file over
    `max_bytes` (the shard reader's member limit), a header over `limits`.

    The image is fully decoded even when its bytes are kept as they are, so a truncated or corrupt
    file is found here rather than in a training run.
    """
    size = path.stat().st_size
    if size > max_bytes:
        raise ImageRejected("member_too_large", f"{size} bytes")
    data = path.read_bytes()
    with open_image(data, limits) as im:
        im.load()
        size = im.size
        if image_format == "keep":
            ext = path.suffix.lower().lstrip(".")
            return data, {"jpeg": "jpg", "tif": "tiff"}.get(ext, ext), size
        from ldm.data.transforms import to_rgb  # lazy: the folder tool itself needs no torch

        rgb = to_rgb(im)
    out = io.BytesIO()
    rgb.save(out, format=_PIL_FORMATS[image_format], quality=quality)
    return out.getvalue(), image_format, size


def _sample(
    image: Path, root: Path, key: str, rows: dict, args: dict, counts: Counts
) -> dict[str, bytes] | None:
    try:
        data, ext, (w, h) = load_image(image, args["image_format"], args["quality"])
    except ImageRejected as e:  # what training would skip: skipped here, with its reason
        counts.rejected.setdefault(e.reason, []).append(str(image.relative_to(root)))
        return None
    except Exception:  # any decoder error: the image is skipped and counted, never fatal
        counts.unreadable.append(str(image.relative_to(root)))
        return None
    caption, source, extra = caption_for(image, rows, args["caption_column"])
    counts.caption_from[source] += 1
    record = {
        "key": key,
        "caption": caption,
        "status": "success",
        "error_message": None,
        "width": w,
        "height": h,
        "original_width": w,
        "original_height": h,
        "file_name": image.relative_to(root).as_posix(),
        **extra,
    }
    return {ext: data, "json": json.dumps(record).encode(), "txt": caption.encode()}


def write_folder_shards(
    in_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    shard_size: int = 10000,
    caption_column: str = "text",
    image_format: str = "keep",
    quality: int = 95,
    progress: bool = True,
) -> dict:
    """Write every image under `in_dir` with its caption into `out_dir/NNNNN.tar`; returns the
    counts (also written to `out_dir/_info.json`). Unreadable images are skipped and counted."""
    root, out = Path(in_dir), Path(out_dir)
    if not root.is_dir():
        raise FolderError(f"input folder {root} does not exist")
    if image_format not in FORMATS:
        raise FolderError(f"image_format must be one of {FORMATS}, got {image_format!r}")
    if shard_size < 1:
        raise FolderError(f"shard_size must be at least 1, got {shard_size}")
    if out.resolve() == root.resolve() or root.resolve() in out.resolve().parents:
        raise FolderError(f"write the shards outside the input folder ({out} is inside {root})")
    if out.is_dir() and any(out.glob("*.tar")):
        raise FolderError(f"{out} already holds shards; remove them or choose another folder")
    images = find_images(root)
    if not images:
        raise FolderError(f"no image ({', '.join(IMAGE_EXTS)}) under {root}")
    out.mkdir(parents=True, exist_ok=True)
    rows = read_metadata(root, caption_column)
    counts = Counts(found=len(images))
    args = {"image_format": image_format, "quality": quality, "caption_column": caption_column}
    from tqdm import tqdm

    with ShardWriter(out, shard_size, stats=True) as writer:
        for image in tqdm(images, unit="img", desc="shards", disable=not progress):
            key = writer.next_key()
            members = _sample(image, root, key, rows, args, counts)
            if members is None:
                writer.skip()  # counted in the shard's stats, as img2dataset does
            else:
                writer.write(key, members)
    counts.shards, counts.written = writer.shards, writer.written
    info = {
        "source": "folder",
        "shard_size": shard_size,
        "image_format": image_format,
        "caption_column": caption_column,
        **counts.as_dict(),
    }
    write_text(out / INFO_FILE, json.dumps(info, indent=2) + "\n")
    return info
