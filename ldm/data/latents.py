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

This module is the format (what a cache holds and says it was made with, `cache_metadata`)
and its reading and checks; `ldm.data.latents_write` encodes and writes caches.
"""

from __future__ import annotations

import io
import json
import logging
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ldm.data.filters import new_counts
from ldm.data.options import DataOptions
from ldm.data.shards import DataError
from ldm.data.webdataset import (
    ImageTextStream,
    build_index,
)
from ldm.fingerprint import exact
from ldm.models.text_encoder import DualTextEncoder, TextEncoder

log = logging.getLogger(__name__)
META_FILE, EMPTY_FILE = "_latents.json", "_empty_context.npy"
FORMAT = "ldm-latents/1"


class CacheError(DataError):
    """A cache that does not match the configured model or data settings."""


def text_encoder_settings(text_encoder: nn.Module) -> dict:
    """What besides the weights changes a text encoder's output (each tower's, for SDXL's)."""
    if isinstance(text_encoder, DualTextEncoder):
        return {"towers": [text_encoder_settings(e) for e in text_encoder.embedders]}
    settings = {
        k: getattr(text_encoder, k, None) for k in ("layer", "pad_with_eot", "context_length")
    }
    if not getattr(text_encoder, "final_norm", True):  # only when set: older caches keep their hash
        settings["final_norm"] = False
    return settings


def npy_bytes(a: torch.Tensor, dtype: str) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a.detach().float().cpu().numpy().astype(dtype), allow_pickle=False)
    return buf.getvalue()


def _npy_shape(data: bytes) -> tuple[int, ...]:
    buf = io.BytesIO(data)
    version = np.lib.format.read_magic(buf)  # a ValueError for anything but a .npy
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else None
    read = read or np.lib.format.read_array_header_2_0
    shape, _, _ = read(buf)
    return tuple(shape)


def _load_npy(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32))


def cache_metadata(
    vae,
    text_encoder,
    image_size: int,
    flips: bool,
    dtype: str,
    sources: dict | None = None,
    buckets: list[tuple[int, int]] | None = None,
) -> dict:
    """What a cache was made with; compared with the training configuration before use.
    `time_ids`: each sample's SDXL micro-conditioning is cached (caches of older versions lack
    it); `pooled`: the text encoder's pooled vector is (SDXL's dual encoder); `buckets`: the
    aspect-ratio buckets images were cut to (null: every image a centre-cropped square)."""
    return {
        "format": FORMAT,
        "buckets": buckets and [list(b) for b in buckets],
        "time_ids": True,
        "image_size": image_size,
        "crop": "center",
        "flips": flips,
        "dtype": dtype,
        "vae": {"config": getattr(vae, "config", None), "sha256": exact(vae.state_dict())},
        "text_encoder": text_encoder
        and {
            "pooled": isinstance(text_encoder, DualTextEncoder),
            "settings": text_encoder_settings(text_encoder),
            "sha256": exact(text_encoder.state_dict(), text_encoder_settings(text_encoder)),
        },
        "config": sources or {},
    }


def identity(meta: dict) -> dict:
    keys = ("format", "image_size", "crop", "flips", "dtype", "buckets")
    text = meta.get("text_encoder")
    return {
        **{k: meta.get(k) for k in keys},
        "time_ids": bool(meta.get("time_ids")),
        "vae": meta["vae"]["sha256"],
        "text": text and text["sha256"],
    }


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
    cached = [tuple(b) for b in meta.get("buckets") or []] or None
    if options.buckets != cached:
        made = "with aspect-ratio buckets" if cached else "without aspect-ratio buckets"
        raise CacheError(
            f"the cache was made {made}, the config asks for "
            f"bucketing={options.bucketing} (bucket_step={options.bucket_step}, "
            f"bucket_max_ratio={options.bucket_max_ratio}); match it or rebuild the cache"
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


def cached_extras(meta: dict) -> tuple[str, ...]:
    """What a cache holds per sample beside the posterior and the context: SDXL's pooled
    vector and micro-conditioning, where it was made with them."""
    pooled = bool((meta.get("text_encoder") or {}).get("pooled"))
    return ("pooled",) * pooled + ("time_ids",) * bool(meta.get("time_ids"))


class CachedLatentStream(ImageTextStream):
    """The shard reader of `ldm.data.webdataset` (streaming, exact resumption, validation dealt
    evenly over ranks) over cached samples: batches {"latent_mean", "latent_std": (B, C, h, w),
    "caption", "key", "counts"} and, from a cache with text, {"context": (B, L, D),
    "empty_context": (1, L, D)}, with `extras` (`cached_extras`) {"pooled": (B, P)} and
    {"time_ids": (B, 6)}. With `flip`, each sample's mirrored posterior (and micro-conditioning)
    is taken half of the time (a coin of the seed, epoch and key: a resumed run tosses the
    same)."""

    def __init__(
        self,
        sources: list[list[str]],
        empty_context: torch.Tensor | None,
        batch_size: int,
        options: DataOptions,
        extras: tuple[str, ...] = (),
        **kw,
    ) -> None:
        super().__init__(sources, [1.0 / len(sources)] * len(sources), batch_size, options, **kw)
        self.empty_context, self.flip = empty_context, options.flip
        text = ("context",) if empty_context is not None else ()
        self.members = ("mean", "std") + text + tuple(extras)

    def rejection(self, sample: dict) -> str | None:
        flipped = ["mean_flip.npy"] + (["time_ids_flip.npy"] if "time_ids" in self.members else [])
        wanted = [f"{m}.npy" for m in self.members] + (flipped if self.flip else [])
        return "incomplete_cache" if any(w not in sample for w in wanted) else None

    def check(self, sample: dict) -> dict | None:
        reason = self.rejection(sample)
        if reason is not None:
            self.count(reason)
            log.warning("skipping %s: %s", sample.get("__key__"), reason)
            return None
        if self.buckets:  # batches of one latent shape, read from the .npy header alone
            try:
                sample["bucket"] = _npy_shape(sample["mean.npy"])
            except ValueError as e:
                self.count("incomplete_cache")
                log.warning("skipping %s: unreadable cached latent (%s)", sample["__key__"], e)
                return None
        return sample

    def decode(self, sample: dict) -> dict | None:
        key = sample["__key__"]
        coin = random.Random(f"{self.seed}/{self.epoch}/{key}").random()
        suffix = "_flip" if self.flip and self.mode == "stream" and coin < 0.5 else ""
        mirrored = ("mean", "std", "time_ids")  # the text is the same for the mirror image
        try:
            out = {
                NAMES.get(m, m): _load_npy(sample[f"{m}{suffix if m in mirrored else ''}.npy"])
                for m in self.members
            }
        except (KeyError, ValueError) as e:
            self.count("incomplete_cache")
            log.warning("skipping %s: incomplete cached sample (%s)", key, e)
            return None
        self.count("kept")
        caption = sample.get("txt", b"").decode("utf-8", "replace")
        return {**out, "caption": caption, "key": key}

    def collate(self, samples: list[dict]) -> dict:
        counts, self.counts = self.counts, new_counts()
        batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0] if k in BATCHED}
        if self.empty_context is not None:
            batch["empty_context"] = self.empty_context  # (1, L, D): caption dropout's stand-in
        keys = [s["key"] for s in samples]
        return {**batch, "caption": [s["caption"] for s in samples], "key": keys, "counts": counts}


NAMES = {"mean": "latent_mean", "std": "latent_std"}  # a cached member's name in a batch
BATCHED = ("latent_mean", "latent_std", "context", "pooled", "time_ids")


def make_latent_dataset(
    urls: list[str],
    empty_context: torch.Tensor | None,
    batch_size: int,
    train: bool,
    options: DataOptions,
    batches_per_epoch: int | None = None,
    extras: tuple[str, ...] = (),
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
        extras,
        batches_per_worker=batches_per_epoch,
    )
    if not train:
        ds.index, ds.index_counts = build_index(list(urls), ds.rejection)
    return ds
