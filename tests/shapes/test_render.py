"""Tests for the shapes dataset: palette, captions and the renderer's contract."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from ldm.shapes.render import (
    PALETTE,
    SHAPES,
    caption,
    caption_space,
    parse_caption,
    random_prompts,
    render,
    render_sample,
    sample_rng,
)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int64)


# --------------------------------------------------------------------------
# Palette and captions


def test_palette_and_shapes_are_the_published_contract():
    assert list(PALETTE.items()) == [
        ("red", (220, 40, 40)),
        ("green", (40, 180, 60)),
        ("blue", (40, 70, 220)),
        ("yellow", (235, 210, 50)),
        ("white", (245, 245, 245)),
        ("black", (20, 20, 20)),
        ("orange", (245, 140, 30)),
        ("purple", (140, 60, 190)),
    ]
    assert SHAPES == ("circle", "square", "triangle")


def test_caption_format_and_round_trip():
    assert caption("red", "circle", "blue") == "a red circle on a blue background"
    space = caption_space()
    assert len(space) == len(set(space)) == 8 * 7 * 3
    for text in space:
        assert caption(*parse_caption(text)) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a red circle",
        "a red circle on a red background",
        "a pink circle on a blue background",
        "a red circle on a teal background",
        "a red hexagon on a blue background",
        "A red circle on a blue background",
        "a red circle on a blue background, highly detailed",
    ],
)
def test_parse_caption_rejects_text_outside_the_caption_space(text):
    with pytest.raises(ValueError, match="caption|colour|shape"):
        parse_caption(text)


def test_random_prompts_are_deterministic_and_cover_the_space():
    prompts = random_prompts(2000, seed=1)
    assert prompts == random_prompts(2000, seed=1)
    assert prompts != random_prompts(2000, seed=2)
    assert set(prompts) <= set(caption_space())
    assert len(set(prompts)) > 150  # 168 captions, drawn uniformly
    shape_counts = [sum(parse_caption(p)[1] == s for p in prompts) for s in SHAPES]
    assert min(shape_counts) > 550


# --------------------------------------------------------------------------
# Rendering


def test_render_sample_is_deterministic_per_seed():
    image_a, meta_a = render_sample(sample_rng(5, "train", 17))
    image_b, meta_b = render_sample(sample_rng(5, "train", 17))
    assert meta_a == meta_b
    assert np.array_equal(_pixels(image_a), _pixels(image_b))
    variants = [(6, "train", 17), (5, "val", 17), (5, "train", 18)]
    others = [render_sample(sample_rng(*args))[1] for args in variants]
    assert all(meta != meta_a for meta in others)


def _shape_area(shape: str, size_px: float) -> float:
    radius = size_px / 2
    return {"circle": math.pi, "square": 2.0, "triangle": 3 * math.sqrt(3) / 4}[shape] * radius**2


def _check_sample(image: Image.Image, meta: dict, size: int) -> None:
    pixels = _pixels(image)
    assert image.mode == "RGB" and image.size == (size, size)
    background = np.array(PALETTE[meta["background"]])
    fill = np.array(PALETTE[meta["shape_colour"]])
    assert meta["background"] != meta["shape_colour"]
    assert 0.35 * size <= meta["size_px"] <= 0.70 * size
    # Fully inside: the circumscribed circle fits and the outer ring is background.
    radius = meta["size_px"] / 2
    assert all(radius <= c <= size - radius for c in meta["centre"])
    ring = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    assert (ring == background).all()
    # The pixel holding the centre lies deep inside the shape: exact colour.
    cx, cy = (int(c) for c in meta["centre"])
    assert (pixels[cy, cx] == fill).all()
    # Every pixel is a blend of the two colours (anti-aliased edges only).
    axis = fill - background
    t = np.clip((pixels - background) @ axis / (axis @ axis), 0, 1)
    residual = pixels - (background + t[..., None] * axis)
    assert np.abs(residual).max() <= 1.5  # per-channel rounding
    # Coverage matches the documented geometry: area from size_px, centroid at centre.
    area = t.sum()
    assert area == pytest.approx(_shape_area(meta["shape"], meta["size_px"]), rel=0.03, abs=2)
    ys, xs = np.mgrid[:size, :size]
    centroid = np.array([(t * (xs + 0.5)).sum(), (t * (ys + 0.5)).sum()]) / area
    assert np.allclose(centroid, meta["centre"], atol=0.3)


@pytest.mark.parametrize("size, n", [(64, 200), (32, 50), (128, 30)])
def test_samples_follow_the_contract(size, n):
    seen = set()
    for index in range(n):
        image, meta = render_sample(sample_rng(0, "train", index), size)
        _check_sample(image, meta, size)
        seen.add(meta["shape"])
    assert seen == set(SHAPES)


def test_render_orientation_conventions():
    size = 64
    square = _pixels(render("square", "red", "blue", (32.0, 32.0), 40.0, 0.0, size))
    # Axis-aligned square of side 40 / sqrt(2) = 28.3 spanning x in [17.9, 46.1].
    red_columns = np.nonzero((square[32] == PALETTE["red"]).all(axis=1))[0]
    assert red_columns.min() == 18 and red_columns.max() == 45
    triangle = _pixels(render("triangle", "red", "blue", (32.0, 32.0), 40.0, 0.0, size))
    width = (triangle == PALETTE["red"]).all(axis=2).sum(axis=1)
    # Pointing up: narrow near the top vertex, wide near the bottom edge.
    assert width[32 - 15] < width[32 + 8]
    with pytest.raises(ValueError, match="unknown shape"):
        render("hexagon", "red", "blue", (32.0, 32.0), 40.0, 0.0)
    with pytest.raises(ValueError, match="unknown colour"):
        render("square", "pink", "blue", (32.0, 32.0), 40.0, 0.0)
