import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.modules import ImageTextDataModule
from ldm.data.shards import DataError, expand_shards
from ldm.data.transforms import ImageTransform, to_rgb
from tests.data.shard_helpers import (
    image_bytes,
    png_header,
    png_strip,
    write_shard,
    write_sparse_shard,
)

pytestmark = pytest.mark.usefixtures("single_thread")  # tensor ops stall on busy shared cores


def good(key: str, colour=(200, 10, 10), mode="RGB") -> tuple[str, dict[str, bytes]]:
    image = Image.new("RGB", (80, 64), colour).convert(mode)
    return key, {
        "png": image_bytes(image),
        "txt": f"caption {key}".encode(),
        "json": json.dumps({"key": key}).encode(),
    }


def test_reads_img2dataset_layout_and_skips_broken_samples(tmp_path):
    samples = [
        good("000000000"),
        good("000000001", mode="L"),
        good("000000002", mode="P"),
        ("000000003", {"png": b"not an image", "txt": b"broken"}),
        ("000000004", {"txt": b"no image at all"}),
        good("000000005", mode="RGBA"),
    ]
    write_shard(tmp_path / "00000.tar", samples)
    dm = ImageTextDataModule(
        str(tmp_path / "00000.tar"),
        str(tmp_path / "00000.tar"),
        batch_size=8,
        image_size=32,
        num_workers=0,
    )
    batches = list(dm.val_dataloader())
    assert len(batches) == 1
    batch = batches[0]
    assert batch["key"] == ["000000000", "000000001", "000000002", "000000005"]
    assert batch["image"].shape == (4, 3, 32, 32)
    assert batch["caption"][0] == "caption 000000000"
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1


def test_training_stream_gives_full_batches_for_the_configured_epoch(tmp_path):
    write_shard(tmp_path / "00000.tar", [good(f"{i:09d}") for i in range(10)])
    dm = ImageTextDataModule(
        str(tmp_path / "*.tar"),
        batch_size=4,
        image_size=16,
        num_workers=0,
        batches_per_epoch=7,
        shuffle_buffer=5,
    )
    batches = list(dm.train_dataloader())
    assert len(batches) == 7 and all(len(b["caption"]) == 4 for b in batches)


def test_patterns_expand_and_a_pattern_matching_nothing_is_a_clear_error(tmp_path):
    for i in range(3):
        write_shard(tmp_path / f"{i:05d}.tar", [good(f"{i:05d}0000")])
    assert len(expand_shards(str(tmp_path / "{00000..00002}.tar"))) == 3
    assert len(expand_shards([str(tmp_path / "*.tar"), "pipe:cat x.tar"])) == 4
    with pytest.raises(DataError, match="matches no file"):
        expand_shards(str(tmp_path / "missing/{00000..00009}.tar"))


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16"])
def test_any_image_mode_becomes_rgb(mode):
    if mode == "I;16":
        image = Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16))
    else:
        image = Image.new("RGB", (8, 8), (10, 120, 250)).convert(mode)
    assert to_rgb(image).mode == "RGB"


def test_transform_resizes_the_short_side_and_centre_crops():
    image = Image.new("RGB", (128, 64), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 16, 64))  # a white band on the left: cropped away
    out = ImageTransform(32)(image)
    assert out.shape == (3, 32, 32)
    torch.testing.assert_close(out, torch.full((3, 32, 32), -1.0))


# -- robustness, filters, captions, mixing, bucketing, counts ----------------------------------
from ldm.data.filters import MetadataFilter, add_counts  # noqa: E402
from ldm.data.options import DataOptions  # noqa: E402
from ldm.data.webdataset import make_dataset  # noqa: E402
from ldm.training.callbacks import DataCounts  # noqa: E402
from tests.data.shard_helpers import sample, write_keyed_shards  # noqa: E402


def read_all(urls, train=False, batches_per_epoch=None, **options) -> tuple[list, dict, list]:
    ds = make_dataset(urls, DataOptions(16, **options), 4, train, batches_per_epoch)
    batches = list(ds)
    totals = {}
    for b in batches:
        for k, v in b["counts"].items():
            totals[k] = totals.get(k, 0) + v
    return [k for b in batches for k in b["key"]], {k: v for k, v in totals.items() if v}, batches


def test_every_broken_input_is_skipped_and_counted_and_convertible_modes_are_kept(tmp_path, caplog):
    cmyk = sample("cmyk", mode="CMYK", fmt="JPEG")
    no_txt = sample("no_txt")
    del no_txt[1]["txt"]
    samples = [
        sample("rgb"),
        cmyk,
        sample("gray", mode="L"),
        sample("palette", mode="P"),
        sample("sixteen", mode="I;16"),
        sample("rgba", mode="RGBA", fmt="WEBP"),
        ("empty_file", {"jpg": b"", "txt": b"x"}),
        ("corrupt", {"png": image_bytes(Image.new("RGB", (40, 40)))[:60], "txt": b"x"}),
        ("no_image", {"txt": b"only text", "json": b"{}"}),
        no_txt,
        sample("blank_caption", caption="   "),
        sample("last"),
    ]
    write_shard(tmp_path / "00000.tar", samples)
    (tmp_path / "00001.tar").write_bytes(b"garbage, not a tar" * 50)
    urls = [str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar"), "http://127.0.0.1:9/x.tar"]
    keys, counts, batches = read_all(urls)
    assert keys == ["rgb", "cmyk", "gray", "palette", "sixteen", "rgba", "last"]
    assert counts == {
        "kept": 7,
        "rejected/bad_image": 2,
        "rejected/no_image": 1,
        "rejected/no_caption": 2,
        "rejected/shard_unreadable": 2,
    }
    assert all(b["image"].shape[1:] == (3, 16, 16) for b in batches)
    for key in ("empty_file", "corrupt", "no_image", "no_txt", "blank_caption", "00001.tar"):
        assert key in caplog.text  # key (or shard) and reason in the log


def test_metadata_filters_reject_with_counts_per_reason(tmp_path):
    metas = [
        dict(
            original_width=1024,
            original_height=768,
            aesthetic=6.1,
            punsafe=0.01,
            pwatermark=0.1,
            similarity=0.35,
        ),
        dict(original_width=200, original_height=768),
        dict(original_width=1024, original_height=768, AESTHETIC_SCORE=4.0),
        dict(original_width=1024, original_height=768, aesthetic=6.5, punsafe=0.9),
        dict(original_width=1024, original_height=768, aesthetic=6.5, punsafe=0.0, pwatermark=0.95),
    ]
    write_shard(tmp_path / "00000.tar", [sample(f"k{i}", **m) for i, m in enumerate(metas)])
    f = MetadataFilter(
        min_width=512, min_height=512, min_aesthetic=5.0, max_punsafe=0.5, max_pwatermark=0.8
    )
    keys, counts, _ = read_all(str(tmp_path / "00000.tar"), filters=f)
    assert keys == ["k0"]
    assert counts == {
        "kept": 1,
        "rejected/too_small": 1,
        "rejected/low_aesthetic": 1,
        "rejected/unsafe": 1,
        "rejected/watermark": 1,
    }


def test_caption_from_a_json_field(tmp_path):
    write_shard(tmp_path / "00000.tar", [sample("a", caption="from txt", alt="from json")])
    ds = make_dataset(str(tmp_path / "00000.tar"), DataOptions(16, caption_key="alt"), 4, False)
    assert next(iter(ds))["caption"] == ["from json"]


def test_sources_mix_by_weight_in_the_training_stream(tmp_path):
    torch.manual_seed(0)  # the stream's draws are seeded from torch's seed
    write_keyed_shards(tmp_path, [20] * 3, prefix="a")
    write_keyed_shards(tmp_path, [5], prefix="b")  # fewer, smaller shards: weight still holds
    spec = [
        {"urls": str(tmp_path / "a*.tar"), "weight": 0.7},
        {"urls": str(tmp_path / "b*.tar"), "weight": 0.3},
    ]
    keys, counts, batches = read_all(spec, train=True, batches_per_epoch=150, shuffle_buffer=20)
    share_b = sum(k.startswith("b") for k in keys) / len(keys)
    assert len(batches) == 150 and abs(share_b - 0.3) < 0.06  # 600 draws: sigma 0.019


def test_bucketed_stream_gives_one_shape_per_batch(tmp_path):
    shapes = [(200, 100), (100, 200), (150, 150), (210, 90)] * 6
    write_shard(tmp_path / "00000.tar", [sample(f"k{i}", size=s) for i, s in enumerate(shapes)])
    dm = ImageTextDataModule(
        str(tmp_path / "*.tar"),
        batch_size=4,
        image_size=256,
        num_workers=0,
        batches_per_epoch=12,
        bucketing=True,
        shuffle_buffer=8,
    )
    batches = list(dm.train_dataloader())
    assert len(batches) == 12
    seen = {tuple(b["image"].shape[2:]) for b in batches}
    assert seen == {(192, 320), (256, 256), (320, 192)}  # (H, W) of the 256-px buckets
    with pytest.raises(DataError, match="stream"):
        ImageTextDataModule(
            str(tmp_path / "*.tar"), mode="exact", bucketing=True, num_workers=0, image_size=128
        ).train_dataloader()


def test_counts_reach_the_logs_through_the_callback(tmp_path):
    import lightning as L

    write_shard(
        tmp_path / "00000.tar",
        [sample(f"k{i}") for i in range(6)] + [("bad", {"png": b"xx", "txt": b"x"})],
    )

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            return (self.w * batch["image"].mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = ImageTextDataModule(
        str(tmp_path / "*.tar"),
        batch_size=2,
        image_size=16,
        num_workers=0,
        batches_per_epoch=6,
        mode="exact",
        shuffle_buffer=1,
    )
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[DataCounts(every_n_steps=1)],
    )
    trainer.fit(Tiny(), datamodule=dm)
    # two exact epochs of 6 good samples; the corrupt image passes the index (it has a png and
    # a caption) and fails decoding, once per epoch
    assert trainer.callback_metrics["data/kept"] == 12
    assert trainer.callback_metrics["data/rejected/bad_image"] == 2


def test_a_stream_whose_filters_reject_everything_stops_with_a_clear_error(tmp_path, monkeypatch):
    import ldm.data.webdataset as wd

    monkeypatch.setattr(wd, "MAX_REJECTED_IN_A_ROW", 50)
    write_shard(tmp_path / "00000.tar", [sample(f"k{i}") for i in range(5)])
    options = DataOptions(8, filters=MetadataFilter(max_punsafe=0.5))  # no punsafe in these shards
    ds = make_dataset(str(tmp_path / "*.tar"), options, 2, True, batches_per_epoch=3)
    with pytest.raises(DataError, match="50 samples in a row rejected.*missing_metadata"):
        next(iter(ds))


def test_draft_decoding_of_a_large_jpeg_matches_full_decoding():
    y, x = np.mgrid[0:768, 0:1024]
    arr = np.stack([x * 255 // 1023, y * 255 // 767, (x + y) * 255 // 1790], -1).astype(np.uint8)
    data = image_bytes(Image.fromarray(arr), "JPEG")
    full = ImageTransform(64, draft=False)(Image.open(io.BytesIO(data)))
    drafted = ImageTransform(64)(Image.open(io.BytesIO(data)))  # decoded at 1/8 in the DCT
    assert drafted.shape == full.shape == (3, 64, 64)
    assert (drafted - full).abs().mean() < 0.02


def test_sources_carry_their_loss_weight_into_the_batch(tmp_path):
    """Prior preservation: each sample's source `loss_weight` (default 1) travels as a tensor."""
    a = write_shard(tmp_path / "a.tar", [sample(f"a{i}") for i in range(8)])
    b = write_shard(tmp_path / "b.tar", [sample(f"b{i}") for i in range(8)])
    spec = [{"urls": str(a), "weight": 0.5}, {"urls": str(b), "weight": 0.5, "loss_weight": 0.25}]
    batches = list(make_dataset(spec, DataOptions(32), 8, train=True, batches_per_epoch=4))
    weights = torch.cat([x["loss_weight"] for x in batches])
    keys = [k for x in batches for k in x["key"]]
    assert all(w == (0.25 if k.startswith("b") else 1.0) for w, k in zip(weights.tolist(), keys))
    assert {k[0] for k in keys} == {"a", "b"}
    plain = next(iter(make_dataset(str(a), DataOptions(32), 4, train=True, batches_per_epoch=1)))
    assert "loss_weight" not in plain


GOOD_META = b'{"aesthetic": 6.0}'


def hostile_samples() -> list[tuple[str, dict]]:
    """One of each untrusted input, between good samples (aesthetic filtered, so its field
    is read)."""
    strip = sample("strip", aesthetic=6.0)
    strip[1].pop("png")
    strip[1]["png"] = png_strip(1, 32000)  # 142 bytes; resized to cover 64 px: 393 MiB
    return [
        sample("good0", aesthetic=6.0),
        strip,
        ("huge", {"png": 1 << 30, "txt": b"x", "json": GOOD_META}),  # sparse
        sample("not_a_number", aesthetic="very high"),
        sample("good1", aesthetic=6.0),
        ("deep", {**sample("deep")[1], "json": b"[" * 100_000}),
        ("listed", {**sample("listed")[1], "json": b'{"aesthetic": [7]}'}),
        ("many_pixels", {"png": png_header(9000, 9000), "txt": b"x", "json": GOOD_META}),  # 81 Mpx
        ("pil_warns", {"png": png_header(10000, 10000), "txt": b"x", "json": GOOD_META}),
        ("pil_raises", {"png": png_header(20000, 20000), "txt": b"x", "json": GOOD_META}),
        sample("wide", size=(330, 30), aesthetic=6.0),  # 11:1
        sample("panorama", size=(300, 50), aesthetic=6.0),  # 6:1: kept
        sample("good2", aesthetic=6.0),
    ]


HOSTILE_COUNTS = {
    "kept": 4,
    "rejected/bad_aspect": 2,
    "rejected/member_too_large": 1,
    "rejected/bad_metadata": 3,
    "rejected/too_many_pixels": 3,
}


def test_untrusted_samples_are_skipped_and_counted_each_under_its_reason(tmp_path, caplog):
    shard = write_sparse_shard(tmp_path / "00000.tar", hostile_samples())
    filters = MetadataFilter(min_aesthetic=5.0)
    for train in (False, True):  # an exact-style index pass, and a stream
        options = DataOptions(64, filters=filters, shuffle_buffer=1 if train else 1000)
        ds = make_dataset(str(shard), options, 4, train, batches_per_epoch=1 if train else None)
        batches = list(ds)
        keys = [k for b in batches for k in b["key"]]
        assert keys == ["good0", "good1", "panorama", "good2"]
        counts = {}
        for b in batches:
            add_counts(counts, b["counts"])
        # the stream's first batch of 4 ends at good2: every reject counted once
        assert {k: v for k, v in counts.items() if v} == HOSTILE_COUNTS
    for key in ("strip", "huge", "not_a_number", "deep", "many_pixels", "pil_raises", "wide"):
        assert key in caplog.text  # logged as broken input, with the key


def test_a_huge_header_is_rejected_before_decoding_and_limits_are_options(tmp_path):
    write_shard(tmp_path / "00000.tar", [sample("wide", size=(330, 30)), sample("ok")])
    dm = ImageTextDataModule(
        str(tmp_path / "00000.tar"),
        str(tmp_path / "00000.tar"),
        batch_size=4,
        image_size=16,
        num_workers=0,
        max_aspect=12,
        max_pixels=330 * 30,
    )
    assert next(iter(dm.val_dataloader()))["key"] == ["wide", "ok"]
    dm = ImageTextDataModule(
        str(tmp_path / "00000.tar"),
        str(tmp_path / "00000.tar"),
        batch_size=4,
        image_size=16,
        num_workers=0,
        max_pixels=330 * 30 - 1,
        max_aspect=12,
    )
    batch = next(iter(dm.val_dataloader()))
    assert batch["key"] == ["ok"] and batch["counts"]["rejected/too_many_pixels"] == 1


MEASURE = """
import json, resource, sys, types
# lightning is only the data module's base class here, and 8 of this script's 12 s to import
sys.modules["lightning"] = types.SimpleNamespace(LightningDataModule=object)
from ldm.data.modules import ImageTextDataModule
from ldm.data.filters import MetadataFilter
dm = ImageTextDataModule(sys.argv[1], sys.argv[1], batch_size=4, image_size=int(sys.argv[2]),
                         num_workers=0, filters=MetadataFilter(min_aesthetic=5.0))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
batches = list(dm.val_dataloader())
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"keys": [k for b in batches for k in b["key"]], "grown_kib": grown}))
"""


def test_a_shard_of_hostile_samples_is_read_in_bounded_memory(tmp_path):
    """End to end, through the data module, in a process of its own (peak RSS): before the
    header checks the 1 x 32000 strip alone grew it by ~600 MiB at 64 px, the 1 GiB member
    by 1 GiB."""
    import subprocess
    import sys

    from tests.conftest import subprocess_env

    shard = write_sparse_shard(tmp_path / "00000.tar", hostile_samples())
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(shard), "64"],
        capture_output=True,
        text=True,
        env=subprocess_env(tmp_path),
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["keys"] == ["good0", "good1", "panorama", "good2"]
    assert result["grown_kib"] < 64 * 1024
