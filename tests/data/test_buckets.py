import pytest
import torch
from PIL import Image

from ldm.data.buckets import bucket_batches, make_buckets, nearest_bucket
from ldm.data.transforms import ImageTransform

pytestmark = pytest.mark.usefixtures("single_thread")  # tensor ops stall on busy shared cores


def test_buckets_are_64_px_multiples_of_near_equal_area_both_orientations():
    for size in (256, 512, 1024):
        buckets = make_buckets(size)
        assert (size, size) in buckets
        for w, h in buckets:
            assert w % 64 == 0 and h % 64 == 0
            assert 0.9 * size**2 <= w * h <= size**2 and max(w / h, h / w) <= 2
            assert (h, w) in buckets
    assert make_buckets(512) == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]


def test_images_go_to_the_bucket_of_nearest_aspect_ratio():
    buckets = make_buckets(512)
    assert nearest_bucket(1000, 1000, buckets) == (512, 512)
    assert nearest_bucket(1600, 900, buckets) == (640, 384)  # 16:9 -> 5:3
    assert nearest_bucket(900, 1600, buckets) == (384, 640)
    assert nearest_bucket(1300, 1000, buckets) == (576, 448)


def test_each_batch_comes_from_one_bucket_and_a_bucket_leaves_when_full():
    shapes = [(1, 1), (2, 1), (1, 1), (2, 1), (1, 1), (1, 2)]
    batches = list(bucket_batches(({"bucket": s, "i": i} for i, s in enumerate(shapes)), 2, True))
    assert [[s["i"] for s in b] for b in batches] == [[0, 2], [1, 3], [4], [5]]
    assert [
        [s["i"] for s in b]
        for b in bucket_batches(({"bucket": s, "i": i} for i, s in enumerate(shapes)), 2, False)
    ] == [[0, 2], [1, 3]]


def test_transform_covers_and_crops_to_a_bucket():
    image = Image.new("RGB", (300, 100), (255, 255, 255))
    out = ImageTransform(64)(image, (128, 64))
    assert out.shape == (3, 64, 128)
    torch.testing.assert_close(out, torch.ones(3, 64, 128))
