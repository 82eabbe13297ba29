"""Loader throughput, images/s for one reader (one process, one thread), from JPEG shards.

Ours (`make_dataset`: robust tar reading, metadata filters that every sample passes, captions,
resize + centre crop + flip + [-1, 1], batching, counts) against a plain webdataset + PIL loop
doing the same image work (decode, resize of the shorter side, centre crop, tensor, batch).
Ours is timed with and without JPEG draft decoding (decoding at 1/2..1/8 scale in the DCT).

    python bench/loader.py            # writes bench/runs/loader/shards once, then measures
    python bench/loader.py --sizes 256 --repeats 1 --n 500   # quicker

Results: bench/results/loader/throughput.md (the table is rewritten on each full run).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm.data.filters import MetadataFilter
from ldm.data.options import DataOptions
from ldm.data.webdataset import make_dataset

ROOT = Path(__file__).resolve().parents[1]


def random_jpeg(rng: np.random.Generator) -> tuple[bytes, int, int]:
    """A smooth random image plus grain, 300..1100 px a side: photo-like JPEG sizes."""
    w, h = (int(v) for v in rng.integers(300, 1100, size=2))
    base = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize(
        (w, h), Image.BICUBIC
    )
    arr = np.asarray(base, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue(), w, h


def write_shards(out: Path, n: int, per_shard: int = 250, seed: int = 0) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    urls = [str(out / f"{s:05d}.tar") for s in range((n + per_shard - 1) // per_shard)]
    if all(Path(u).is_file() for u in urls):
        return urls
    rng = np.random.default_rng(seed)
    for s, url in enumerate(urls):
        with tarfile.open(url, "w") as tar:
            for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
                jpg, w, h = random_jpeg(rng)
                meta = {
                    "key": f"{i:09d}",
                    "original_width": w,
                    "original_height": h,
                    "aesthetic": 6.0,
                    "punsafe": 0.01,
                    "pwatermark": 0.1,
                }
                for ext, data in (
                    ("jpg", jpg),
                    ("txt", f"random image {i}".encode()),
                    ("json", json.dumps(meta).encode()),
                ):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return urls


def plain_loop(urls: list[str], size: int, batch_size: int) -> int:
    """What one writes with webdataset and PIL alone."""
    import webdataset as wds

    ds = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg", "txt")
    n, batch = 0, []
    for image, caption in ds:
        w, h = image.size
        s = size / min(w, h)
        image = image.convert("RGB").resize(
            (max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC
        )
        left, top = (image.width - size) // 2, (image.height - size) // 2
        image = image.crop((left, top, left + size, top + size))
        x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 127.5 - 1
        batch.append(x)
        if len(batch) == batch_size:
            n += len(torch.stack(batch))
            batch = []
    return n + len(batch)


def ours(urls: list[str], size: int, batch_size: int, draft: bool) -> int:
    f = MetadataFilter(
        min_width=256, min_height=256, min_aesthetic=5.0, max_punsafe=0.5, max_pwatermark=0.8
    )  # every sample passes: the work stays comparable
    options = DataOptions(size, flip=True, draft=draft, filters=f)
    ds = make_dataset(urls, options, batch_size, False, rank=0, world_size=1)
    return sum(len(b["key"]) for b in ds)


def measure(loaders: dict, repeats: int) -> dict[str, float]:
    """Median images/s of each loader; the passes are interleaved (A B C A B C ...) so that a
    change in the load of a shared machine hits every loader alike."""
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(repeats):
        for name, fn in loaders.items():
            start = time.perf_counter()
            n = fn()
            rates[name].append(n / (time.perf_counter() - start))
            print(f"  {name}: {rates[name][-1]:.1f} images/s ({n} images)", flush=True)
    return {name: statistics.median(r) for name, r in rates.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default=str(ROOT / "bench/results/loader/throughput.md"))
    args = p.parse_args()
    torch.set_num_threads(1)
    urls = write_shards(ROOT / "bench/runs/loader/shards", args.n)
    rows = []
    for size in args.sizes:
        loaders = {
            "plain webdataset + PIL": lambda: plain_loop(urls, size, args.batch_size),
            "ours (draft off)": lambda: ours(urls, size, args.batch_size, False),
            "ours (default, draft on)": lambda: ours(urls, size, args.batch_size, True),
        }
        print(f"{size} px", flush=True)
        rates = measure(loaders, args.repeats)
        base = rates["plain webdataset + PIL"]
        rows += [f"| {size} | {name} | {r:.1f} | {r / base:.2f}x |" for name, r in rates.items()]
    table = "\n".join(
        ["| px | loader | images/s (one reader) | vs plain |", "|---|---|---|---|"] + rows
    )
    text = (
        f"# Loader throughput\n\n`python bench/loader.py --n {args.n} --repeats "
        f"{args.repeats}` - {args.n} JPEGs (300..1100 px a side, quality 90) in shards of "
        f"250; one process, one torch thread, median of {args.repeats} interleaved passes; "
        f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores shared with other "
        f"jobs: compare within a table), Python {platform.python_version()}.\n\n{table}\n"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
