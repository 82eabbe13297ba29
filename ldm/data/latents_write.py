"""Writing a latent cache (the format is `ldm.data.latents`'): source shards encoded by the
frozen VAE (and text encoder) into cached shards, built beside the target folder and moved into
place once complete (`write_latent_shards`), or from a data module's settings (`build_cache`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ldm.data.buckets import nearest_bucket
from ldm.data.filters import parse_metadata
from ldm.data.images import open_image
from ldm.data.latents import (
    EMPTY_FILE,
    META_FILE,
    CacheError,
    cache_metadata,
    identity,
    npy_bytes,
)
from ldm.data.options import DataOptions
from ldm.data.shards import IMAGE_EXTS, expand_shards, read_shard
from ldm.data.transforms import ImageTransform, mirrored_left, original_size, time_ids
from ldm.fileio import ShardWriter, replace_folder, shard_name, write_text
from ldm.models.text_encoder import DualTextEncoder
from ldm.precision import autocast as precision_autocast
from ldm.precision import device_type
from ldm.precision import resolve as resolve_precision

log = logging.getLogger(__name__)


@torch.no_grad()
def encode_batch(
    vae: nn.Module,
    text_encoder: nn.Module | None,
    images: torch.Tensor,
    captions: list[str],
    flips: bool,
) -> dict[str, torch.Tensor]:
    """Images (B, 3, H, W) in [-1, 1] + captions -> posterior moments (B, C, h, w) and, with a
    text encoder, its context (B, L, D) (and an SDXL dual encoder's pooled vector (B, P))."""
    # channels_last: oneDNN's convolutions at full image resolution run ~1.5x faster in it on CPUs
    images = images.contiguous(memory_format=torch.channels_last)
    post = vae.posterior(images)
    out = {"mean": post.mean, "std": post.std}
    if isinstance(text_encoder, DualTextEncoder):
        out["context"], out["pooled"] = text_encoder.encode(captions)
    elif text_encoder is not None:
        out["context"] = text_encoder(captions)
    if flips:
        post = vae.posterior(images.flip(-1))
        out.update(mean_flip=post.mean, std_flip=post.std)
    return out


def _read_source(
    url: str,
    transform: ImageTransform,
    skipped: list[str],
    keep: Callable[[dict], bool] | None = None,
    buckets: list[tuple[int, int]] | None = None,
):
    """(key, image tensor, caption, json bytes, micro-conditioning) of each readable sample of
    one source shard that `keep` (a predicate on its JSON metadata) accepts; the others are
    listed in `skipped` with their reason. Read and checked as training reads images
    (`read_shard`, `open_image`), so a hostile sample costs the cache no more than it would
    cost a training run. The micro-conditioning is SDXL's `time_ids` of the cached crop and of
    its mirror image (whose crop's left edge differs when the overhang is odd). With `buckets`
    each image is cut to the bucket nearest its aspect ratio, as the image reader cuts it."""
    for sample in read_shard(url, skipped.append):
        key, meta = sample["__key__"], parse_metadata(sample.get("json"))
        if meta is None or (keep is not None and not keep(meta)):
            skipped.append(f"{key} ({'bad_metadata' if meta is None else 'filtered'})")
            continue
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        try:
            with open_image(sample[ext]) as im:
                original = original_size(meta, im)
                bucket = nearest_bucket(*im.size, buckets) if buckets else None
                image, (top, left), width = transform.apply(im, bucket)
        except Exception as e:  # KeyError (no image), too many pixels, or any decoder error
            skipped.append(f"{key} ({getattr(e, 'reason', 'bad_image')})")
            continue
        caption = sample.get("txt", b"").decode("utf-8", "replace").strip()
        target = tuple(image.shape[1:])
        mirrored = (top, mirrored_left(left, target[1], width))
        ids = {
            "time_ids": time_ids(original, (top, left), target),
            "time_ids_flip": time_ids(original, mirrored, target),
        }
        yield key, image, caption, sample.get("json", b"{}"), ids


def _flush(writer, vae, text_encoder, pending: list, flips: bool, dtype: str, device) -> None:
    images = torch.stack([p[1] for p in pending]).to(device)
    encoded = encode_batch(vae, text_encoder, images, [p[2] for p in pending], flips)
    encoded = {k: v.float().cpu() for k, v in encoded.items()}  # one transfer, not one per sample
    for i, (key, _, caption, meta, ids) in enumerate(pending):
        members = {f"{name}.npy": npy_bytes(t[i], dtype) for name, t in encoded.items()}
        for name in ("time_ids", "time_ids_flip") if flips else ("time_ids",):
            members[f"{name}.npy"] = npy_bytes(ids[name], "float32")  # sizes past 2048: not fp16
        writer.write(key, {**members, "txt": caption.encode(), "json": meta})
    pending.clear()


def write_latent_shard(
    url: str,
    out: Path,
    index: int,
    vae,
    text_encoder,
    transform: ImageTransform,
    batch_size: int,
    flips: bool,
    dtype: str,
    device,
    keep: Callable[[dict], bool] | None = None,
    buckets: list[tuple[int, int]] | None = None,
) -> tuple[int, list[str]]:
    """Encode one source shard into shard `index` of `out` (renamed into place when complete;
    an empty one for a source without a usable sample). Images are encoded in batches of one
    shape (one per bucket, with `buckets`)."""
    skipped, pending, n = [], {}, 0
    with ShardWriter(out, first=index, keep_empty=True) as writer:
        for item in _read_source(url, transform, skipped, keep, buckets):
            same_shape = pending.setdefault(tuple(item[1].shape), [])
            same_shape.append(item)
            n += 1
            if len(same_shape) == batch_size:
                _flush(writer, vae, text_encoder, same_shape, flips, dtype, device)
        for same_shape in pending.values():
            if same_shape:
                _flush(writer, vae, text_encoder, same_shape, flips, dtype, device)
    return n, skipped


def write_latent_shards(
    urls: list[str],
    out_dir: str | os.PathLike,
    vae: nn.Module,
    text_encoder: nn.Module | None,
    image_size: int,
    batch_size: int = 32,
    flips: bool = False,
    dtype: str = "float16",
    device: str = "cpu",
    sources: dict | None = None,
    progress: bool = True,
    keep: Callable[[dict], bool] | None = None,
    precision: str = "auto",
    replace: bool = False,
    buckets: list[tuple[int, int]] | None = None,
) -> dict:
    """Encode source shards `urls` into `out_dir/NNNNN.tar` (one per source, same order);
    samples whose JSON metadata `keep` rejects, and unreadable ones, are skipped and counted.
    Without a text encoder the cache holds latents only. With `buckets` ((width, height) pairs,
    `ldm.data.buckets`), each image is cached at the bucket nearest its aspect ratio.

    A new cache is built beside `out_dir` (`building_dir`) and moved into place once complete,
    so `out_dir` only ever holds a whole cache: the old one stays readable until the new one
    replaces it, and a build killed midway leaves it as it was. Shards already written by an
    interrupted build of the same models and settings are kept. A cache of other models or
    settings in `out_dir` is an error, or with `replace` is replaced (other files in the folder
    are carried over). Encoding runs in `ldm.precision.resolve(precision, device)`.
    """
    if dtype not in ("float16", "float32"):
        raise CacheError(f"dtype must be float16 or float32, got {dtype!r}")
    final = Path(out_dir)
    vae = vae.to(device).eval()
    text_encoder = text_encoder and text_encoder.to(device).eval()
    meta = cache_metadata(vae, text_encoder, image_size, flips, dtype, sources, buckets)
    out = build_folder(final, meta, replace)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / META_FILE, {**meta, "complete": False})
    if text_encoder is not None:
        with torch.no_grad():
            empty = text_encoder([""])[0]  # (L, D)
        (out / EMPTY_FILE).write_bytes(npy_bytes(empty, dtype))
    chosen = resolve_precision(precision, device)
    meta["precision"] = chosen.value  # what the encoders ran in; not part of the identity
    with precision_autocast(chosen, device):
        encode = functools.partial(
            write_latent_shard,
            vae=vae,
            text_encoder=text_encoder,
            transform=ImageTransform(image_size),
            batch_size=batch_size,
            flips=flips,
            dtype=dtype,
            device=device,
            keep=keep,
            buckets=buckets,
        )
        counts = encode_sources(urls, out, encode, progress)
    _write_json(out / META_FILE, {**meta, "complete": True, "counts": counts})
    if out != final:
        _carry_other_files(final, out)
        replace_folder(out, final.resolve())
    return counts


def build_folder(final: Path, meta: dict, replace: bool) -> Path:
    """Where the cache `meta` describes is written: `final` itself when it holds this very
    cache unfinished (by an older version of this code), else a fresh `building_dir`; a cache
    of other models or settings in `final` is an error unless it is to be replaced."""
    found = _read_json(final / META_FILE)
    if found is None:
        return building_dir(final, meta)
    if identity(found) == identity(meta):
        return final
    if not replace:
        raise CacheError(
            f"{final} holds a cache made with other models or settings; "
            f"remove it or choose another folder"
        )
    log.warning("%s holds a cache of other models or settings: rebuilding it", final)
    return building_dir(final, meta)


def encode_sources(urls: list[str], out: Path, encode: Callable, progress: bool) -> dict:
    """Shard i of `out` from source `urls[i]` with `encode(url, out, i)`, unless an interrupted
    build of the same cache wrote it already; what was written and skipped."""
    from tqdm import tqdm

    counts = {"written": 0, "skipped": [], "shards": []}
    for i, url in enumerate(tqdm(urls, unit="shard", desc="latents", disable=not progress)):
        path = out / shard_name(i)
        if not path.is_file():
            n, skipped = encode(url, out, i)
            counts["written"] += n
            counts["skipped"] += [f"{url}:{k}" for k in skipped]
        counts["shards"].append({"shard": path.name, "source": url})
    return counts


def building_dir(out: Path, meta: dict) -> Path:
    """Where a cache for `out` is built: a hidden sibling (same file system, so it moves into
    place in one rename) named by what is cached, so an interrupted build resumes there."""
    key = hashlib.sha256(json.dumps(identity(meta), sort_keys=True).encode()).hexdigest()
    return out.resolve().with_name(f".{out.resolve().name}.building-{key[:16]}")


def _carry_other_files(old: Path, new: Path) -> None:
    """Move what is not the old cache's own (its metadata, empty context and shards) into the
    new folder, so that replacing the folder replaces the cache only."""
    own = {META_FILE, EMPTY_FILE}
    for path in old.iterdir() if old.is_dir() else []:
        is_shard = len(path.name) == 9 and path.name[:5].isdigit() and path.suffix == ".tar"
        hidden = path.name.startswith(".")  # a write cut short (`temporary_path`'s .NAME.tmp)
        if not (path.name in own or is_shard or hidden or (new / path.name).exists()):
            os.replace(path, new / path.name)


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _write_json(path: Path, obj: dict) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def cache_folder(train_shards: str | list[str]) -> Path:
    """The folder of `FOLDER/*.tar`, where a cache built from source shards is written."""
    if not isinstance(train_shards, str) or not train_shards.endswith("/*.tar"):
        raise CacheError(
            f"to build a cache from source_shards, train_shards must be "
            f"'FOLDER/*.tar', got {train_shards!r}"
        )
    return Path(train_shards[: -len("/*.tar")])


def build_cache(
    out: Path,
    source_shards: str | list[str],
    vae: nn.Module,
    text_encoder: nn.Module | None,
    options: DataOptions,
    batch_size: int,
    dtype: str,
    precision: str,
) -> bool:
    """Cache `source_shards` in `out` with these encoders (`text_encoder` None: latents only)
    and data settings, unless a complete cache of the same identity is there; whether it was
    built. The encoders are left on the device they came on."""
    meta = out / META_FILE
    if meta.is_file():
        wanted = identity(
            cache_metadata(
                vae, text_encoder, options.image_size, options.flip, dtype, None, options.buckets
            )
        )
        old = json.loads(meta.read_text())
        if old.get("complete") and identity(old) == wanted:
            return False
    if options.random_crop:
        raise CacheError("random_crop cannot be cached: a cache holds one centre crop per image")
    log.info(
        "caching VAE latents%s of %s in %s",
        " and text embeddings" if text_encoder else "",
        source_shards,
        out,
    )
    device = next(vae.parameters()).device
    write_latent_shards(
        expand_shards(source_shards),
        out,
        vae,
        text_encoder,
        options.image_size,
        batch_size=batch_size,
        flips=options.flip,
        dtype=dtype,
        device=device_type("auto"),
        precision=precision,
        replace=True,
        buckets=options.buckets,
    )
    for part in (vae, text_encoder):  # back where the model keeps them
        if part is not None:
            part.to(device)
    return True
