"""Tests for the shapes dataset's shards: layout, bytes, webdataset reading, readiness, the
prepare command."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.shapes import dataset
from ldm.shapes.dataset import shard_paths, shards_ready, write_shards
from ldm.shapes.render import caption, render_sample, sample_rng

REPO_ROOT = Path(__file__).resolve().parents[2]


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int64)


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

    real_write = dataset._write_shard
    monkeypatch.setattr(dataset, "_write_shard", failing_shard)
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


def test_the_set_size_is_stated_once():
    """configs/data/shapes.yaml renders the set the module's constants say, as the prepare
    command does by default."""
    from omegaconf import OmegaConf

    prepare = OmegaConf.load(REPO_ROOT / "configs" / "data" / "shapes.yaml").prepare
    stated = (prepare.n_train, prepare.n_val, prepare.size, prepare.shard_size)
    assert stated == (dataset.N_TRAIN, dataset.N_VAL, dataset.SIZE, dataset.SHARD_SIZE)
    spec = importlib.util.spec_from_file_location("prepare", REPO_ROOT / "data/shapes/prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.parse_args(["--out", "x"])
    assert (args.n_train, args.n_val, args.size, args.shard_size) == stated
