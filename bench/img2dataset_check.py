"""Shards made by the real img2dataset load as they are.

Writes test images (RGB/CMYK/grayscale JPEG, RGBA/palette/16-bit PNG, a corrupt file), serves
them with http.server on localhost, runs img2dataset on a CSV url list (plus a URL that 404s)
with `--output_format webdataset`, then reads the output with our loader: every image
img2dataset saved must come back once (exact mode), captions from `.txt`, extra columns in the
`.json` usable by the filters, and the dataset size from img2dataset's `_stats.json`.

img2dataset pins webdataset<0.3, which this project's loader outgrew, so it lives in its own
virtual environment (git-ignored):

    python -m venv bench/runs/img2dataset-venv
    bench/runs/img2dataset-venv/bin/pip install img2dataset
    python bench/img2dataset_check.py     # -> bench/results/loader/img2dataset.md
"""

from __future__ import annotations

import argparse
import csv
import functools
import http.server
import io
import subprocess
import tarfile
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from ldm.data.filters import MetadataFilter
from ldm.data.options import DataOptions
from ldm.data.shards import expand_shards, read_stats_count
from ldm.data.webdataset import make_dataset

ROOT = Path(__file__).resolve().parents[1]


def test_images(rng: np.random.Generator) -> dict[str, bytes]:
    """name -> file bytes; every mode a web crawl meets, and one file that is not an image."""
    files = {}
    for i in range(24):
        w, h = (int(v) for v in rng.integers(80, 400, size=2))
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image = Image.fromarray(arr)
        kind = ["rgb.jpg", "cmyk.jpg", "gray.jpg", "rgba.png", "palette.png", "16bit.png"][i % 6]
        buf = io.BytesIO()
        if kind == "cmyk.jpg":
            image.convert("CMYK").save(buf, "JPEG")
        elif kind == "gray.jpg":
            image.convert("L").save(buf, "JPEG")
        elif kind == "rgba.png":
            image.convert("RGBA").save(buf, "PNG")
        elif kind == "palette.png":
            image.convert("P").save(buf, "PNG")
        elif kind == "16bit.png":
            Image.fromarray((arr[..., 0].astype(np.uint16) * 257)).save(buf, "PNG")
        else:
            image.save(buf, "JPEG")
        files[f"{i:03d}_{kind}"] = buf.getvalue()
    files["corrupt.jpg"] = b"\xff\xd8\xff\xe0 this is not really a jpeg" * 10
    return files


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def serve(directory: Path) -> tuple[http.server.ThreadingHTTPServer, int]:
    handler = functools.partial(QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def run_img2dataset(exe: str, url_list: Path, out: Path) -> None:
    subprocess.run(
        [
            exe,
            "--url_list",
            str(url_list),
            "--input_format",
            "csv",
            "--url_col",
            "url",
            "--caption_col",
            "caption",
            "--save_additional_columns",
            "['aesthetic','punsafe']",
            "--output_format",
            "webdataset",
            "--output_folder",
            str(out),
            "--processes_count",
            "1",
            "--thread_count",
            "4",
            "--image_size",
            "64",
            "--resize_mode",
            "keep_ratio",
            "--number_sample_per_shard",
            "10",
            "--distributor",
            "multiprocessing",
            "--enable_wandb",
            "False",
            "--retries",
            "0",
            "--timeout",
            "5",
        ],
        check=True,
    )


def version(exe: str) -> str:
    pip = Path(exe).with_name("pip")
    out = subprocess.run([str(pip), "show", "img2dataset"], capture_output=True, text=True).stdout
    return next(
        (ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Version")),
        "unknown",
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--img2dataset", default=str(ROOT / "bench/runs/img2dataset-venv/bin/img2dataset")
    )
    p.add_argument("--work", default=str(ROOT / "bench/runs/img2dataset"))
    p.add_argument("--out", default=str(ROOT / "bench/results/loader/img2dataset.md"))
    args = p.parse_args()
    work = Path(args.work)
    images, shards = work / "www", work / "shards"
    images.mkdir(parents=True, exist_ok=True)
    for old in shards.glob("*"):
        old.unlink()
    files = test_images(np.random.default_rng(0))
    for name, data in files.items():
        (images / name).write_bytes(data)
    server, port = serve(images)
    url_list = work / "urls.csv"
    with open(url_list, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["url", "caption", "aesthetic", "punsafe"])
        for i, name in enumerate([*files, "missing.jpg"]):
            caption = "" if i == 5 else f"test image {name}"  # one empty caption
            w.writerow([f"http://127.0.0.1:{port}/{name}", caption, 4 + i % 4, i % 3 / 4])
    run_img2dataset(args.img2dataset, url_list, shards)
    server.shutdown()

    urls = expand_shards(str(shards / "*.tar"))
    saved = sum(1 for u in urls for n in tarfile.open(u).getnames() if n.endswith(".jpg"))
    ds = make_dataset(urls, DataOptions(64, mode="exact"), 8, True, rank=0, world_size=1)
    batches = list(ds)
    keys = [k for b in batches for k in b["key"]]
    counts = {k: v for b in batches for k, v in b["counts"].items() if v}
    totals = {k: sum(b["counts"][k] for b in batches) for k in counts}
    f = MetadataFilter(min_aesthetic=5.0, max_punsafe=0.3)
    filtered = list(make_dataset(urls, DataOptions(64, filters=f), 8, False))
    ftotals = {k: sum(b["counts"][k] for b in filtered) for k in batches[0]["counts"]}
    expected = saved - totals.get("rejected/no_caption", 0)
    once = sorted(set(keys)) == sorted(keys) and len(keys) == expected
    lines = [
        "# img2dataset shards, read as they are",
        "",
        f"`python bench/img2dataset_check.py` - img2dataset {version(args.img2dataset)} "
        f"(its own venv), {len(files) + 1} URLs served from localhost: 24 images (RGB, CMYK and "
        "grayscale JPEG, RGBA, palette and 16-bit PNG), one corrupt file, one 404; one empty "
        "caption; `--output_format webdataset --image_size 64 --number_sample_per_shard 10`.",
        "",
        f"- shards: {len(urls)} tars, {saved} images saved by img2dataset; "
        f"`_stats.json` successes: {read_stats_count(urls)}",
        f"- exact epoch: {len(keys)} samples in {len(batches)} batches, "
        f"{len(set(keys))} distinct keys; counts {totals}",
        f"- every saved image read exactly once: {once}",
        f"- filters min_aesthetic=5, max_punsafe=0.3 on the saved extra columns: "
        f"{ {k: v for k, v in ftotals.items() if v} } (the url list says 12 / 6 / 6)",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
