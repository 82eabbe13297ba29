"""Turn a folder of images with captions into WebDataset shards (img2dataset layout).

    python data/folder/prepare.py IN_DIR OUT_DIR [--shard-size N] [--caption-column text]
        [--image-format keep|jpg|png|webp] [--quality 95] [--quiet]

Captions: metadata.jsonl / metadata.csv (`file_name` + caption column), else a sidecar .txt,
else the file name. See ldm.data.folder and data/folder/README.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ldm.config import exit_on
from ldm.data.folder import FORMATS, FolderError, write_folder_shards


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("in_dir", type=Path, help="folder of images (searched recursively)")
    parser.add_argument("out_dir", type=Path, help="where NNNNN.tar shards are written")
    parser.add_argument("--shard-size", type=int, default=10000, help="images per tar")
    parser.add_argument(
        "--caption-column", default="text", help="caption column of metadata.jsonl/.csv"
    )
    parser.add_argument(
        "--image-format",
        choices=FORMATS,
        default="keep",
        help="keep the original bytes, or re-encode to this format (RGB)",
    )
    parser.add_argument("--quality", type=int, default=95, help="jpg/webp quality when re-encoding")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


@exit_on(FolderError)
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = write_folder_shards(
        args.in_dir,
        args.out_dir,
        args.shard_size,
        args.caption_column,
        args.image_format,
        args.quality,
        progress=not args.quiet,
    )
    src = ", ".join(f"{k} {v}" for k, v in info["caption_from"].items())
    print(
        f"wrote {info['written']} of {info['found']} images to {len(info['shards'])} shard(s) in "
        f"{args.out_dir}; skipped {info['skipped_unreadable']} unreadable; captions from: {src}"
    )
    for name in info["unreadable_files"][:20]:
        print(f"  unreadable: {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
