"""Encode image shards into cached VAE latents + text embeddings, with the training config's parts.

    python data/latents/prepare.py OUT_DIR [--split train|val] [--flips] [--dtype float16]
        [--batch-size 32] [--device cuda] [--precision auto] [--no-text] [HYDRA OVERRIDES ...]

The overrides compose configs/train.yaml exactly as train.py would (e.g. `experiment=NAME`,
`data=webdataset data.train_shards='shards/{00000..00099}.tar' vae=... text_encoder=...`), so
the VAE, text encoder, image size and crop come from the same configs as training. Train on the
result with `data=latents data.train_shards='OUT_DIR/*.tar'` plus the same model overrides.
`--no-text` caches the VAE latents only, for a text encoder that trains.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm.config import ROOT, architecture, exit_on, fail, register_resolvers
from ldm.data.latents import CacheError, require_frozen
from ldm.data.latents_write import write_latent_shards
from ldm.data.shards import DataError, expand_shards


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="where the cached NNNNN.tar shards are written")
    parser.add_argument(
        "--split",
        choices=("train", "val"),
        default="train",
        help="encode data.train_shards or data.val_shards",
    )
    parser.add_argument(
        "--flips",
        action="store_true",
        help="also cache the mirrored images (implied by data.flip=true)",
    )
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--precision",
        default="auto",
        help="auto (bf16 autocast where the hardware has bf16, else float32), "
        "32-true, bf16-mixed, 16-mixed",
    )
    parser.add_argument(
        "--no-text",
        action="store_true",
        help="cache VAE latents only (the text encoder may then train)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_known_args(argv)


def compose_config(overrides: list[str]):
    register_resolvers()
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=overrides)


def filter_settings(data_cfg) -> dict:
    """The active thresholds of the data config's metadata filters (data.filters)."""
    node = data_cfg.get("filters")
    node = OmegaConf.to_container(node, resolve=True) if node else {}
    return {k: v for k, v in node.items() if k != "_target_" and v is not None}


def metadata_filter(settings: dict) -> Callable[[dict], bool] | None:
    """Filters as a predicate on KEY.json, so the cache holds what training on the images sees."""
    if not settings:
        return None
    from ldm.data.filters import MetadataFilter, rejection_reason

    f = MetadataFilter(**settings)
    return lambda meta: rejection_reason(meta, f) is None


def build_parts(cfg) -> tuple:
    """(VAE, text encoder) built exactly as train.py builds them: same seed, same order, the
    whole model, so that randomly initialised parts match too, not only loaded weights."""
    L.seed_everything(cfg.seed, verbose=False)
    instantiate(cfg.data).prepare_data()  # e.g. renders the shapes set if missing
    module = instantiate(cfg.model)
    return module.vae, module.text_encoder


@exit_on(DataError, FileNotFoundError)
def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    bad = [o for o in overrides if o.startswith("-")]
    if bad:
        fail(f"unknown option(s) {bad}")
    cfg = compose_config(overrides)
    if cfg.data.get("random_crop", False):
        raise CacheError(
            "data.random_crop=true: a cache holds one crop per image; set data.random_crop=false"
        )
    vae, text_encoder = build_parts(cfg)
    urls = expand_shards(cfg.data[f"{args.split}_shards"])
    parts = {
        k: architecture(OmegaConf.to_container(cfg[k], resolve=True))
        for k in ("vae", "text_encoder")
    }
    parts["data_filters"] = filter_settings(cfg.data)
    if args.no_text:
        text_encoder = None  # latents only: the text encoder runs, and may train, at training time
    else:
        require_frozen(text_encoder)  # training would refuse the cache otherwise
    counts = write_latent_shards(
        urls,
        args.out_dir,
        vae,
        text_encoder,
        image_size=cfg.data.image_size,
        batch_size=args.batch_size,
        flips=args.flips or bool(cfg.data.get("flip", False)),
        dtype=args.dtype,
        device=args.device,
        sources=parts,
        progress=not args.quiet,
        precision=args.precision,
        keep=metadata_filter(parts["data_filters"]),
    )
    print(
        f"cached {counts['written']} samples in {len(counts['shards'])} shard(s) under "
        f"{args.out_dir}; skipped {len(counts['skipped'])} (unreadable or filtered out)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
