"""The data options: how image-text shards are read, said once.

The data modules take them as flat keys (`data.image_size`, `data.max_pixels`, ... in
configs/data/*.yaml) and build a `DataOptions` once; the readers (`ldm.data.webdataset`, the
latent cache's) receive it whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ldm.data.buckets import make_buckets
from ldm.data.filters import MetadataFilter
from ldm.data.images import MAX_ASPECT, MAX_PIXELS, ImageLimits
from ldm.data.shards import MAX_MEMBER_BYTES
from ldm.data.transforms import ImageTransform


@dataclass(frozen=True)
class DataOptions:
    """How samples are read, checked, ordered and made into images.

    Args:
        image_size: the side of a training image (a bucket's area with `bucketing`).
        random_crop / flip: augmentations (a latent cache holds one centre crop, and mirrored
            latents only when made with flips).
        draft: let a large JPEG decode at a reduced scale first (`ImageTransform`).
        mode: "stream" (resampled shards, LAION scale), "exact" (each sample once per epoch) or
            "once" (validation: each sample once, in order).
        shuffle_buffer: samples a stream shuffles among.
        filters: a `MetadataFilter` (or its fields as a dict; None: none) applied to `KEY.json`.
        caption_key: `txt` reads `KEY.txt`; another name reads that file or json field.
        skip_empty_captions: reject a sample without a caption (`no_caption`).
        bucketing / bucket_step / bucket_max_ratio: aspect-ratio buckets around image_size^2
            ("stream" mode).
        seed: the stream's draws and an exact epoch's permutation.
        drop_remainder: an exact epoch drops its last partial global batch (else pads it).
        max_pixels / max_aspect: the most pixels, and the most extreme long/short side ratio,
            an image's header may claim; others are skipped and counted (`too_many_pixels`,
            `bad_aspect`) before any decoding (see `ldm.data.images` for the defaults).
        max_member_bytes: the largest tar member read; a sample with a larger one is skipped
            and counted (`member_too_large`) without reading it.
    """

    image_size: int
    random_crop: bool = False
    flip: bool = False
    draft: bool = True
    mode: str = "stream"
    shuffle_buffer: int = 1000
    filters: MetadataFilter = field(default_factory=MetadataFilter)
    caption_key: str = "txt"
    skip_empty_captions: bool = True
    bucketing: bool = False
    bucket_step: int = 64
    bucket_max_ratio: float = 2.0
    seed: int = 0
    drop_remainder: bool = False
    max_pixels: int = MAX_PIXELS
    max_aspect: float = MAX_ASPECT
    max_member_bytes: int = MAX_MEMBER_BYTES

    def __post_init__(self) -> None:
        if not isinstance(self.filters, MetadataFilter):  # None, or fields from a config
            object.__setattr__(self, "filters", MetadataFilter(**(self.filters or {})))
        self.buckets  # noqa: B018 - an image size the bucket step does not divide: said now

    def transform(self) -> ImageTransform:
        return ImageTransform(
            self.image_size, random_crop=self.random_crop, flip=self.flip, draft=self.draft
        )

    @property
    def buckets(self) -> list[tuple[int, int]] | None:
        if not self.bucketing:
            return None
        return make_buckets(self.image_size, self.bucket_step, self.bucket_max_ratio)

    @property
    def image_limits(self) -> ImageLimits:
        return ImageLimits(self.max_pixels, self.max_aspect)
