"""The one shard writer: layout, rollover, stats, atomicity."""

import io
import json
import tarfile

import pytest

from ldm.fileio import ShardWriter, shard_name


def members(path) -> list[tuple[str, bytes, int, int]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read(), m.mtime, m.mode) for m in tar]


def test_shards_roll_over_with_img2dataset_names_keys_and_stats(tmp_path):
    with ShardWriter(tmp_path, shard_size=2, stats=True) as writer:
        for i in range(5):
            if i == 1:
                writer.skip()  # an unreadable sample: counted in its shard's stats
            key = writer.next_key()
            writer.write(key, {"txt": f"caption {i}".encode(), "png": b"P", "json": b"{}"})
    assert writer.shards == ["00000.tar", "00001.tar", "00002.tar"] and writer.written == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00000.tar",
        "00000_stats.json",
        "00001.tar",
        "00001_stats.json",
        "00002.tar",
        "00002_stats.json",
    ]
    first = members(tmp_path / "00000.tar")
    # webdataset TarWriter's layout: KEY.ext, a sample's extensions sorted; fixed date and mode
    names = ["000000000.json", "000000000.png", "000000000.txt"]
    assert [m[0] for m in first] == names + [n.replace("000000000", "000000001") for n in names]
    assert {(m[2], m[3]) for m in first} == {(0, 0o644)}
    assert members(tmp_path / "00002.tar")[0][0] == "000020000.json"
    stats = json.loads((tmp_path / "00000_stats.json").read_text())
    assert stats["count"] == 3 and stats["successes"] == 2
    assert stats["status_dict"] == {"success": 2, "unreadable": 1}
    assert json.loads((tmp_path / "00001_stats.json").read_text())["status_dict"] == {"success": 2}


def test_the_same_samples_give_the_same_bytes(tmp_path):
    for run in ("a", "b"):
        with ShardWriter(tmp_path / run, first=7) as writer:
            writer.write("k", {"mean.npy": b"\x00" * 100, "txt": b"x"})
    assert (tmp_path / "a" / shard_name(7)).read_bytes() == (tmp_path / "b/00007.tar").read_bytes()


def test_a_shard_appears_only_whole_and_an_error_removes_the_open_one(tmp_path):
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, shard_size=2) as writer:
        writer.write("a", {"txt": b"a"})
        assert not (tmp_path / "00000.tar").exists()  # open under a hidden name
        writer.write("b", {"txt": b"b"})
        assert (tmp_path / "00000.tar").is_file()  # complete: renamed into place
        writer.write("c", {"txt": b"c"})
        raise RuntimeError("cut short")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.tar"]


def test_an_empty_writer_writes_nothing_unless_asked(tmp_path):
    with ShardWriter(tmp_path / "none", stats=True):
        pass
    assert not (tmp_path / "none").exists() or not any((tmp_path / "none").iterdir())
    with ShardWriter(tmp_path / "one", first=3, keep_empty=True) as writer:
        pass
    assert writer.shards == ["00003.tar"]
    with tarfile.open(fileobj=io.BytesIO((tmp_path / "one/00003.tar").read_bytes())) as tar:
        assert tar.getmembers() == []
