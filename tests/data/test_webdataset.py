import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.transforms import ImageTransform, to_rgb
from ldm.data.webdataset import DataError, ImageTextDataModule, expand_shards


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def good(key: str, colour=(200, 10, 10), mode="RGB") -> tuple[str, dict[str, bytes]]:
    image = Image.new("RGB", (80, 64), colour).convert(mode)
    return key, {"png": png_bytes(image), "txt": f"caption {key}".encode(),
                 "json": json.dumps({"key": key}).encode()}


def test_reads_img2dataset_layout_and_skips_broken_samples(tmp_path):
    samples = [good("000000000"), good("000000001", mode="L"), good("000000002", mode="P"),
               ("000000003", {"png": b"not an image", "txt": b"broken"}),
               ("000000004", {"txt": b"no image at all"}),
               good("000000005", mode="RGBA")]
    write_shard(tmp_path / "00000.tar", samples)
    dm = ImageTextDataModule(str(tmp_path / "00000.tar"), str(tmp_path / "00000.tar"),
                             batch_size=8, image_size=32, num_workers=0)
    batches = list(dm.val_dataloader())
    assert len(batches) == 1
    batch = batches[0]
    assert batch["key"] == ["000000000", "000000001", "000000002", "000000005"]
    assert batch["image"].shape == (4, 3, 32, 32)
    assert batch["caption"][0] == "caption 000000000"
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1


def test_training_stream_gives_full_batches_for_the_configured_epoch(tmp_path):
    write_shard(tmp_path / "00000.tar", [good(f"{i:09d}") for i in range(10)])
    dm = ImageTextDataModule(str(tmp_path / "*.tar"), batch_size=4, image_size=16, num_workers=0,
                             batches_per_epoch=7, shuffle_buffer=5)
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
