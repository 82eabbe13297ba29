"""A latent cache with aspect-ratio buckets: each image cached at the bucket the image reader
would cut it to, streamed in batches of one shape, its micro-conditioning's target the bucket."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.buckets import nearest_bucket
from ldm.data.latents import (
    CacheError,
    cached_extras,
    check_data_settings,
    make_latent_dataset,
    read_cache_metadata,
)
from ldm.data.latents_write import write_latent_shards
from ldm.data.options import DataOptions
from ldm.data.transforms import ImageTransform
from tests.data.shard_helpers import image_bytes, write_shard
from tests.sd_fixtures import sdxl_parts

SIZE = 64
BUCKETED = DataOptions(SIZE, bucketing=True, bucket_step=32, bucket_max_ratio=3.0)
SHAPES = {
    "wide0": (200, 70),
    "wide1": (190, 64),
    "tall0": (60, 170),
    "sq0": (80, 82),
    "sq1": (64, 64),
}


def picture(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def bucketed(tmp_path_factory, single_thread):
    root = tmp_path_factory.mktemp("buckets")
    samples = [
        (key, {"png": image_bytes(picture(w, h, i)), "txt": key.encode(), "json": b"{}"})
        for i, (key, (w, h)) in enumerate(SHAPES.items())
    ]
    src = write_shard(root / "src.tar", samples)
    parts = sdxl_parts()
    write_latent_shards(
        [str(src)],
        root / "cache",
        parts["vae"],
        parts["text_encoder"],
        image_size=SIZE,
        batch_size=4,
        dtype="float32",
        progress=False,
        precision="32-true",
        buckets=BUCKETED.buckets,
    )
    return root, parts


def test_each_image_is_cached_at_its_bucket_and_streamed_in_batches_of_one_shape(bucketed):
    root, parts = bucketed
    urls = [str(root / "cache/00000.tar")]
    meta, empty = read_cache_metadata(urls)
    assert [tuple(b) for b in meta["buckets"]] == BUCKETED.buckets == [(32, 96), (64, 64), (96, 32)]
    check_data_settings(meta, BUCKETED)
    ds = make_latent_dataset(urls, empty, 2, True, BUCKETED, 24, cached_extras(meta))
    seen = {}
    for batch in ds:
        assert len({tuple(m.shape) for m in batch["latent_mean"]}) == 1
        for i, key in enumerate(batch["key"]):
            seen[key] = (batch["latent_mean"][i], batch["time_ids"][i])
    assert set(seen) == set(SHAPES)  # every one (resampled: tall0 pairs with itself)
    transform = ImageTransform(SIZE)
    for key, (mean, ids) in seen.items():
        w, h = SHAPES[key]
        bw, bh = nearest_bucket(w, h, BUCKETED.buckets)
        image, (top, left), _ = transform.apply(picture(w, h, list(SHAPES).index(key)), (bw, bh))
        with torch.no_grad():
            expected = parts["vae"].posterior(image[None]).mean[0]
        torch.testing.assert_close(mean, expected, atol=1e-5, rtol=1e-5)
        assert ids.tolist() == [h, w, top, left, bh, bw]


def test_bucket_settings_must_match_the_cache(bucketed):
    root, _ = bucketed
    meta = json.loads((root / "cache/_latents.json").read_text())
    with pytest.raises(CacheError, match="with aspect-ratio buckets"):
        check_data_settings(meta, DataOptions(SIZE))
    with pytest.raises(CacheError, match="bucket_max_ratio=2.0"):
        check_data_settings(meta, DataOptions(SIZE, bucketing=True, bucket_step=32))
    unbucketed = {**meta, "buckets": None}
    with pytest.raises(CacheError, match="without aspect-ratio buckets"):
        check_data_settings(unbucketed, BUCKETED)
