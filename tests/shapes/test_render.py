"""Tests for the shapes dataset: renderer contract, captions and shards."""

from __future__ import annotations

import importlib.util
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.shapes import render as shapes
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
    shard_paths,
    shards_ready,
    write_shards,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


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


# --------------------------------------------------------------------------
# Shards


def _tree_bytes(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


SMALL = dict(n_train=25, n_val=10, size=32, seed=3, shard_size=10, progress=False)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("shards") / "out", workers=1, **SMALL)


def test_shard_layout(shard_dir):
    files = sorted(str(p.relative_to(shard_dir)) for p in shard_dir.rglob("*") if p.is_file())
    assert files == [
        "_info.json",
        "train/00000.tar",
        "train/00000_stats.json",
        "train/00001.tar",
        "train/00001_stats.json",
        "train/00002.tar",
        "train/00002_stats.json",
        "val/00000.tar",
        "val/00000_stats.json",
    ]
    stats = json.loads((shard_dir / "train" / "00002_stats.json").read_text())
    assert stats["count"] == stats["successes"] == 5
    assert shard_paths(shard_dir, "val") == [shard_dir / "val" / "00000.tar"]


def test_shards_are_byte_identical_across_runs_and_workers(shard_dir, tmp_path):
    again = write_shards(tmp_path / "again", workers=2, **SMALL)
    assert _tree_bytes(again) == _tree_bytes(shard_dir)
    other = write_shards(tmp_path / "other", workers=1, **{**SMALL, "seed": 4})
    assert _tree_bytes(other)["train/00000.tar"] != _tree_bytes(shard_dir)["train/00000.tar"]


def test_shards_read_with_webdataset(shard_dir):
    import webdataset

    urls = [str(p) for p in shard_paths(shard_dir, "train")]
    samples = list(webdataset.WebDataset(urls, shardshuffle=False))
    assert len(samples) == 25
    for index, sample in enumerate(samples):
        key = f"{index // 10:05d}{index % 10:04d}"
        assert sample["__key__"] == key
        record = json.loads(sample["json"])
        text = sample["txt"].decode()
        assert record["key"] == key and record["status"] == "success"
        expected_caption = caption(record["shape_colour"], record["shape"], record["background"])
        assert record["caption"] == text == expected_caption
        assert record["width"] == record["height"] == record["original_width"] == 32
        image = Image.open(io.BytesIO(sample["png"]))
        expected, meta = render_sample(sample_rng(3, "train", index), 32)
        assert meta["shape"] == record["shape"] and meta["size_px"] == record["size_px"]
        assert np.array_equal(_pixels(image), _pixels(expected))


def test_shards_ready_checks_settings(shard_dir, tmp_path):
    args = dict(n_train=25, n_val=10, size=32, seed=3)
    assert shards_ready(shard_dir, **args)
    for change in [{"n_train": 26}, {"n_val": 9}, {"size": 64}, {"seed": 0}]:
        assert not shards_ready(shard_dir, **{**args, **change})
    assert not shards_ready(tmp_path / "missing", **args)


def test_interrupted_write_leaves_previous_set_intact(tmp_path, monkeypatch):
    out = write_shards(tmp_path / "out", workers=1, **SMALL)
    before = _tree_bytes(out)
    calls = []

    def failing_shard(job):
        calls.append(job)
        if len(calls) > 1:
            raise RuntimeError("interrupted")
        return real_write(job)

    real_write = shapes._write_shard
    monkeypatch.setattr(shapes, "_write_shard", failing_shard)
    with pytest.raises(RuntimeError, match="interrupted"):
        write_shards(out, workers=1, **{**SMALL, "seed": 9})
    with pytest.raises(RuntimeError, match="interrupted"):
        write_shards(tmp_path / "fresh", workers=1, **SMALL)
    assert _tree_bytes(out) == before
    assert shards_ready(out, 25, 10, 32, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary or partial sets


def test_rewrite_replaces_set(tmp_path):
    out = write_shards(tmp_path / "out", workers=1, **SMALL)
    write_shards(out, workers=1, **{**SMALL, "seed": 4})
    assert shards_ready(out, 25, 10, 32, 4) and not shards_ready(out, 25, 10, 32, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_prepare_cli(tmp_path, capsys):
    path = REPO_ROOT / "data" / "shapes" / "prepare.py"
    spec = importlib.util.spec_from_file_location("shapes_prepare", path)
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    assert prepare.DEFAULT_OUT == REPO_ROOT / "data" / "shapes" / "shards"
    argv = [
        "--out",
        str(tmp_path / "s"),
        "--n-train",
        "3",
        "--n-val",
        "2",
        "--size",
        "32",
        "--workers",
        "1",
        "--quiet",
    ]
    assert prepare.main(argv) == 0
    assert shards_ready(tmp_path / "s", 3, 2, 32, 0)
    assert prepare.main(argv) == 0
    assert "already ready" in capsys.readouterr().out
