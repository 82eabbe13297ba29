"""Cached VAE latents and text embeddings: write them once, train without the frozen encoders.

A cached shard holds, per sample, the VAE posterior q(z|x) of the (centre-cropped) image as raw,
unscaled `KEY.mean.npy` / `KEY.std.npy` (C, h, w) - so training still draws z = mean + std * eps
every step, as on-the-fly encoding does - optionally the same for the mirrored image
(`KEY.mean_flip.npy` / `KEY.std_flip.npy`), and the source `KEY.txt` / `KEY.json`. A cache made
with a (frozen) text encoder also holds its output `KEY.context.npy` (L, D); one made without
holds latents only, and the text encoder, which may then train, runs on the captions each step.
Beside the shards: `_latents.json` (which VAE and text encoder, by config and a hash of their
weights; image size; crop; flips; dtype) and, with contexts, `_empty_context.npy`, the empty
prompt's embedding, swapped in at run time for caption dropout.

The configured VAE's scale/shift are applied at run time, so a cache outlives a change of latent
scaling; a different VAE or cached text encoder, image size, a random crop, or flips not cached
are refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ldm.data.filters import new_counts, parse_metadata
from ldm.data.images import open_image
from ldm.data.options import DataOptions
from ldm.data.shards import IMAGE_EXTS, DataError, expand_shards, read_shard
from ldm.data.transforms import ImageTransform
from ldm.data.webdataset import (
    ImageTextStream,
    build_index,
)
from ldm.fileio import ShardWriter, replace_folder, shard_name, write_text
from ldm.fingerprint import exact
from ldm.models.text_encoder import TextEncoder
from ldm.precision import autocast as precision_autocast
from ldm.precision import device_type
from ldm.precision import resolve as resolve_precision

log = logging.getLogger(__name__)
META_FILE, EMPTY_FILE = "_latents.json", "_empty_context.npy"
FORMAT = "ldm-latents/1"


class CacheError(DataError):
    """A cache that does not match the configured model or data settings."""


def text_encoder_settings(text_encoder: nn.Module) -> dict:
    """What besides the weights changes a text encoder's output."""
    return {k: getattr(text_encoder, k, None) for k in ("layer", "pad_with_eot", "context_length")}


def _npy(a: torch.Tensor, dtype: str) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a.detach().float().cpu().numpy().astype(dtype), allow_pickle=False)
    return buf.getvalue()


def _load_npy(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32))


# --------------------------------------------------------------------------------------------
# Writing


@torch.no_grad()
def encode_batch(
    vae: nn.Module,
    text_encoder: nn.Module | None,
    images: torch.Tensor,
    captions: list[str],
    flips: bool,
) -> dict[str, torch.Tensor]:
    """Images (B, 3, H, W) in [-1, 1] + captions -> posterior moments (B, C, h, w) and, with a
    text encoder, its context (B, L, D)."""
    # channels_last: oneDNN's convolutions at full image resolution run ~1.5x faster in it on CPUs
    images = images.contiguous(memory_format=torch.channels_last)
    post = vae.posterior(images)
    out = {"mean": post.mean, "std": post.std}
    if text_encoder is not None:
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
):
    """(key, image tensor, caption, json bytes) of each readable sample of one source shard
    that `keep` (a predicate on its JSON metadata) accepts; the others are listed in `skipped`
    with their reason. Read and checked as training reads images (`read_shard`, `open_image`),
    so a hostile sample costs the cache no more than it would cost a training run."""
    for sample in read_shard(url, skipped.append):
        key, meta = sample["__key__"], parse_metadata(sample.get("json"))
        if meta is None or (keep is not None and not keep(meta)):
            skipped.append(f"{key} ({'bad_metadata' if meta is None else 'filtered'})")
            continue
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        try:
            with open_image(sample[ext]) as im:
                image = transform(im)
        except Exception as e:  # KeyError (no image), too many pixels, or any decoder error
            skipped.append(f"{key} ({getattr(e, 'reason', 'bad_image')})")
            continue
        caption = sample.get("txt", b"").decode("utf-8", "replace").strip()
        yield key, image, caption, sample.get("json", b"{}")


def _flush(writer, vae, text_encoder, pending: list, flips: bool, dtype: str, device) -> None:
    images = torch.stack([p[1] for p in pending]).to(device)
    encoded = encode_batch(vae, text_encoder, images, [p[2] for p in pending], flips)
    encoded = {k: v.float().cpu() for k, v in encoded.items()}  # one transfer, not one per sample
    for i, (key, _, caption, meta) in enumerate(pending):
        members = {f"{name}.npy": _npy(t[i], dtype) for name, t in encoded.items()}
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
) -> tuple[int, list[str]]:
    """Encode one source shard into shard `index` of `out` (renamed into place when complete;
    an empty one for a source without a usable sample)."""
    skipped, pending, n = [], [], 0
    with ShardWriter(out, first=index, keep_empty=True) as writer:
        for item in _read_source(url, transform, skipped, keep):
            pending.append(item)
            n += 1
            if len(pending) == batch_size:
                _flush(writer, vae, text_encoder, pending, flips, dtype, device)
        if pending:
            _flush(writer, vae, text_encoder, pending, flips, dtype, device)
    return n, skipped


def cache_metadata(
    vae, text_encoder, image_size: int, flips: bool, dtype: str, sources: dict | None = None
) -> dict:
    """What a cache was made with; compared with the training configuration before use."""
    return {
        "format": FORMAT,
        "image_size": image_size,
        "crop": "center",
        "flips": flips,
        "dtype": dtype,
        "vae": {"config": getattr(vae, "config", None), "sha256": exact(vae.state_dict())},
        "text_encoder": text_encoder
        and {
            "settings": text_encoder_settings(text_encoder),
            "sha256": exact(text_encoder.state_dict(), text_encoder_settings(text_encoder)),
        },
        "config": sources or {},
    }


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
) -> dict:
    """Encode source shards `urls` into `out_dir/NNNNN.tar` (one per source, same order);
    samples whose JSON metadata `keep` rejects, and unreadable ones, are skipped and counted.
    Without a text encoder the cache holds latents only.

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
    meta = cache_metadata(vae, text_encoder, image_size, flips, dtype, sources)
    found = _read_json(final / META_FILE)
    if found is not None and _identity(found) != _identity(meta) and not replace:
        raise CacheError(
            f"{final} holds a cache made with other models or settings; "
            f"remove it or choose another folder"
        )
    if found is not None and _identity(found) == _identity(meta):
        out = final  # this very cache (unfinished by an older version of this code): finished
    else:
        if found is not None:
            log.warning("%s holds a cache of other models or settings: rebuilding it", final)
        out = building_dir(final, meta)
    out.mkdir(parents=True, exist_ok=True)
    old = out / META_FILE
    _write_json(old, {**meta, "complete": False})
    if text_encoder is not None:
        with torch.no_grad():
            empty = text_encoder([""])[0]  # (L, D)
        (out / EMPTY_FILE).write_bytes(_npy(empty, dtype))
    transform, counts = ImageTransform(image_size), {"written": 0, "skipped": [], "shards": []}
    from tqdm import tqdm

    chosen = resolve_precision(precision, device)
    meta["precision"] = chosen.value  # what the encoders ran in; not part of the identity
    with precision_autocast(chosen, device):
        for i, url in enumerate(tqdm(urls, unit="shard", desc="latents", disable=not progress)):
            path = out / shard_name(i)
            if not path.is_file():
                n, skipped = write_latent_shard(
                    url,
                    out,
                    i,
                    vae,
                    text_encoder,
                    transform,
                    batch_size,
                    flips,
                    dtype,
                    device,
                    keep,
                )
                counts["written"] += n
                counts["skipped"] += [f"{url}:{k}" for k in skipped]
            counts["shards"].append({"shard": path.name, "source": url})
    _write_json(old, {**meta, "complete": True, "counts": counts})
    if out != final:
        _carry_other_files(final, out)
        replace_folder(out, final.resolve())
    return counts


def building_dir(out: Path, meta: dict) -> Path:
    """Where a cache for `out` is built: a hidden sibling (same file system, so it moves into
    place in one rename) named by what is cached, so an interrupted build resumes there."""
    key = hashlib.sha256(json.dumps(_identity(meta), sort_keys=True).encode()).hexdigest()
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


def _identity(meta: dict) -> dict:
    keys = ("format", "image_size", "crop", "flips", "dtype")
    text = meta.get("text_encoder")
    return {
        **{k: meta.get(k) for k in keys},
        "vae": meta["vae"]["sha256"],
        "text": text and text["sha256"],
    }


def _write_json(path: Path, obj: dict) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# Checking


def read_cache_metadata(urls: list[str]) -> tuple[dict, torch.Tensor | None]:
    """(metadata, empty-prompt context (1, L, D) or None for a latents-only cache) of the cache
    the local shards `urls` belong to."""
    dirs = sorted(
        {str(Path(u).parent) for u in urls if "://" not in u and not u.startswith("pipe:")}
    )
    if len(dirs) != 1:
        raise CacheError(f"cached shards must come from one cache folder, got {dirs or urls}")
    root = Path(dirs[0])
    if not (root / META_FILE).is_file():
        raise CacheError(
            f"{root} has no {META_FILE}: these are not cached-latent shards; make them "
            f"with python data/latents/prepare.py"
        )
    meta = json.loads((root / META_FILE).read_text())
    if meta.get("format") != FORMAT or not meta.get("complete"):
        raise CacheError(
            f"{root / META_FILE}: an incomplete cache or another format "
            f"({meta.get('format')}); rerun data/latents/prepare.py to finish it"
        )
    if not meta.get("text_encoder"):
        return meta, None
    return meta, _load_npy((root / EMPTY_FILE).read_bytes()).unsqueeze(0)


def check_data_settings(meta: dict, options: DataOptions) -> None:
    """Refuse data settings a cache cannot honour (it holds one centre crop per image)."""
    if options.random_crop:
        raise CacheError(
            "random_crop cannot be used with cached latents: the cache holds one "
            "centre crop per image; set data.random_crop=false or train on images"
        )
    if options.flip and not meta["flips"]:
        raise CacheError(
            "flip=true but the cache holds no mirrored latents; set data.flip=false "
            "or rebuild the cache with flips (data/latents/prepare.py --flips)"
        )
    if options.image_size != meta["image_size"]:
        raise CacheError(
            f"the cache was made at image_size {meta['image_size']}, the config asks "
            f"for {options.image_size}; set data.image_size={meta['image_size']} or rebuild it"
        )


def require_frozen(text_encoder: TextEncoder) -> None:
    """Cached text embeddings never change, so a text encoder that trains cannot use them."""
    if text_encoder.trains:
        raise CacheError(
            "the text encoder is trainable, but cached text embeddings never change; "
            "freeze it (text_encoder.frozen=true) or train on images"
        )


def warn_other_precision(meta: dict, precision: str) -> None:
    """One warning line when the cache was encoded in another precision than the run trains in.
    It is used all the same: the precision is not part of a cache's identity, since its latents
    agree within the coarser dtype's rounding (a bf16-encoded cache is within bf16's ~2**-8 of a
    float32 one), far below the noise training adds to them; rebuild it (delete the folder)
    to encode in this run's precision."""
    made = meta.get("precision")
    if made is not None and made != precision:
        log.warning(
            "the latent cache was encoded in %s, this run trains in %s: using it as it is "
            "(delete it to re-encode in %s)",
            made,
            precision,
            precision,
        )


def check_models(meta: dict, vae: nn.Module, text_encoder: nn.Module) -> None:
    """Refuse a VAE other than the one the cache was made with and, where the cache holds text
    embeddings, another text encoder or one that trains (its cached output would never change)."""
    if exact(vae.state_dict()) != meta["vae"]["sha256"]:
        raise CacheError(
            "the configured VAE is not the one the cache was made with (its weights "
            "differ); use that VAE or rebuild the cache"
        )
    if not meta.get("text_encoder"):
        return  # latents only: the text encoder runs, and may train, on the captions
    require_frozen(text_encoder)
    settings = text_encoder_settings(text_encoder)
    if exact(text_encoder.state_dict(), settings) != meta["text_encoder"]["sha256"]:
        raise CacheError(
            "the configured text encoder is not the one the cache was made with "
            "(weights or layer/padding/context length differ); use it or rebuild the cache"
        )


# --------------------------------------------------------------------------------------------
# Reading and training


class CachedLatentStream(ImageTextStream):
    """The shard reader of `ldm.data.webdataset` (streaming, exact resumption, validation dealt
    evenly over ranks) over cached samples: batches {"latent_mean", "latent_std": (B, C, h, w),
    "caption", "key", "counts"} and, from a cache with text, {"context": (B, L, D),
    "empty_context": (1, L, D)}. With `flip`, each sample's mirrored posterior is taken half of
    the time (a coin of the seed, epoch and key: a resumed run tosses the same)."""

    def __init__(
        self,
        sources: list[list[str]],
        empty_context: torch.Tensor | None,
        batch_size: int,
        options: DataOptions,
        **kw,
    ) -> None:
        super().__init__(sources, [1.0 / len(sources)] * len(sources), batch_size, options, **kw)
        self.empty_context, self.flip = empty_context, options.flip
        self.members = ("mean", "std") + (("context",) if empty_context is not None else ())

    def rejection(self, sample: dict) -> str | None:
        wanted = [f"{m}.npy" for m in self.members] + (["mean_flip.npy"] if self.flip else [])
        return "incomplete_cache" if any(w not in sample for w in wanted) else None

    def check(self, sample: dict) -> dict | None:
        reason = self.rejection(sample)
        if reason is not None:
            self.count(reason)
            log.warning("skipping %s: %s", sample.get("__key__"), reason)
            return None
        return sample

    def decode(self, sample: dict) -> dict | None:
        key = sample["__key__"]
        coin = random.Random(f"{self.seed}/{self.epoch}/{key}").random()
        suffix = "_flip" if self.flip and self.mode == "stream" and coin < 0.5 else ""
        try:
            out = {
                "latent_mean": _load_npy(sample[f"mean{suffix}.npy"]),
                "latent_std": _load_npy(sample[f"std{suffix}.npy"]),
            }
            if self.empty_context is not None:
                out["context"] = _load_npy(sample["context.npy"])
        except (KeyError, ValueError) as e:
            self.count("incomplete_cache")
            log.warning("skipping %s: incomplete cached sample (%s)", key, e)
            return None
        self.count("kept")
        caption = sample.get("txt", b"").decode("utf-8", "replace")
        return {**out, "caption": caption, "key": key}

    def collate(self, samples: list[dict]) -> dict:
        counts, self.counts = self.counts, new_counts()
        names = ("latent_mean", "latent_std") + (
            ("context",) if self.empty_context is not None else ()
        )
        batch = {k: torch.stack([s[k] for s in samples]) for k in names}
        if self.empty_context is not None:
            batch["empty_context"] = self.empty_context  # (1, L, D): caption dropout's stand-in
        keys = [s["key"] for s in samples]
        return {**batch, "caption": [s["caption"] for s in samples], "key": keys, "counts": counts}


def make_latent_dataset(
    urls: list[str],
    empty_context: torch.Tensor | None,
    batch_size: int,
    train: bool,
    options: DataOptions,
    batches_per_epoch: int | None = None,
) -> CachedLatentStream:
    """Batches of cached samples: streamed for training (`batches_per_epoch` a worker), each
    sample once, dealt evenly over ranks, otherwise. Of the options, flip, shuffle_buffer, seed
    and max_member_bytes apply; the image settings were checked against the cache
    (`check_data_settings`), and the image checks do not apply to cached samples."""
    ds = CachedLatentStream(
        [list(urls)],
        empty_context,
        batch_size,
        replace(options, mode="stream" if train else "once"),
        batches_per_worker=batches_per_epoch,
    )
    if not train:
        ds.index, ds.index_counts = build_index(list(urls), ds.rejection)
    return ds


# --------------------------------------------------------------------------------------------
# Building from a data module's settings (`ldm.data.modules.LatentDataModule.prepare_data`)


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
        wanted = _identity(
            cache_metadata(vae, text_encoder, options.image_size, options.flip, dtype)
        )
        old = json.loads(meta.read_text())
        if old.get("complete") and _identity(old) == wanted:
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
    )
    for part in (vae, text_encoder):  # back where the model keeps them
        if part is not None:
            part.to(device)
    return True
