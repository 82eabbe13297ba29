"""SDXL's micro-conditioning in training is the truth of each sample: the original size from the
shard (or the image), the crop the pipeline made (mirrored with a flip), the target size; on the
fly and from a latent cache alike, and a dropped caption is zeros for both towers."""

import functools
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.latents import cached_extras, make_latent_dataset, read_cache_metadata
from ldm.data.latents_write import write_latent_shards
from ldm.data.options import DataOptions
from ldm.data.transforms import ImageTransform, original_size
from ldm.data.webdataset import make_dataset
from ldm.diffusion.objective import DiffusionObjective
from ldm.diffusion.schedule import NoiseSchedule
from ldm.models.unet import micro_conditioning
from ldm.training.module import LatentDiffusion
from ldm.training.options import Captions
from tests.data.shard_helpers import image_bytes, write_shard
from tests.sd_fixtures import SDXL_CONTEXT, SDXL_POOLED, sdxl_parts

SIZE = 32


def picture(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def as_tensor(image: Image.Image) -> torch.Tensor:
    arr = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return arr.float().div(127.5).sub(1.0)


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("random_crop", [False, True])
def test_the_crop_recorded_is_the_crop_the_pixels_show(flip, random_crop, monkeypatch):
    """The returned (top, left) cut from the resized image (mirrored, for a flip) gives back
    exactly the transform's pixels: a flipped sample's left edge is recomputed."""
    import random

    monkeypatch.setattr(random, "random", lambda: 0.0)  # the coin: always flip when asked
    image = picture(101, 61)  # covers 32 x 32 at 53 x 32: an odd overhang of 21 px
    out, (top, left), width = ImageTransform(SIZE, random_crop, flip).apply(image)
    resized = image.resize((53, 32), Image.BICUBIC, reducing_gap=3.0)
    assert width == 53 and top == 0
    if flip:
        resized = resized.transpose(Image.FLIP_LEFT_RIGHT)
    assert torch.equal(out, as_tensor(resized.crop((left, top, left + SIZE, top + SIZE))))
    if not random_crop:  # the centre crop's left is 10; its mirror's is 11
        assert left == (11 if flip else 10)


def test_original_size_from_the_metadata_else_the_image():
    image = picture(40, 30)
    assert original_size({"original_width": 1024, "original_height": 768}, image) == (768, 1024)
    assert original_size({"width": 40}, image) == (30, 40)
    assert original_size({"original_width": "big", "original_height": 2}, image) == (30, 40)
    assert original_size(None, image) == (30, 40)


def write_source(path):
    """Three samples: img2dataset's original size in the JSON (the image itself resized), none,
    and a portrait image; random pixels, so that a mirrored image is another image."""
    samples = []
    for key, (w, h), caption, meta in [
        ("a", (48, 32), "a red circle", {"original_width": 1200, "original_height": 800}),
        ("b", (41, 32), "a blue square", {}),
        ("c", (32, 50), "a green star", {}),
    ]:
        files = {
            "png": image_bytes(picture(w, h, seed=ord(key))),
            "txt": caption.encode(),
            "json": json.dumps({"key": key, **meta}).encode(),
        }
        samples.append((key, files))
    return write_shard(path, samples)


EXPECTED = {  # (original h, w, crop top, left, target h, w) of the centre crops at 32 px
    "a": [800, 1200, 0, 8, 32, 32],
    "b": [32, 41, 0, 4, 32, 32],
    "c": [50, 32, 9, 0, 32, 32],
}


def test_streamed_batches_carry_each_samples_time_ids(tmp_path):
    src = write_source(tmp_path / "src.tar")
    batch = next(iter(make_dataset([str(src)], DataOptions(SIZE), 8, train=False, num_workers=0)))
    got = dict(zip(batch["key"], batch["time_ids"].tolist()))
    assert got == EXPECTED


def sdxl_module(dropout: float = 0.0) -> LatentDiffusion:
    parts = sdxl_parts()
    parts["text_encoder"].requires_grad_(False)
    objective = DiffusionObjective(NoiseSchedule(), prediction="epsilon")
    return LatentDiffusion(
        parts["unet"],
        parts["vae"],
        parts["text_encoder"],
        objective,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-4),
        captions=Captions(dropout=dropout),
    )


@pytest.fixture(scope="module")
def cached(tmp_path_factory, single_thread):
    root = tmp_path_factory.mktemp("sdxl_cache")
    src = write_source(root / "src.tar")
    module = sdxl_module()
    write_latent_shards(
        [str(src)],
        root / "cache",
        module.vae,
        module.text_encoder,
        image_size=SIZE,
        batch_size=2,
        flips=True,
        dtype="float32",
        progress=False,
        precision="32-true",
    )
    return root


def cached_stream(root, flip: bool = False):
    urls = [str(root / "cache/00000.tar")]
    meta, empty = read_cache_metadata(urls)
    extras = cached_extras(meta)
    assert extras == ("pooled", "time_ids")
    options = DataOptions(SIZE, flip=flip)
    return make_latent_dataset(urls, empty, 8, flip, options, 1, extras)


def cached_batch(root) -> dict:
    return next(iter(cached_stream(root)))


def test_the_cache_holds_the_pooled_vector_and_both_crops(cached):
    batch = cached_batch(cached)
    module = sdxl_module()
    with torch.no_grad():
        context, pooled = module.text_encoder.encode(batch["caption"])
    assert batch["context"].shape[-1] == SDXL_CONTEXT and batch["pooled"].shape[-1] == SDXL_POOLED
    torch.testing.assert_close(batch["context"], context, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch["pooled"], pooled, atol=1e-5, rtol=1e-5)
    assert dict(zip(batch["key"], batch["time_ids"].tolist())) == EXPECTED
    with tarfile.open(cached / "cache/00000.tar") as tar:  # the mirror's crop: 41 - 4 - 32 = 5
        flipped = np.load(io.BytesIO(tar.extractfile("b.time_ids_flip.npy").read()))
    assert flipped.tolist() == [32, 41, 0, 5, 32, 32]
    meta = json.loads((cached / "cache/_latents.json").read_text())
    assert meta["time_ids"] and meta["text_encoder"]["pooled"]


def test_a_streamed_mirrored_sample_reads_the_mirrors_crop(cached):
    """Where the stream takes sample b's mirrored posterior, it takes the mirror's crop."""
    plain = cached_batch(cached)
    plain_mean = plain["latent_mean"][plain["key"].index("b")]
    sides = set()
    ds = cached_stream(cached, flip=True)
    for epoch in range(12):  # the coin is tossed per key and epoch: both sides turn up
        ds.set_epoch(epoch)
        for batch in ds:
            for i in [i for i, k in enumerate(batch["key"]) if k == "b"]:
                mirrored = not torch.equal(batch["latent_mean"][i], plain_mean)
                assert batch["time_ids"][i, 3].item() == (5 if mirrored else 4)
                sides.add(mirrored)
    assert sides == {False, True}


def image_batch(tmp_path) -> dict:
    src = write_source(tmp_path / "src.tar")
    return next(iter(make_dataset([str(src)], DataOptions(SIZE), 8, train=False, num_workers=0)))


def test_a_dropped_caption_is_zeros_for_both_towers_with_the_micro_conditioning_kept(tmp_path):
    module, batch = sdxl_module(), image_batch(tmp_path)
    keep = torch.tensor([True, False, True])
    with torch.no_grad():
        cond = module.condition(batch, keep)
        context, pooled = module.text_encoder.encode(batch["caption"])
    micro = micro_conditioning(batch["time_ids"])
    assert torch.equal(cond["context"][1], torch.zeros_like(cond["context"][1]))
    assert torch.equal(cond["y"][1, :SDXL_POOLED], torch.zeros(SDXL_POOLED))
    torch.testing.assert_close(cond["y"][:, SDXL_POOLED:], micro)
    torch.testing.assert_close(cond["context"][[0, 2]], context[[0, 2]])
    torch.testing.assert_close(cond["y"][[0, 2], :SDXL_POOLED], pooled[[0, 2]])


def test_sdxl_training_step_is_the_same_from_the_cache_and_trains(cached, tmp_path):
    """Caption dropout at 0.5, posterior sampling, noise: the cached path draws what the
    on-the-fly path draws and gives its loss; the U-Net's vector conditioning gets gradients."""
    module = sdxl_module(dropout=0.5)
    images, from_cache = image_batch(tmp_path), cached_batch(cached)
    order = [images["key"].index(k) for k in from_cache["key"]]
    images = {
        "image": images["image"][order],
        "caption": [images["caption"][i] for i in order],
        "time_ids": images["time_ids"][order],
    }
    for number in range(3):
        module.calls = number
        direct = module.training_step(images, 0)
        module.calls = number
        cached_loss = module.training_step(from_cache, 0)
        torch.testing.assert_close(cached_loss, direct, atol=1e-5, rtol=1e-4)
    cached_loss.backward()
    assert module.unet.label_emb[0][0].weight.grad.abs().sum() > 0


def test_a_batch_without_time_ids_is_a_clear_error():
    module = sdxl_module()
    with pytest.raises(ValueError, match="time_ids"):
        module.condition({"image": torch.zeros(1, 3, SIZE, SIZE), "caption": ["x"]})


def test_the_flops_count_runs_on_an_sdxl_batch(tmp_path):
    from ldm.training.callbacks import Throughput, unet_train_flops

    module, batch = sdxl_module(), image_batch(tmp_path)
    flops = Throughput().count_flops(module, batch)
    with torch.no_grad():
        mean, _ = module.posterior(batch)
    cond = {"context": torch.zeros(1, 16, SDXL_CONTEXT), "y": torch.zeros(1, SDXL_POOLED + 1536)}
    torch.testing.assert_close(flops, unet_train_flops(module.unet, mean[:1], cond))
    assert flops > 0
