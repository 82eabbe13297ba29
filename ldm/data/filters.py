"""Sample filters on img2dataset metadata (`KEY.json`), and the kept/rejected counters.

Pure functions: a filter reads one metadata dict and returns the reason it rejects the sample,
or None. The reasons form a fixed set, so every counter dict has the same keys on every rank
and worker (a sum across DDP ranks then lines up, and never waits on a key one rank lacks).
"""

from __future__ import annotations

import json
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
    "bad_metadata",  # KEY.json that does not parse (or too big, too deep, not an object), or a
    # field a filter needs that is not a number
    "too_many_pixels",  # an image whose header claims more pixels than the limit
    "bad_aspect",  # an image whose header claims too extreme a shape (long / short side)
    "member_too_large",  # a tar member over the size limit (skipped unread, with its sample)
)
# img2dataset's KEY.json is ~1 KB, a few KB with every parquet column kept: a bigger one is not
# metadata, and JSON parsing a hostile one is time and memory spent for nothing.
MAX_JSON_BYTES = 1 << 20


# LAION-aesthetic parquet columns arrive as either name, depending on the release
AESTHETIC_NAMES = ("aesthetic", "AESTHETIC_SCORE", "aesthetic_score")


class _NotANumber(ValueError):
    """A metadata field a filter needs holds something other than a number."""


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


def parse_metadata(data: bytes | str | None) -> dict | None:
    """KEY.json's object ({} without one), or None for one that is not: bad JSON, over
    MAX_JSON_BYTES, nested deeper than the parser's recursion limit, or not an object."""
    if data is None:
        return {}
    if len(data) > MAX_JSON_BYTES:
        return None
    try:
        meta = json.loads(data)
    except (ValueError, RecursionError):  # "[" * 100000 is a RecursionError, not a ValueError
        return None
    return meta if isinstance(meta, dict) else None


def _number(name: str, value) -> float:
    """A JSON number, or a number written as text (a CSV column kept in the json, as the folder
    tool keeps them); anything else (text, a list, an object, true) is not one."""
    if isinstance(value, str) and len(value) <= 64:
        try:
            return float(value)
        except ValueError:
            pass
    elif isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an int of hundreds of digits
            pass
    raise _NotANumber(f"{name} = {str(value)[:40]!r}")


def _first(meta: dict, *names: str) -> float | None:
    for name in names:
        value = _number(name, meta[name]) if meta.get(name) is not None else None
        if value is not None and value == value:  # NaN (a blank parquet cell) counts as absent
            return value
    return None


def original_size(meta: dict) -> tuple[float | None, float | None]:
    """(width, height) before img2dataset resized: `original_*`, else the stored `width/height`."""
    return _first(meta, "original_width", "width"), _first(meta, "original_height", "height")


def aesthetic_score(meta: dict) -> float | None:
    return _first(meta, *AESTHETIC_NAMES)


def rejection_reason(meta: dict, f: MetadataFilter) -> str | None:
    """The first filter that rejects `meta`, as one of REASONS; None keeps the sample. A field
    is read only when its filter is set, so a broken field no filter needs is harmless."""
    at_least, at_most = (lambda v, t: v >= t), (lambda v, t: v <= t)
    checks = (  # (threshold, field names (the first present is read), passes, reason)
        (f.min_width, ("original_width", "width"), at_least, "too_small"),
        (f.min_height, ("original_height", "height"), at_least, "too_small"),
        (f.min_aesthetic, AESTHETIC_NAMES, at_least, "low_aesthetic"),
        (f.max_punsafe, ("punsafe",), at_most, "unsafe"),
        (f.max_pwatermark, ("pwatermark",), at_most, "watermark"),
        (f.min_similarity, ("similarity",), at_least, "low_similarity"),
    )
    for threshold, names, passes, reason in checks:
        if threshold is None:
            continue
        try:
            value = _first(meta, *names)
        except _NotANumber:
            return "bad_metadata"
        if value is None:
            return "missing_metadata"
        if not passes(value, threshold):
            return reason
    return None
