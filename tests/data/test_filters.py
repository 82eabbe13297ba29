import math

import pytest

from ldm.data.filters import (
    MAX_JSON_BYTES,
    REASONS,
    MetadataFilter,
    add_counts,
    new_counts,
    parse_metadata,
    rejection_reason,
)

LAION = {
    "original_width": 640,
    "original_height": 480,
    "width": 256,
    "height": 256,
    "aesthetic": 5.5,
    "punsafe": 0.05,
    "pwatermark": 0.2,
    "similarity": 0.31,
}


@pytest.mark.parametrize(
    "f, reason",
    [
        (MetadataFilter(), None),
        (
            MetadataFilter(
                min_width=640,
                min_height=480,
                min_aesthetic=5.5,
                max_punsafe=0.05,
                max_pwatermark=0.2,
                min_similarity=0.31,
            ),
            None,
        ),  # thresholds are inclusive
        (MetadataFilter(min_width=641), "too_small"),
        (
            MetadataFilter(min_height=512),
            "too_small",
        ),  # the original size counts, not the stored 256
        (MetadataFilter(min_aesthetic=6.0), "low_aesthetic"),
        (MetadataFilter(max_punsafe=0.01), "unsafe"),
        (MetadataFilter(max_pwatermark=0.1), "watermark"),
        (MetadataFilter(min_similarity=0.32), "low_similarity"),
    ],
)
def test_each_threshold_rejects_with_its_reason(f, reason):
    assert rejection_reason(LAION, f) == reason


def test_stored_size_stands_in_for_a_missing_original_and_both_aesthetic_names_count():
    f = MetadataFilter(min_width=300, min_aesthetic=6)
    assert rejection_reason({"width": 256, "AESTHETIC_SCORE": 7}, f) == "too_small"
    assert rejection_reason({"width": 512, "AESTHETIC_SCORE": 5}, f) == "low_aesthetic"
    assert rejection_reason({"width": 512, "AESTHETIC_SCORE": 7}, f) is None


def test_a_set_filter_whose_field_is_missing_or_nan_rejects_as_missing_metadata():
    f = MetadataFilter(max_punsafe=0.5)
    assert rejection_reason({}, f) == "missing_metadata"
    assert rejection_reason({"punsafe": math.nan}, f) == "missing_metadata"
    assert rejection_reason({"punsafe": None}, f) == "missing_metadata"
    assert not MetadataFilter().active and f.active


def test_counts_have_one_fixed_key_set_and_add_up():
    a, b = new_counts(), new_counts()
    assert sorted(a) == sorted(["kept"] + [f"rejected/{r}" for r in REASONS])
    a["kept"], b["kept"], b["rejected/unsafe"] = 2, 3, 1
    assert add_counts(a, b) == {**new_counts(), "kept": 5, "rejected/unsafe": 1}


@pytest.mark.parametrize("value", ["high", "0.9 or so", [0.9], {"v": 0.9}, True, 10**400])
def test_a_field_a_filter_needs_that_is_not_a_number_rejects_as_bad_metadata(value):
    f = MetadataFilter(max_punsafe=0.5)
    assert rejection_reason({"punsafe": value}, f) == "bad_metadata"
    assert rejection_reason({"punsafe": value}, MetadataFilter(min_width=1)) == "missing_metadata"
    assert rejection_reason({"punsafe": value, "width": 4}, MetadataFilter(min_width=1)) is None


def test_metadata_that_is_not_a_json_object_parses_to_none_never_raises():
    assert parse_metadata(b'{"a": 1}') == {"a": 1} and parse_metadata(None) == {}
    for bad in (b"{not json", b"[1, 2]", b"null", b"[" * 100_000, b"{" * 100_000, b"\xff\xfe"):
        assert parse_metadata(bad) is None
    assert parse_metadata(b'{"a": "' + b"x" * MAX_JSON_BYTES + b'"}') is None  # too big


def test_a_number_written_as_text_is_a_number():  # CSV columns, as the folder tool keeps them
    f = MetadataFilter(max_punsafe=0.5)
    assert rejection_reason({"punsafe": "0.01"}, f) is None
    assert rejection_reason({"punsafe": " 0.9 "}, f) == "unsafe"
    assert rejection_reason({"punsafe": "nan"}, f) == "missing_metadata"
