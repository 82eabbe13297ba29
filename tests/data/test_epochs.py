"""Exact epochs and streaming epochs across ranks and workers: no sample lost, no rank short.

The fast tests run real dataloader workers and simulate ranks by passing rank/world_size (what
torch.distributed would give); the slow one runs 2 gloo ranks x 2 workers for real.
"""

import collections
import logging
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ldm.data.modules import ImageTextDataModule
from ldm.data.options import DataOptions
from ldm.data.webdataset import EpochLoader, make_dataset
from tests.data.shard_helpers import write_keyed_shards

pytestmark = pytest.mark.usefixtures("single_thread")  # tensor ops stall on busy shared cores

UNEVEN = [7, 3, 12, 1, 5]  # 28 samples in 5 shards of very different sizes


def rank_batches(root, rank, world, mode, epochs=1, workers=2, batches_per_epoch=None, **kw):
    ds = make_dataset(
        str(root / "*.tar"),
        DataOptions(8, shuffle_buffer=4, mode=mode, **kw),
        3,
        True,
        batches_per_epoch,
        rank=rank,
        world_size=world,
        num_workers=workers,
    )
    loader = EpochLoader(ds, workers)
    return [list(loader) for _ in range(epochs)]


def test_exact_epochs_read_every_key_once_across_ranks_and_workers(tmp_path):
    keys = write_keyed_shards(tmp_path, UNEVEN)
    per_rank = [rank_batches(tmp_path, r, 2, "exact", epochs=2) for r in range(2)]
    for epoch in range(2):
        seen = [k for r in range(2) for b in per_rank[r][epoch] for k in b["key"]]
        counts = collections.Counter(seen)
        # 28 samples over 4 readers: 7 each, no padding needed
        assert sorted(counts) == sorted(keys) and set(counts.values()) == {1}
        assert len(per_rank[0][epoch]) == len(per_rank[1][epoch])
    first = [k for b in per_rank[0][0] for k in b["key"]]
    second = [k for b in per_rank[0][1] for k in b["key"]]
    assert first != second and set(first) != set(second)  # a new deal each epoch


def test_exact_epoch_remainder_is_padded_so_ranks_stay_equal(tmp_path):
    keys = write_keyed_shards(tmp_path, [7, 3, 12, 1, 4])  # 27 samples, 2 ranks: 14 each
    per_rank = [rank_batches(tmp_path, r, 2, "exact")[0] for r in range(2)]
    seen = collections.Counter(k for batches in per_rank for b in batches for k in b["key"])
    assert set(seen) == set(keys) and sum(seen.values()) == 28 and seen.most_common(2)[1][1] == 1
    # global batches of 2 x 3: four, then one of 2 x 2; each rank the same shares
    assert [len(b["key"]) for b in per_rank[0]] == [len(b["key"]) for b in per_rank[1]]
    assert sorted(len(b["key"]) for b in per_rank[0]) == [2, 3, 3, 3, 3]
    dropped = [rank_batches(tmp_path, r, 2, "exact", drop_remainder=True)[0] for r in range(2)]
    seen = collections.Counter(k for batches in dropped for b in batches for k in b["key"])
    assert sum(seen.values()) == 24 and set(seen.values()) == {1}


def test_streaming_gives_every_rank_the_same_batch_count_on_uneven_shards(tmp_path):
    write_keyed_shards(tmp_path, UNEVEN)
    counts = [
        [len(b["key"]) for b in rank_batches(tmp_path, r, 2, "stream", batches_per_epoch=5)[0]]
        for r in range(2)
    ]
    assert counts == [[3] * 10, [3] * 10]  # 2 workers x 5 full batches on each rank


def test_fewer_shards_than_readers_warns_and_still_works(tmp_path, caplog):
    keys = write_keyed_shards(tmp_path, [5])
    with caplog.at_level(logging.WARNING):
        stream = [rank_batches(tmp_path, r, 4, "stream", batches_per_epoch=2)[0] for r in range(4)]
    assert "1 shards for 4 ranks x 2 workers" in caplog.text
    assert [len(b) for b in stream] == [4] * 4
    exact = [rank_batches(tmp_path, r, 4, "exact")[0] for r in range(4)]  # 8 readers, 5 samples
    seen = {k for batches in exact for b in batches for k in b["key"]}
    assert seen == set(keys) and len({len(b) for b in exact}) == 1
    for world in (1, 4):  # validation: every sample, every rank the same number of batches
        val = [
            list(
                make_dataset(
                    str(tmp_path / "*.tar"), DataOptions(8), 2, False, rank=r, world_size=world
                )
            )
            for r in range(world)
        ]
        assert sorted({k for batches in val for b in batches for k in b["key"]}) == sorted(keys)
        assert len({len(batches) for batches in val}) == 1


def _ddp_worker(rank, world, root, port, out, mode):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    dm = ImageTextDataModule(
        str(root / "*.tar"),
        batch_size=3,
        image_size=8,
        num_workers=2,
        batches_per_epoch=8,
        mode=mode,
        shuffle_buffer=4,
    )
    result = []
    for epoch in range(2):
        loader = dm.train_dataloader()
        per_epoch = loader.dataset.batches_per_epoch(2)
        loader.batches_done = lambda e=epoch: e * per_epoch
        keys = [b["key"] for b in loader]
        dist.barrier()  # a rank with fewer batches would still arrive; its count says so
        result.append(keys)
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        torch.save(gathered, out)
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["exact", "stream"])
def test_two_gloo_ranks_with_two_workers_each(tmp_path, mode):
    keys = write_keyed_shards(tmp_path, UNEVEN + [1])  # 29 samples: exact pads 3
    out, deadline = tmp_path / "out.pt", time.time() + 300  # ~100 s on 2 busy cores, mostly imports
    ctx = mp.start_processes(
        _ddp_worker,
        args=(2, tmp_path, 29500 + os.getpid() % 1000, out, mode),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    while not ctx.join(timeout=5):
        if time.time() > deadline:  # a hang fails the test instead of blocking the suite
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{mode} DDP run still going after 300 s: hung")
    gathered = torch.load(out)  # [rank][epoch][batch] -> keys
    for epoch in range(2):
        per_rank = [gathered[r][epoch] for r in range(2)]
        assert len(per_rank[0]) == len(per_rank[1])
        if mode == "exact":
            seen = collections.Counter(k for batches in per_rank for b in batches for k in b)
            assert set(seen) == set(keys) and sum(seen.values()) == 32
        else:
            assert len(per_rank[0]) == 8 and all(len(b) == 3 for b in per_rank[0] + per_rank[1])
    if mode == "exact":
        assert gathered[0][0] != gathered[0][1]


@pytest.mark.parametrize(
    "mode, workers", [("stream", 2), ("stream", 3), ("exact", 2), ("exact", 0)]
)
def test_a_loader_resumed_after_n_batches_yields_exactly_the_rest_of_their_epoch(
    tmp_path, mode, workers
):
    write_keyed_shards(tmp_path, UNEVEN)
    ds = make_dataset(
        str(tmp_path / "*.tar"),
        DataOptions(8, shuffle_buffer=4, mode=mode),
        3,
        True,
        batches_per_epoch=4 if mode == "stream" else None,
        num_workers=workers,
    )
    epoch_of = 4 * workers if mode == "stream" else 10  # batches an epoch
    whole = [[b["key"] for b in EpochLoader(ds, workers, lambda e=e: e * epoch_of)] for e in (0, 1)]
    assert [len(w) for w in whole] == [epoch_of] * 2 and whole[0] != whole[1]
    for n in range(2 * epoch_of):  # resumed after n batches of the run: the rest of its epoch
        resumed = [b["key"] for b in EpochLoader(ds, workers, lambda: n)]
        assert resumed == whole[n // epoch_of][n % epoch_of :]
