"""Sample filters on img2dataset metadata (`KEY.json`), and the kept/rejected counters.

Pure functions: a filter reads one metadata dict and returns the reason it rejects the sample,
or None. The reasons form a fixed set, so every counter dict has the same keys on every rank
and worker (a sum across DDP ranks then lines up, and never waits on a key one rank lacks).
"""

from __future__ import annotations

from dataclasses import dataclass

# Why a sample or a shard was skipped; `data/rejected/<reason>` in the logs.
REASONS = (
    "too_small",  # original width/height under the minimum
    "low_aesthetic",  # aesthetic score under the minimum
    "unsafe",  # punsafe over the maximum
    "watermark",  # pwatermark over the maximum
    "low_similarity",  # CLIP image-text similarity under the minimum
    "missing_metadata",  # a filter is set but the sample's json lacks its field
    "no_image",  # no image file in the sample
    "bad_image",  # an image file that PIL cannot decode (corrupt, empty, truncated)
    "no_caption",  # caption missing or empty
    "shard_unreadable",  # a shard that cannot be opened or is not a tar (counted per shard)
    "shard_truncated",  # a shard that ends mid-file (the samples before the cut are kept)
)


@dataclass(frozen=True)
class MetadataFilter:
    """Thresholds on img2dataset metadata; None switches a filter off."""

    min_width: int | None = None
    min_height: int | None = None
    min_aesthetic: float | None = None
    max_punsafe: float | None = None
    max_pwatermark: float | None = None
    min_similarity: float | None = None

    @property
    def active(self) -> bool:
        return any(v is not None for v in vars(self).values())


def new_counts() -> dict[str, int]:
    return {"kept": 0, **{f"rejected/{r}": 0 for r in REASONS}}


def add_counts(total: dict[str, int], more: dict[str, int]) -> dict[str, int]:
    for k, v in more.items():
        total[k] = total.get(k, 0) + v
    return total


def _first(meta: dict, *names: str) -> float | None:
    for name in names:
        value = meta.get(name)
        if value is not None and value == value:  # NaN (a blank parquet cell) counts as absent
            return float(value)
    return None


def original_size(meta: dict) -> tuple[float | None, float | None]:
    """(width, height) before img2dataset resized: `original_*`, else the stored `width/height`."""
    return _first(meta, "original_width", "width"), _first(meta, "original_height", "height")


def aesthetic_score(meta: dict) -> float | None:
    # LAION-aesthetic parquet columns arrive as either name, depending on the release
    return _first(meta, "aesthetic", "AESTHETIC_SCORE", "aesthetic_score")


def rejection_reason(meta: dict, f: MetadataFilter) -> str | None:
    """The first filter that rejects `meta`, as one of REASONS; None keeps the sample."""
    width, height = original_size(meta)
    checks = (  # (threshold, value, passes, reason)
        (f.min_width, width, lambda v, t: v >= t, "too_small"),
        (f.min_height, height, lambda v, t: v >= t, "too_small"),
        (f.min_aesthetic, aesthetic_score(meta), lambda v, t: v >= t, "low_aesthetic"),
        (f.max_punsafe, _first(meta, "punsafe"), lambda v, t: v <= t, "unsafe"),
        (f.max_pwatermark, _first(meta, "pwatermark"), lambda v, t: v <= t, "watermark"),
        (f.min_similarity, _first(meta, "similarity"), lambda v, t: v >= t, "low_similarity"),
    )
    for threshold, value, passes, reason in checks:
        if threshold is None:
            continue
        if value is None:
            return "missing_metadata"
        if not passes(value, threshold):
            return reason
    return None
