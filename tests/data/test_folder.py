import csv
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.data.folder import FolderError, write_folder_shards

REPO = Path(__file__).resolve().parents[2]


def image_bytes(fmt: str, size=(20, 12), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def read_shards(out: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} over every shard, read with the stdlib (not the writer's code)."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def by_file(samples: dict) -> dict[str, dict]:
    return {json.loads(s["json"])["file_name"]: s for s in samples.values()}


@pytest.fixture
def folder(tmp_path) -> tuple[Path, dict[str, bytes]]:
    """Images with captions from each source, in nested folders, plus two unreadable files."""
    root = tmp_path / "in"
    files = {
        "meta/a.png": image_bytes("PNG", seed=1),
        "meta/b.jpg": image_bytes("JPEG", (33, 17), 2),
        "csv/c.webp": image_bytes("WEBP", seed=3),
        "side/d.jpg": image_bytes("JPEG", seed=4),
        "a_red_cat.png": image_bytes("PNG", seed=5),
        "broken.jpg": b"\xff\xd8\xff not a jpeg",
        "side/truncated.png": image_bytes("PNG")[:60],
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    rows = [
        {"file_name": "a.png", "text": "an apple", "aesthetic": 6.5},
        {"file_name": "b.jpg", "text": "a bee", "aesthetic": 4.0},
    ]
    (root / "meta/metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with (root / "csv/metadata.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["file_name", "text", "punsafe"])
        w.writeheader()
        w.writerow({"file_name": "c.webp", "text": "a cloud, with a comma", "punsafe": "0.01"})
    (root / "side/d.txt").write_text("a dog\n")
    return root, files


def test_shards_read_back_identically_from_every_caption_source(folder, tmp_path):
    root, files = folder
    info = write_folder_shards(root, tmp_path / "out", shard_size=2, progress=False)
    assert info["found"] == 7 and info["written"] == 5 and info["skipped_unreadable"] == 2
    assert sorted(info["unreadable_files"]) == ["broken.jpg", "side/truncated.png"]
    assert info["caption_from"] == {"metadata": 3, "txt": 1, "filename": 1}
    assert info["shards"] == ["00000.tar", "00001.tar", "00002.tar"]
    assert json.loads((tmp_path / "out/_info.json").read_text())["written"] == 5
    stats = [json.loads((tmp_path / f"out/0000{i}_stats.json").read_text()) for i in range(3)]
    assert sum(s["successes"] for s in stats) == 5

    samples = by_file(read_shards(tmp_path / "out"))
    captions = {
        "meta/a.png": "an apple",
        "meta/b.jpg": "a bee",
        "csv/c.webp": "a cloud, with a comma",
        "side/d.jpg": "a dog",
        "a_red_cat.png": "a red cat",
    }
    assert set(samples) == set(captions)
    for name, caption in captions.items():
        s, ext = samples[name], {"png": "png", "jpg": "jpg", "webp": "webp"}[name.rsplit(".", 1)[1]]
        assert s[ext] == files[name]  # the original bytes, untouched
        assert s["txt"].decode() == caption
        meta = json.loads(s["json"])
        w, h = Image.open(io.BytesIO(files[name])).size
        assert (meta["width"], meta["height"], meta["original_width"], meta["original_height"]) == (
            w,
            h,
            w,
            h,
        )
        assert meta["caption"] == caption and meta["status"] == "success"
    assert json.loads(samples["meta/a.png"]["json"])["aesthetic"] == 6.5  # extra columns kept
    assert json.loads(samples["csv/c.webp"]["json"])["punsafe"] == "0.01"


def test_output_is_deterministic_and_reencoding_gives_decodable_images(folder, tmp_path):
    root, _ = folder
    write_folder_shards(root, tmp_path / "o1", shard_size=3, progress=False)
    write_folder_shards(root, tmp_path / "o2", shard_size=3, progress=False)
    for name in ("00000.tar", "00001.tar"):
        assert (tmp_path / "o1" / name).read_bytes() == (tmp_path / "o2" / name).read_bytes()
    write_folder_shards(root, tmp_path / "png", image_format="png", progress=False)
    samples = read_shards(tmp_path / "png")
    assert len(samples) == 5 and all(set(s) == {"png", "json", "txt"} for s in samples.values())
    for s in samples.values():
        assert Image.open(io.BytesIO(s["png"])).mode == "RGB"


def test_reads_back_through_the_training_data_module(folder, tmp_path):
    from ldm.data.modules import ImageTextDataModule

    root, _ = folder
    write_folder_shards(root, tmp_path / "out", shard_size=10, progress=False)
    dm = ImageTextDataModule(
        str(tmp_path / "out/*.tar"),
        str(tmp_path / "out/*.tar"),
        batch_size=8,
        image_size=8,
        num_workers=0,
    )
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (5, 3, 8, 8)
    assert sorted(batch["caption"]) == sorted(
        ["an apple", "a bee", "a cloud, with a comma", "a dog", "a red cat"]
    )


def test_bad_inputs_are_refused_with_a_clear_message(folder, tmp_path):
    root, _ = folder
    with pytest.raises(FolderError, match="does not exist"):
        write_folder_shards(tmp_path / "nowhere", tmp_path / "out", progress=False)
    with pytest.raises(FolderError, match="inside"):
        write_folder_shards(root, root / "shards", progress=False)
    with pytest.raises(FolderError, match="caption column 'caption'"):
        write_folder_shards(root, tmp_path / "out", caption_column="caption", progress=False)
    write_folder_shards(root, tmp_path / "out", progress=False)
    with pytest.raises(FolderError, match="already holds shards"):
        write_folder_shards(root, tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FolderError, match="no image"):
        write_folder_shards(tmp_path / "empty", tmp_path / "out2", progress=False)


def test_command_line_reports_counts(folder, tmp_path):
    root, _ = folder
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "data/folder/prepare.py"),
            str(root),
            str(tmp_path / "out"),
            "--shard-size",
            "4",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert (
        "wrote 5 of 7 images to 2 shard(s)" in run.stdout and "skipped 2 unreadable" in run.stdout
    )
    bad = subprocess.run(
        [
            sys.executable,
            str(REPO / "data/folder/prepare.py"),
            str(tmp_path / "x"),
            str(tmp_path / "y"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1 and "does not exist" in bad.stderr


def test_images_training_would_refuse_are_skipped_with_their_reason(folder, tmp_path):
    """The reader's limits, applied when the shards are made: a huge or extreme header, and a
    file over the member limit (sparse: 65 MiB on paper, nothing on disk), never read whole."""
    root, _ = folder
    (root / "strip.png").write_bytes(image_bytes("PNG", (1, 320)))  # 320:1
    with (root / "huge.png").open("wb") as f:
        f.truncate(65 << 20)
    write_folder_shards(root, tmp_path / "out", shard_size=10, progress=False)
    info = json.loads((tmp_path / "out/_info.json").read_text())
    assert info["found"] == 9 and info["written"] == 5 and info["skipped_unreadable"] == 2
    assert info["skipped_rejected"] == {"bad_aspect": 1, "member_too_large": 1}
    assert info["rejected_files"] == {"bad_aspect": ["strip.png"], "member_too_large": ["huge.png"]}


def test_a_metadata_line_nested_too_deep_is_a_clear_error(folder, tmp_path):
    root, _ = folder
    (root / "meta/metadata.jsonl").write_text("[" * 100_000 + "\n")
    with pytest.raises(FolderError, match="not valid JSON lines"):
        write_folder_shards(root, tmp_path / "out", progress=False)
