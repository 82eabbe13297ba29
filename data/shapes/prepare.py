"""Render the shapes dataset into WebDataset shards (img2dataset layout).

    python data/shapes/prepare.py --out data/shapes/shards --n-train 20000 --n-val 512

Writes ``OUT/train/NNNNN.tar`` and ``OUT/val/NNNNN.tar`` plus ``_info.json``;
see ``ldm.shapes.dataset.write_shards``.  Output is byte-for-byte deterministic
for a given seed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ldm.shapes.dataset import N_TRAIN, N_VAL, SHARD_SIZE, SIZE, shards_ready, write_shards

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "data" / "shapes" / "shards"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--n-train", type=int, default=N_TRAIN, help="training images")
    parser.add_argument("--n-val", type=int, default=N_VAL, help="validation images")
    parser.add_argument("--size", type=int, default=SIZE, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=SHARD_SIZE, help="images per tar")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    parser.add_argument("--force", action="store_true", help="rewrite even if the shards are ready")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.force and shards_ready(args.out, args.n_train, args.n_val, args.size, args.seed):
        print(f"shards already ready in {args.out}")
        return 0
    start = time.perf_counter()
    out = write_shards(
        args.out,
        n_train=args.n_train,
        n_val=args.n_val,
        size=args.size,
        seed=args.seed,
        shard_size=args.shard_size,
        progress=not args.quiet,
        workers=args.workers,
    )
    seconds = time.perf_counter() - start
    total = args.n_train + args.n_val
    print(f"wrote {total} images to {out} in {seconds:.1f} s ({total / seconds:.0f} img/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
