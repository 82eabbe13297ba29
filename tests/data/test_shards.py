import io
import json
import logging
import tracemalloc

import fsspec
import pytest

from ldm.data import shards
from ldm.data.shards import (
    DataError,
    dealt_batches,
    expand_shards,
    parse_sources,
    rank_part,
    read_shard,
    read_stats_count,
    split_key,
    worker_batches,
)
from tests.data.shard_helpers import (
    sample,
    write_keyed_shards,
    write_shard,
    write_sparse_shard,
)


@pytest.mark.parametrize("n, batch, world", [(15, 2, 2), (16, 2, 2), (3, 1, 4), (101, 4, 3)])
def test_dealt_batches_give_each_sample_once_and_every_rank_equal_batches(n, batch, world):
    for drop in (False, True):
        batches = dealt_batches(n, 0, 0, batch, world, drop_remainder=drop)
        parts = [[rank_part(b, r, world) for b in batches] for r in range(world)]
        flat = [i for b in batches for i in b]
        for b in batches:  # each rank an equal share of every batch
            assert len({len(rank_part(b, r, world)) for r in range(world)}) == 1
            assert sorted(i for r in range(world) for i in rank_part(b, r, world)) == sorted(b)
        assert len({len(p) for p in parts}) == 1
        if drop:
            assert len(flat) == n // (batch * world) * batch * world
            assert len(set(flat)) == len(flat) and all(len(b) == batch * world for b in batches)
        else:
            assert set(flat) == set(range(n)) and len(flat) == -(-n // world) * world
            assert max(flat.count(i) for i in flat) <= (1 if n % world == 0 else 2 + world // n)


def test_a_global_batch_holds_the_same_samples_whatever_the_number_of_ranks():
    one = dealt_batches(40, 3, 7, 8, 1)
    for world in (2, 4, 8):
        many = dealt_batches(40, 3, 7, 8 // world, world)
        assert [sorted(b) for b in many] == [sorted(b) for b in one]
        # rank r's slices, concatenated over ranks, are the one process's batch in order
        assert [[i for r in range(world) for i in rank_part(b, r, world)] for b in many] == one


def test_dealt_batches_reshuffle_each_epoch_and_are_seeded():
    a, b = dealt_batches(50, 0, 0, 5, 2), dealt_batches(50, 1, 0, 5, 2)
    assert a != b and a == dealt_batches(50, 0, 0, 5, 2) and a != dealt_batches(50, 0, 1, 5, 2)
    assert [i for x in dealt_batches(7, 0, 0, 2, 1, shuffle=False) for i in x] == list(range(7))


@pytest.mark.parametrize("workers, skip", [(1, 0), (2, 0), (3, 5), (2, 9), (4, 11)])
def test_workers_make_every_batch_once_and_a_resume_skips_the_trained_ones(workers, skip):
    made = sorted(t for w in range(workers) for t in worker_batches(11, w, workers, skip))
    assert made == list(range(skip, 11))
    for w in range(workers):  # round-robin from worker 0: the batches the loader asks it for
        assert all((t - skip) % workers == w for t in worker_batches(11, w, workers, skip))


def test_keys_follow_webdataset_naming():
    assert split_key("000001.jpg") == ("000001", "jpg")
    assert split_key("dir/a.b.JSON") == ("dir/a", "b.json")


@pytest.mark.parametrize(
    "cut_at, whole",
    [
        (19000, ["b0", "b1"]),  # inside b2.txt's header
        (21500, ["b0", "b1", "b2"]),
    ],
)  # inside b3.png's data
def test_truncated_and_unreadable_shards_are_skipped_and_counted(tmp_path, caplog, cut_at, whole):
    good = write_shard(tmp_path / "00000.tar", [sample(f"{i:09d}") for i in range(6)])
    big = write_shard(
        tmp_path / "big.tar", [(f"b{i}", {"png": bytes(5000), "txt": b"x"}) for i in range(6)]
    )
    cut = tmp_path / "00001.tar"
    cut.write_bytes(big.read_bytes()[:cut_at])  # 6656 bytes a sample: 512 + 5120 + 512 + 512
    junk = tmp_path / "00002.tar"
    junk.write_bytes(b"\x00\x01 this is not a tar" * 40)
    counts = []
    with caplog.at_level(logging.WARNING):
        keys = [
            s["__key__"] for url in (cut, junk, good) for s in read_shard(str(url), counts.append)
        ]
    assert counts == ["shard_truncated", "shard_unreadable"]
    assert keys == whole + [f"{i:09d}" for i in range(6)]  # the sample cut in two is dropped
    assert str(cut) in caplog.text and str(junk) in caplog.text
    missing = list(read_shard("http://127.0.0.1:9/00000.tar", counts.append))
    assert missing == [] and counts[-1] == "shard_unreadable"


def test_remote_patterns_glob_and_read_through_fsspec(tmp_path):
    write_shard(tmp_path / "a.tar", [sample("k0"), sample("k1")])
    fs = fsspec.filesystem("memory")
    for i in range(3):
        fs.pipe(f"/shards/{i:05d}.tar", (tmp_path / "a.tar").read_bytes())
    urls = expand_shards("memory://shards/*.tar")
    assert urls == [f"memory:///shards/{i:05d}.tar" for i in range(3)]
    assert [s["__key__"] for s in read_shard(urls[1], print)] == ["k0", "k1"]


def test_pipe_and_file_urls_read(tmp_path):
    shard = write_shard(tmp_path / "00000.tar", [sample("k0"), sample("k1")])
    for url in (f"pipe:cat {shard}", f"file://{shard}"):
        assert [s["__key__"] for s in read_shard(url, print)] == ["k0", "k1"]
    assert expand_shards(f"pipe:cat {tmp_path}/{{00000..00001}}.tar") == [
        f"pipe:cat {tmp_path}/00000.tar",
        f"pipe:cat {tmp_path}/00001.tar",
    ]


def test_mixing_sources_expand_with_normalised_weights(tmp_path):
    write_keyed_shards(tmp_path, [1, 1, 1], prefix="a")
    write_keyed_shards(tmp_path, [1, 1], prefix="b")
    spec = [
        {"urls": str(tmp_path / "a{00000..00002}.tar"), "weight": 0.7},
        {"urls": [str(tmp_path / "b*.tar")], "weight": 0.3},
    ]
    sources, weights = parse_sources(spec)
    assert [len(s) for s in sources] == [3, 2] and weights == pytest.approx([0.7, 0.3])
    assert len(expand_shards(spec)) == 5
    assert parse_sources(str(tmp_path / "*.tar"))[1] == [1.0]
    with pytest.raises(DataError, match="weights"):
        parse_sources([{"urls": str(tmp_path / "a*.tar"), "weight": 0}])


def test_dataset_size_from_img2dataset_stats_never_required(tmp_path):
    urls = [
        str(p) for p in (write_shard(tmp_path / f"{i:05d}.tar", [sample("k")]) for i in range(2))
    ]
    assert read_stats_count(urls) is None
    for i, n in enumerate((9, 7)):
        (tmp_path / f"{i:05d}_stats.json").write_text(json.dumps({"successes": n, "failed": 1}))
    assert read_stats_count(urls) == 16
    for bad in ('{"successes": "many"}', "[1]", "{oops", '{"successes": -3}', "[" * 100_000):
        (tmp_path / "00001_stats.json").write_text(bad)
        assert read_stats_count(urls) is None  # a hint gone bad: the size is unknown, no crash


def test_a_member_over_the_size_limit_is_skipped_unread_with_its_sample(
    tmp_path, monkeypatch, caplog
):
    """A 10 KB sparse tar claiming a 1 GiB member: the sample is counted and the rest read, with
    neither the member's bytes read from the file nor memory spent on them."""
    shard = write_sparse_shard(
        tmp_path / "00000.tar",
        [sample("k0"), ("huge", {"png": 1 << 30, "txt": b"x", "json": b"{}"}), sample("k1")],
    )
    assert shard.stat().st_blocks * 512 < 1 << 20  # a hole, not a GiB on disk
    read = []

    class Counting(io.FileIO):
        def readinto(self, buffer):
            n = super().readinto(buffer)
            read.append(n)
            return n

    monkeypatch.setattr(shards, "open_shard", lambda url: io.BufferedReader(Counting(url)))
    counts = []
    tracemalloc.start()
    with caplog.at_level(logging.WARNING):
        keys = [s["__key__"] for s in read_shard(str(shard), counts.append)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert keys == ["k0", "k1"] and counts == ["member_too_large"]
    assert sum(read) < 1 << 20 and peak < 8 << 20
    assert "huge" in caplog.text and "member_too_large" in caplog.text


def test_a_stream_reads_past_a_member_over_the_limit_in_bounded_memory(tmp_path):
    shard = write_sparse_shard(
        tmp_path / "00000.tar", [sample("k0"), ("huge", {"png": 96 << 20}), sample("k1")]
    )
    counts = []
    tracemalloc.start()
    keys = [s["__key__"] for s in read_shard(f"pipe:cat {shard}", counts.append, 1 << 20)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert keys == ["k0", "k1"] and counts == ["member_too_large"] and peak < 8 << 20
