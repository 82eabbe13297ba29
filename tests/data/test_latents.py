import functools
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.latents import (
    CacheError,
    make_latent_dataset,
    read_cache_metadata,
)
from ldm.data.latents_write import write_latent_shards
from ldm.data.modules import LatentDataModule
from ldm.data.options import DataOptions
from ldm.data.transforms import ImageTransform
from ldm.diffusion.objective import DiffusionObjective
from ldm.diffusion.schedule import NoiseSchedule
from ldm.models.text_encoder import TextEncoder
from ldm.training.module import LatentDiffusion
from ldm.training.options import Captions, EMASettings, LRSchedule
from tests.conftest import tiny_parts

SIZE = 64
OPTIONS = DataOptions(SIZE)
CAPTIONS = ["a red circle", "a blue square", "a green star on white", "", "a cat", "a dog"]


def frozen_text(**kw) -> TextEncoder:
    torch.manual_seed(1)
    return TextEncoder(
        text_cfg=dict(width=32, heads=2, layers=1, context_length=16), frozen=True, **kw
    )


def make_module(caption_dropout=0.5, text=None) -> LatentDiffusion:
    unet, vae, _ = tiny_parts()
    objective = DiffusionObjective(NoiseSchedule(zero_terminal_snr=True), prediction="v")
    return LatentDiffusion(
        unet,
        vae,
        text or frozen_text(),
        objective,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        lr_schedule=LRSchedule(warmup_steps=2),
        captions=Captions(dropout=caption_dropout),
        ema=EMASettings(decay=0.9),
    )


def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(80, 64), (64, 96), (64, 64), (100, 70), (64, 64), (72, 64)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def write_image_shard(path: Path) -> Path:
    with tarfile.open(path, "w") as tar:
        for i, (im, caption) in enumerate(zip(images(), CAPTIONS)):
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            for ext, data in (
                ("png", buf.getvalue()),
                ("txt", caption.encode()),
                (
                    "json",
                    json.dumps(
                        {
                            "key": f"{i:09d}",
                            "original_width": im.width,
                            "original_height": im.height,
                        }
                    ).encode(),
                ),
            ):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("000000099.png")  # an unreadable image: skipped and counted
        info.size = 4
        tar.addfile(info, io.BytesIO(b"junk"))
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory, single_thread):
    """A float32 cache with flips of one image shard (the tiny VAE, a frozen text encoder)."""
    root = tmp_path_factory.mktemp("latents")
    src = write_image_shard(root / "src.tar")
    module = make_module()
    counts = write_latent_shards(
        [str(src)],
        root / "cache",
        module.vae,
        module.text_encoder,
        image_size=SIZE,
        batch_size=4,
        flips=True,
        dtype="float32",
        progress=False,
    )
    return root, counts


def cache_tolerance(folder: Path, **float32) -> dict:
    """The tolerance of a comparison with encoding in float32: `float32` for a cache encoded in
    float32, bf16's (its 2**-8 rounding, grown through the encoders) for one encoded under bf16
    autocast, as `auto` does on a CPU with bf16 instructions."""
    precision = json.loads((folder / "_latents.json").read_text())["precision"]
    return float32 if precision == "32-true" else {"atol": 3e-2, "rtol": 3e-2}


def cached_batch(root: Path) -> dict:
    meta, empty = read_cache_metadata([str(root / "cache/00000.tar")])
    ds = make_latent_dataset([str(root / "cache/00000.tar")], empty, 16, False, OPTIONS)
    return next(iter(ds))


def image_batch() -> dict:
    transform = ImageTransform(SIZE)
    return {"image": torch.stack([transform(im) for im in images()]), "caption": list(CAPTIONS)}


def test_cache_holds_posterior_context_and_metadata(cache):
    root, counts = cache
    assert counts["written"] == 6 and len(counts["skipped"]) == 1
    meta = json.loads((root / "cache/_latents.json").read_text())
    assert (
        meta["complete"]
        and meta["image_size"] == SIZE
        and meta["flips"]
        and meta["crop"] == "center"
    )
    assert meta["vae"]["config"]["ch"] == 8 and len(meta["vae"]["sha256"]) == 64
    module, batch = make_module(), cached_batch(root)
    with torch.no_grad():
        post = module.vae.posterior(image_batch()["image"])
        flipped = module.vae.posterior(image_batch()["image"].flip(-1))
        context = module.text_encoder(CAPTIONS)
    tol = cache_tolerance(root / "cache", atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch["latent_mean"], post.mean, **tol)
    torch.testing.assert_close(batch["latent_std"], post.std, **tol)
    torch.testing.assert_close(batch["context"], context, **tol)
    torch.testing.assert_close(batch["empty_context"], module.text_encoder([""]), **tol)
    assert batch["caption"] == CAPTIONS and batch["latent_mean"].shape == (6, 4, 8, 8)
    with tarfile.open(root / "cache/00000.tar") as tar:  # mirrored posterior cached too
        data = tar.extractfile("000000000.mean_flip.npy").read()
    torch.testing.assert_close(torch.from_numpy(np.load(io.BytesIO(data))), flipped.mean[0], **tol)


def test_same_loss_as_on_the_fly_encoding_at_fixed_t_and_eps(cache):
    root, _ = cache
    module, cached = make_module(), cached_batch(root)
    t = torch.tensor([0, 200, 400, 600, 800, 999])
    eps = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        latents = module.vae.encode(image_batch()["image"], sample=False)
        context = module.text_encoder(CAPTIONS)
        direct = module.objective(module.unet, latents, context, t=t, eps=eps)
        from_cache = module.objective(
            module.unet,
            module.vae.scale_latents(cached["latent_mean"]),
            cached["context"],
            t=t,
            eps=eps,
        )
    tol = cache_tolerance(root / "cache", atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(from_cache, direct, **tol)


def test_training_step_gives_the_same_loss_from_the_same_seed(cache):
    """Posterior sampling and caption dropout (p=0.5) included: the cached path draws the same
    random numbers as on-the-fly encoding (those of the batch's number: `module.calls`)."""
    root, _ = cache
    module, cached, images_ = make_module(caption_dropout=0.5), cached_batch(root), image_batch()
    for number in range(3):
        module.calls = number
        direct = module.training_step(images_, 0)
        module.calls = number
        from_cache = module.training_step(cached, 0)
        tol = cache_tolerance(root / "cache", atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(from_cache, direct, **tol)
    assert module.captions.dropout == 0.5


def test_float16_cache_is_close(cache, tmp_path):
    root, _ = cache
    module = make_module()
    write_latent_shards(
        [str(root / "src.tar")],
        tmp_path,
        module.vae,
        module.text_encoder,
        image_size=SIZE,
        batch_size=8,
        dtype="float16",
        progress=False,
    )
    meta, empty = read_cache_metadata([str(tmp_path / "00000.tar")])
    half = next(iter(make_latent_dataset([str(tmp_path / "00000.tar")], empty, 16, False, OPTIONS)))
    full = cached_batch(root)
    for k in ("latent_mean", "latent_std", "context"):
        torch.testing.assert_close(half[k], full[k], atol=2e-3, rtol=2e-3)


def test_data_module_streams_flips_and_trains_with_lightning(cache, tmp_path):
    import lightning as L

    root, _ = cache
    dm = LatentDataModule(
        str(root / "cache/*.tar"),
        batch_size=4,
        image_size=SIZE,
        num_workers=0,
        batches_per_epoch=3,
        flip=True,
        shuffle_buffer=4,
    )
    means = torch.cat([b["latent_mean"] for b in dm.train_dataloader()])
    full = cached_batch(root)
    with tarfile.open(root / "cache/00000.tar") as tar:
        flipped = [
            np.load(io.BytesIO(tar.extractfile(f"{i:09d}.mean_flip.npy").read())) for i in range(6)
        ]
    known = [*full["latent_mean"], *map(torch.from_numpy, flipped)]
    assert means.shape == (12, 4, 8, 8)
    assert all(any(torch.equal(m, k) for k in known) for m in means)
    trainer = L.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    module = make_module()
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2


def test_refuses_settings_the_cache_cannot_honour(cache):
    root, _ = cache
    pattern = str(root / "cache/*.tar")
    with pytest.raises(CacheError, match="random_crop"):
        LatentDataModule(pattern, image_size=SIZE, random_crop=True).cache()
    with pytest.raises(CacheError, match="image_size 64"):
        LatentDataModule(pattern, image_size=128).cache()
    with pytest.raises(CacheError, match="not cached-latent shards"):
        LatentDataModule(str(root / "src.tar"), image_size=SIZE).cache()


def test_refuses_flips_that_were_not_cached(cache, tmp_path):
    root, _ = cache
    module = make_module()
    write_latent_shards(
        [str(root / "src.tar")],
        tmp_path,
        module.vae,
        module.text_encoder,
        image_size=SIZE,
        batch_size=8,
        progress=False,
    )
    with pytest.raises(CacheError, match="no mirrored latents"):
        LatentDataModule(str(tmp_path / "*.tar"), image_size=SIZE, flip=True).cache()
    with pytest.raises(
        CacheError, match="other models or settings"
    ):  # no silent mixing in one folder
        write_latent_shards(
            [str(root / "src.tar")],
            tmp_path,
            module.vae,
            module.text_encoder,
            image_size=SIZE,
            flips=True,
            progress=False,
        )


def check(pattern: str, module: LatentDiffusion) -> LatentDataModule:
    dm = LatentDataModule(pattern, image_size=SIZE, num_workers=0)
    dm.use_encoders(module.vae, module.text_encoder)
    dm.setup("fit")
    return dm


def test_refuses_other_models_and_a_trainable_text_encoder(cache, tmp_path):
    import lightning as L

    root, _ = cache
    pattern = str(root / "cache/*.tar")
    check(pattern, make_module())  # the models the cache was made with: accepted
    other_vae = make_module()
    with torch.no_grad():
        next(other_vae.vae.parameters()).add_(1e-3)
    with pytest.raises(CacheError, match="VAE is not the one"):
        check(pattern, other_vae)
    with pytest.raises(CacheError, match="text encoder is not the one"):
        check(pattern, make_module(text=frozen_text(layer="penultimate")))
    trainable = make_module(text=frozen_text())
    trainable.text_encoder.requires_grad_(True)
    with pytest.raises(CacheError, match="text encoder is trainable"):
        check(pattern, trainable)
    with pytest.raises(ValueError, match="cannot train the text encoder"):
        trainable.training_step(cached_batch(root), 0)
    trainer = L.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    dm = LatentDataModule(pattern, image_size=SIZE, num_workers=0)
    dm.use_encoders(other_vae.vae, other_vae.text_encoder)
    with pytest.raises(CacheError, match="VAE is not the one"):  # checked when training starts
        trainer.fit(other_vae, datamodule=dm)


def test_refuses_an_incomplete_cache(cache, tmp_path):
    root, _ = cache
    meta = json.loads((root / "cache/_latents.json").read_text())
    (tmp_path / "_latents.json").write_text(json.dumps({**meta, "complete": False}))
    (tmp_path / "00000.tar").write_bytes((root / "cache/00000.tar").read_bytes())
    with pytest.raises(CacheError, match="incomplete"):
        LatentDataModule(str(tmp_path / "*.tar"), image_size=SIZE).cache()


def load_prepare():
    import importlib.util

    path = Path(__file__).parents[2] / "data/latents/prepare.py"
    spec = importlib.util.spec_from_file_location("prepare_latents", path)
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    return prepare


def prepare_args(root: Path) -> list[str]:
    return [
        "data=webdataset",
        f"data.train_shards={root / 'src.tar'}",
        f"data.image_size={SIZE}",
        "vae=tiny",
        "text_encoder=tiny",
        "text_encoder.frozen=true",
        "--device",
        "cpu",
        "--quiet",
    ]


def test_prepare_command_builds_parts_as_train_py_does(cache, tmp_path):
    """The tool composes configs/train.yaml and builds the model as train.py does (same seed and
    order), so train.py's model passes the cache's checks even with a randomly initialised
    text encoder (the tiny one)."""
    import lightning as L
    from hydra.utils import instantiate

    root, _ = cache
    prepare = load_prepare()
    assert prepare.main([str(tmp_path / "out"), "--dtype", "float32", *prepare_args(root)]) == 0
    meta, _ = read_cache_metadata([str(tmp_path / "out/00000.tar")])
    assert meta["config"]["vae"]["_target_"] == "ldm.models.autoencoder.AutoencoderKL"
    assert meta["text_encoder"]["settings"]["context_length"] == 16 and not meta["flips"]
    cfg = prepare.compose_config(
        [
            "data=latents",
            f"data.train_shards={tmp_path / 'out/*.tar'}",
            f"data.image_size={SIZE}",
            "vae=tiny",
            "text_encoder=tiny",
            "text_encoder.frozen=true",
        ]
    )
    L.seed_everything(cfg.seed)
    dm, module = instantiate(cfg.data), instantiate(cfg.model)
    dm.use_encoders(module.vae, module.text_encoder)
    dm.setup("fit")


def test_prepare_command_applies_filters_and_refuses_what_training_would(cache, tmp_path):
    root, _ = cache
    prepare, args = load_prepare(), prepare_args(root)
    with pytest.raises(SystemExit, match="1"):
        prepare.main([str(tmp_path / "crop"), *args, "data.random_crop=true"])
    with pytest.raises(SystemExit, match="1"):
        prepare.main([str(tmp_path / "trainable"), *args, "text_encoder.frozen=false"])
    # the data config's metadata filters apply while encoding: widths 80, 64, 64, 100, 64, 72
    assert prepare.main([str(tmp_path / "wide"), *args, "++data.filters.min_width=72"]) == 0
    meta, _ = read_cache_metadata([str(tmp_path / "wide/00000.tar")])
    assert meta["counts"]["written"] == 3 and meta["config"]["data_filters"] == {"min_width": 72}


def test_latents_configs_compose_and_instantiate():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from ldm.config import ROOT, register_resolvers

    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        cfg = compose("train", overrides=["data.cache_text=true", "text_encoder.frozen=true"])
        plain = compose("train", overrides=["data=latents", "data.train_shards=x/*.tar"])
    dm = instantiate(cfg.data)
    assert (
        isinstance(dm, LatentDataModule)
        and dm.options.image_size == 64
        and not dm.options.random_crop
    )
    assert cfg.text_encoder.frozen and cfg.data.val_shards.endswith("shards/val/*.tar")
    assert isinstance(instantiate(plain.data), LatentDataModule)


def test_latents_only_cache_trains_the_text_encoder_with_the_same_loss(cache, tmp_path):
    """Without a text encoder the cache holds posteriors only; the (trainable) text encoder runs
    on the cached captions, and a step draws the same numbers as on-the-fly encoding."""
    root, _ = cache
    module = make_module(caption_dropout=0.5, text=tiny_parts()[2])  # trainable
    write_latent_shards(
        [str(root / "src.tar")],
        tmp_path,
        module.vae,
        None,
        image_size=SIZE,
        batch_size=4,
        dtype="float32",
        progress=False,
    )
    meta, empty = read_cache_metadata([str(tmp_path / "00000.tar")])
    assert meta["text_encoder"] is None and empty is None
    cached = next(
        iter(make_latent_dataset([str(tmp_path / "00000.tar")], None, 16, False, OPTIONS))
    )
    assert "context" not in cached and cached["caption"] == CAPTIONS
    check(str(tmp_path / "*.tar"), module)  # any text encoder, trainable too
    for number in range(3):
        module.calls = number
        direct = module.training_step(image_batch(), 0)
        module.calls = number
        from_cache = module.training_step(cached, 0)
        torch.testing.assert_close(
            from_cache, direct, **cache_tolerance(tmp_path, atol=1e-6, rtol=1e-5)
        )
    from_cache.backward()
    assert any(p.grad is not None for p in module.text_encoder.parameters())


def test_data_module_builds_its_cache_once_and_rebuilds_it_for_another_vae(cache, tmp_path):
    root, _ = cache
    module = make_module(text=tiny_parts()[2])
    dm = LatentDataModule(
        str(tmp_path / "latents/*.tar"),
        image_size=SIZE,
        num_workers=0,
        batch_size=4,
        source_shards=str(root / "src.tar"),
        cache_dtype="float32",
    )
    with pytest.raises(CacheError, match="use_encoders"):
        dm.prepare_data()
    dm.use_encoders(module.vae, module.text_encoder)
    dm.prepare_data()
    dm.setup("fit")
    shard = tmp_path / "latents/00000.tar"
    meta, _ = read_cache_metadata([str(shard)])
    assert meta["counts"]["written"] == 6 and meta["text_encoder"] is None
    built = shard.stat().st_mtime_ns
    dm.prepare_data()  # complete and of these encoders: kept
    assert shard.stat().st_mtime_ns == built
    with torch.no_grad():
        next(module.vae.parameters()).add_(1e-3)
    dm.prepare_data()  # another VAE: rebuilt beside, swapped in, and then accepted
    dm.setup("fit")
    assert read_cache_metadata([str(shard)])[0]["vae"]["sha256"] != meta["vae"]["sha256"]


def test_data_module_caches_text_exactly_when_the_text_encoder_is_frozen(cache, tmp_path):
    root, _ = cache
    module = make_module(text=tiny_parts()[2].requires_grad_(False))

    def data(cache_text):
        return LatentDataModule(
            str(tmp_path / "latents/*.tar"),
            image_size=SIZE,
            num_workers=0,
            batch_size=4,
            source_shards=str(root / "src.tar"),
            cache_text=cache_text,
            cache_dtype="float32",
        )

    dm = data(None)
    dm.use_encoders(module.vae, module.text_encoder)
    dm.prepare_data()
    dm.setup("fit")
    assert read_cache_metadata([str(tmp_path / "latents/00000.tar")])[0]["text_encoder"]
    assert data(False).text_to_cache(module.text_encoder) is None
    word = frozen_text()  # a frozen tower with a new word that trains: its text changes
    word.add_embedding("<w>", torch.nn.Parameter(torch.zeros(1, 32)))
    assert data(None).text_to_cache(word) is None
    module.text_encoder.requires_grad_(True)
    assert data(None).text_to_cache(module.text_encoder) is None
    with pytest.raises(CacheError, match="trainable"):
        data(True).text_to_cache(module.text_encoder)


def test_a_resumed_latent_loader_reads_exactly_the_rest_of_its_epoch(cache):
    """The cache is read by the same reader as image shards: a loader placed after n batches of
    the run (a resume) yields what the uninterrupted run read next, flips included."""
    from ldm.data.webdataset import EpochLoader

    root, _ = cache
    _, empty = read_cache_metadata([str(root / "cache/00000.tar")])
    ds = make_latent_dataset(
        [str(root / "cache/00000.tar")],
        empty,
        2,
        True,
        DataOptions(SIZE, flip=True, shuffle_buffer=3),
        batches_per_epoch=3,
    )

    def read(n):
        return [(b["key"], b["latent_mean"]) for b in EpochLoader(ds, 2, lambda: n)]

    epochs = [read(0), read(6)]  # 2 workers x 3 batches an epoch
    assert [len(e) for e in epochs] == [6, 6] and epochs[0] != epochs[1]
    for n in range(12):
        rest = read(n)
        whole = epochs[n // 6][n % 6 :]
        assert [k for k, _ in rest] == [k for k, _ in whole]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(rest, whole))


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_an_interrupted_rebuild_leaves_the_old_cache_whole_and_readable(
    cache, tmp_path, monkeypatch
):
    """A cache of another VAE is rebuilt beside the old one and swapped in complete: a build
    that fails midway leaves the old cache as it was (and loadable), the next one resumes it."""
    import ldm.data.latents_write as latents

    root, _ = cache
    module, out = make_module(), tmp_path / "latents"
    sources = [str(root / "src.tar")] * 2
    build = functools.partial(
        write_latent_shards, sources, out, module.vae, None, SIZE, 4, dtype="float32"
    )
    build(progress=False)
    (out / "notes.txt").write_text("mine, not the cache's")
    before = shard_bytes(out)
    with torch.no_grad():
        next(module.vae.parameters()).add_(1e-3)
    calls, encode = [], latents.encode_batch

    def killed_in_the_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # 4 + 2 samples a shard: the first shard is whole
            raise RuntimeError("killed")
        return encode(*args, **kwargs)

    monkeypatch.setattr(latents, "encode_batch", killed_in_the_second_shard)
    with pytest.raises(RuntimeError, match="killed"):
        build(progress=False, replace=True)
    assert shard_bytes(out) == before
    urls = [str(out / "00000.tar"), str(out / "00001.tar")]
    meta, empty = read_cache_metadata(urls)
    batch = next(iter(make_latent_dataset(urls, empty, 16, False, OPTIONS)))
    assert meta["complete"] and len(batch["key"]) == 12
    monkeypatch.setattr(latents, "encode_batch", encode)
    counts = build(progress=False, replace=True)
    assert counts["written"] == 6  # the first shard was kept from the interrupted build
    assert read_cache_metadata(urls)[0]["vae"]["sha256"] != meta["vae"]["sha256"]
    assert (out / "notes.txt").read_text() == "mine, not the cache's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latents"]  # nothing left beside


def test_a_hostile_source_sample_is_skipped_with_its_reason_when_caching(cache, tmp_path):
    from tests.data.shard_helpers import png_strip, sample, write_sparse_shard

    strip = sample("strip")
    strip[1]["png"] = png_strip(1, 32000)
    src = write_sparse_shard(
        tmp_path / "src.tar",
        [
            sample("good0"),
            strip,
            ("huge", {"png": 1 << 30, "txt": b"x"}),
            ("deep", {**sample("deep")[1], "json": b"[" * 100_000}),
            sample("good1"),
        ],
    )
    module = make_module()
    counts = write_latent_shards(
        [str(src)], tmp_path / "out", module.vae, None, SIZE, 4, progress=False
    )
    assert counts["written"] == 2
    assert sorted(counts["skipped"]) == sorted(
        f"{src}:{s}" for s in ("strip (bad_aspect)", "member_too_large", "deep (bad_metadata)")
    )
