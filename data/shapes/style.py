"""Render the pastel style set: a folder of PNGs with .txt captions, as a user's style folder.

    python data/shapes/style.py OUT_DIR [--n 200] [--seed 0]

Then `python data/folder/prepare.py OUT_DIR SHARDS_DIR` makes its shards (see ldm/shapes/pastel.py
for the style: every colour channel c becomes round((c + 255) / 2), captions end in
", pastel style").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ldm.shapes.pastel import write_style_folder


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--n", type=int, default=200, help="images")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    captions = write_style_folder(args.out_dir, args.n, args.seed)
    print(f"wrote {len(captions)} pastel images with captions to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
