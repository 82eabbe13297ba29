"""Aspect-ratio bucketing: batches of one shape each, for fine-tuning sets with mixed shapes.

Buckets follow the Stable Diffusion fine-tuning practice (NovelAI's bucketing, kohya's scripts):
sides are multiples of `step` (64 px keeps the VAE's 8x and the U-Net's further 2^k downsampling
exact), each bucket's area is at most `image_size**2`, and the widest ratio is bounded. An image
goes to the bucket nearest its aspect ratio (in log space, so 2:1 and 1:2 are equally far from
1:1), is scaled to cover it and cropped: little is cropped, nothing is padded.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator


def make_buckets(image_size: int, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) pairs, multiples of `step`, area <= image_size^2, ratio <= max_ratio."""
    if image_size % step:
        raise ValueError(f"image_size {image_size} must be a multiple of the bucket step {step}")
    area, buckets = image_size * image_size, set()
    for w in range(step, int(image_size * math.sqrt(max_ratio)) + step, step):
        h = area // w // step * step  # the tallest side that keeps the area within budget
        if h >= step and max(w / h, h / w) <= max_ratio:
            buckets |= {(w, h), (h, w)}  # mirrored, so portrait and landscape get the same choice
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - ratio))


def bucket_batches(samples: Iterable[dict], batch_size: int, partial: bool) -> Iterator[list[dict]]:
    """Group a stream of samples (each with a `bucket` entry) into single-bucket batches.

    One buffer per bucket; a batch leaves as soon as its bucket fills, so the stream never waits
    for a rare shape. At the end, partial batches are emitted only if `partial`.
    """
    buffers: dict[tuple[int, int], list[dict]] = {}
    for sample in samples:
        buffer = buffers.setdefault(sample["bucket"], [])
        buffer.append(sample)
        if len(buffer) == batch_size:
            yield buffer
            buffers[sample["bucket"]] = []
    if partial:
        yield from (b for b in buffers.values() if b)
