"""train.py and sample.py as a user runs them: a few-step run, sampling from its file, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import subprocess_env, tiny_overrides
from ldm import precision
from ldm.checkpoints import read_config
from wandb_records import history

ROOT = Path(__file__).resolve().parent.parent


def run(script: str, *overrides: str, cwd: Path, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**subprocess_env(cwd), **env_vars}
    command = [script, *overrides] if script == "-m" else [str(ROOT / script), *overrides]
    return subprocess.run(
        [sys.executable, *command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def tiny_train_overrides(tmp: Path) -> list[str]:
    """The tests' tiny run (conftest.tiny_overrides) with its shards in tmp/shards, its run in
    tmp/run, and throughput logged every 2 steps (test_train_writes_weights_grids... reads it)."""
    shards = tmp / "shards"
    return [
        *tiny_overrides(shards),
        "callbacks.throughput.window=2",
        f"hydra.run.dir={tmp / 'run'}",
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("e2e")
    result = run("train.py", *tiny_train_overrides(tmp), cwd=tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "run"


def test_default_run_caches_latents_and_text_then_trains_on_them(tmp_path):
    """The default's data (data=shapes_cached, text encoder frozen): the cache is built from the
    rendered shards before the first step, with the text embeddings, and training reads it."""
    from ldm.data.latents import read_cache_metadata

    cache = tmp_path / "latents"
    args = [
        *tiny_train_overrides(tmp_path),
        "data=shapes_cached",
        "text_encoder.frozen=true",
        f"data.source_shards={tmp_path}/shards/train/*.tar",
        f"data.train_shards={cache}/*.tar",
        "trainer.max_steps=2",
        "callbacks.sample_grid=null",
    ]
    result = run("train.py", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    meta, empty = read_cache_metadata(sorted(map(str, cache.glob("*.tar"))))
    assert meta["complete"] and meta["counts"]["written"] == 64
    assert meta["text_encoder"] is not None and empty is not None
    assert (tmp_path / "run/model.safetensors").is_file()


def test_train_writes_weights_grids_checkpoint_and_offline_wandb_history(trained):
    assert (trained / "model.safetensors").is_file()
    config = read_config(trained / "model.safetensors")
    assert config["unet"]["model_channels"] == 32 and config["diffusion"]["prediction"] == "v"
    grids = sorted((trained / "samples").glob("step_*.png"))
    assert [g.name for g in grids] == ["step_000000.png", "step_000002.png", "step_000004.png"]
    assert Image.open(grids[-1]).size[0] > 64  # a grid, not one image
    assert (trained / "checkpoints" / "last.ckpt").is_file()
    from ldm.training.checkpointing import read_checkpoint

    assert read_checkpoint(trained / "checkpoints" / "last.ckpt")["state_dict"]  # data only
    run_files = list((trained / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    rows = history(run_files[0])
    losses = [row["train/loss"] for row in rows if "train/loss" in row]
    assert len(losses) == 4 and all(loss > 0 for loss in losses)
    perf = [row for row in rows if "perf/unet_tflops" in row]
    assert len(perf) == 2 and all(
        r["perf/unet_tflops"] > 0 and r["perf/images_per_s"] > 0 for r in perf
    )
    assert all(0 <= r["perf/data_wait"] < 1 and r["perf/peak_mem_gib"] > 0 for r in perf)
    summary = json.loads((trained / "train_summary.json").read_text())
    assert summary["precision"] == precision.resolve("auto", "cpu").value  # this CPU's choice


@pytest.mark.parametrize("setting", ["bf16-mixed", "16-mixed", "ddp"])
def test_train_runs_in_each_precision_with_the_default_optimizer_and_clipping(setting, tmp_path):
    """Fused AdamW and gradient_clip_val 1.0 as configured by default, in bf16 autocast, in fp16
    with loss scaling, and on 2 DDP ranks in the precision `auto` picks (bf16 under
    LDM_CPU_BF16=1): each run trains its steps and writes its weights."""
    overrides = tiny_train_overrides(tmp_path)
    overrides += ["callbacks.sample_grid=null", "callbacks.adherence=null"]
    overrides += ["trainer.limit_val_batches=0"]  # steps only: the callbacks are tested above
    ranks = ["trainer=cpu", "trainer.devices=2", "strategy=ddp"]
    extra = ranks if setting == "ddp" else [f"trainer.precision={setting}"]
    result = run("train.py", *overrides, "trainer.max_steps=2", *extra, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run/train_summary.json").read_text())
    wanted = precision.resolve("auto", "cpu").value if setting == "ddp" else setting
    assert summary["step"] == 2 and summary["precision"] == wanted
    assert (tmp_path / "run/model.safetensors").is_file()


def test_sample_defaults_draw_the_same_picture_on_either_cpu_kind(trained, tmp_path):
    """`precision=auto` samples in float32 on a CPU, so a bf16 CPU (LDM_CPU_BF16=1) and an
    AVX2 one draw the same image; bf16 on request draws another (the check can tell)."""
    args = [f"ckpt={trained / 'model.safetensors'}", "prompt=a red circle", "n=1", "steps=3"]
    pictures = {}
    for name, switch, extra in [
        ("avx2", "0", []),
        ("bf16", "1", []),
        ("asked", "1", ["precision=bf16"]),
    ]:
        out = tmp_path / name
        result = run(
            "sample.py", *args, *extra, f"out_dir={out}", cwd=tmp_path, LDM_CPU_BF16=switch
        )
        assert result.returncode == 0, result.stderr[-3000:]
        pictures[name] = np.asarray(Image.open(out / "000000.png"), dtype=int)
    assert np.abs(pictures["avx2"] - pictures["bf16"]).max() == 0
    assert np.abs(pictures["asked"] - pictures["avx2"]).max() > 0


def test_sample_writes_images_with_metadata_and_a_grid(trained, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a blue background\na green square on a white background\n")
    out = tmp_path / "out"
    # a stochastic sampler: its per-step noise must follow each image's seed too
    result = run(
        "sample.py",
        f"ckpt={trained / 'model.safetensors'}",
        f"prompt={prompts}",
        "n=2",
        "seed=5",
        "sampler=euler_ancestral",
        "steps=2",
        "negative_prompt=blurry",
        f"out_dir={out}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    files = sorted(p.name for p in out.glob("*.png"))
    assert files == ["000005.png", "000006.png", "000007.png", "000008.png", "grid.png"]
    meta = Image.open(out / "000007.png").text
    assert meta["prompt"] == "a green square on a white background"
    assert meta["negative_prompt"] == "blurry" and meta["seed"] == "7"
    assert (
        meta["sampler"] == "euler_ancestral"
        and meta["steps"] == "2"
        and float(meta["cfg_scale"]) == 4.0
    )
    assert meta["precision"] == "32-true"  # sampling on a CPU: float32 whatever its kind
    # The same seed gives the same image whatever else is in the batch (CPU kernels may round
    # differently for another batch size: equal up to a unit of the last 8-bit step).
    again = tmp_path / "again"
    run(
        "sample.py",
        f"ckpt={trained / 'model.safetensors'}",
        "prompt=a green square on a white background",
        "n=1",
        "seed=7",
        "sampler=euler_ancestral",
        "sampler.steps=2",
        "negative_prompt=blurry",
        f"out_dir={again}",
        cwd=tmp_path,
    )
    alone = np.asarray(Image.open(again / "000007.png"), dtype=int)
    batched = np.asarray(Image.open(out / "000007.png"), dtype=int)
    assert np.abs(alone - batched).max() <= 2
    other_seed = np.asarray(Image.open(out / "000006.png"), dtype=int)
    assert np.abs(other_seed - batched).max() > 2


def _one_error_line(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert all(w in result.stderr for w in words), result.stderr


def test_missing_and_unreadable_checkpoints_are_one_clear_line(tmp_path):
    out = tmp_path / "out"
    result = run(
        "sample.py", "ckpt=nowhere.safetensors", "prompt=x", f"out_dir={out}", cwd=tmp_path
    )
    _one_error_line(result, "error: checkpoint", "does not exist", "ckpt=")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x07not a checkpoint")
    result = run("sample.py", f"ckpt={bad}", "prompt=x", f"out_dir={out}", cwd=tmp_path)
    _one_error_line(result, "error:", "not a readable safetensors")
    assert not out.exists()


def test_bad_sampler_option_is_one_clear_line(tmp_path):
    out = tmp_path / "out"
    result = run(
        "sample.py",
        "ckpt=nowhere.safetensors",
        "prompt=x",
        "sampler=euler",
        "sampler.sigmas=karass",
        f"out_dir={out}",
        cwd=tmp_path,
    )
    _one_error_line(result, "error: unknown sigma spacing 'karass'", "karras")
    assert not out.exists()


def test_missing_prompt_file_is_one_clear_line(trained, tmp_path):
    out = tmp_path / "out"
    result = run(
        "sample.py",
        f"ckpt={trained / 'model.safetensors'}",
        "prompt=missing.txt",
        f"out_dir={out}",
        cwd=tmp_path,
    )
    _one_error_line(result, "error: prompt file", "missing.txt", "does not exist")
    assert not out.exists()


def test_unknown_override_names_the_key_and_the_fix(tmp_path):
    result = run(
        "train.py", "trainer.max_stepz=3", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path
    )
    _one_error_line(result, "Could not override 'trainer.max_stepz'", "+trainer.max_stepz")
    assert not (tmp_path / "run").exists()


def test_shard_pattern_that_matches_nothing_leaves_no_run_behind(tmp_path):
    run_dir = tmp_path / "run"
    result = run(
        "train.py",
        "data.prepare=null",
        f"data.source_shards={tmp_path}/none/*.tar",  # the default caches from these
        f"data.train_shards={tmp_path}/none/*.tar",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    _one_error_line(result, "error: shard pattern", "matches no file")
    assert not run_dir.exists()


@pytest.fixture(scope="module")
def lora_run(trained, tmp_path_factory) -> Path:
    """A LoRA (kohya's set, on the tiny U-Net) trained from the run above, 4 steps."""
    tmp = tmp_path_factory.mktemp("lora")
    overrides = [o for o in tiny_train_overrides(trained.parent) if not o.startswith("hydra.")]
    result = run(
        "train.py",
        *overrides,
        "model/trains=lora",
        f"init={trained / 'model.safetensors'}",
        "export=lora.safetensors",
        "callbacks.checkpoint.keep=-1",
        f"hydra.run.dir={tmp / 'run'}",
        cwd=tmp,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "run"


def test_lora_run_writes_a_small_kohya_file_and_a_slim_checkpoint(lora_run, trained):
    import torch

    from ldm.checkpoints import files

    state, meta = files.read(lora_run / "lora.safetensors")
    assert state and all(k.startswith("lora_unet_") for k in state)
    suffixes = {k.split(".", 1)[1] for k in state}
    assert suffixes == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "8"
    assert (lora_run / "samples/step_000000.png").is_file()  # the base model, before training
    ckpt = torch.load(lora_run / "checkpoints/last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["state_dict"] and all(k.startswith("unet_lora.") for k in ckpt["state_dict"])
    n_params = sum(v.numel() for v in ckpt["state_dict"].values())
    adam = ckpt["optimizer_states"][0]["state"]
    assert len(adam) == sum(1 for k in ckpt["state_dict"] if k.endswith(".weight"))  # one per param
    assert n_params < 0.2 * sum(
        v.numel() for v in files.read(trained / "model.safetensors")[0].values()
    )


def test_lora_run_resumes_with_its_optimizer_state(lora_run, trained, tmp_path):
    overrides = [o for o in tiny_train_overrides(trained.parent) if not o.startswith("hydra.")]
    ckpt = sorted((lora_run / "checkpoints").glob("*step=2*.ckpt"))[0]
    result = run(
        "train.py",
        *overrides,
        "model/trains=lora",
        f"init={trained / 'model.safetensors'}",
        "export=lora.safetensors",
        f"resume='{ckpt}'",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "run/train_summary.json").read_text())["step"] == 4
    bad = run(
        "train.py",
        *overrides,
        "model/trains=lora",
        f"resume='{ckpt}'",
        f"hydra.run.dir={tmp_path / 'bad'}",
        cwd=tmp_path,
    )  # no init=
    _one_error_line(bad, "error:", "frozen parts", "init=")


def test_sample_with_loras_and_merge_them_into_one_file(lora_run, trained, tmp_path):
    lora = lora_run / "lora.safetensors"
    result = run(
        "sample.py",
        f"ckpt={trained / 'model.safetensors'}",
        f"lora=[{lora},{lora}]",
        "lora_scale=[0.5,0.5]",
        "prompt=a red circle on a blue background",
        "n=1",
        "steps=2",
        f"out_dir={tmp_path / 'two'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        Image.open(tmp_path / "two/000000.png").text["lora"]
        == "lora.safetensors:0.5, lora.safetensors:0.5"
    )
    merged = tmp_path / "merged.safetensors"
    result = run(
        "-m",
        "ldm.lora",
        "merge",
        str(trained / "model.safetensors"),
        str(lora),
        str(merged),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run(
        "sample.py",
        f"ckpt={merged}",
        "prompt=a red circle on a blue background",
        "n=1",
        "steps=2",
        f"out_dir={tmp_path / 'merged'}",
        cwd=tmp_path,
    )
    a = np.asarray(Image.open(tmp_path / "two/000000.png"), dtype=int)
    b = np.asarray(Image.open(tmp_path / "merged/000000.png"), dtype=int)
    assert np.abs(a - b).max() <= 1  # two halves merged at sampling = the whole merged offline
    bad = run(
        "-m",
        "ldm.lora",
        "merge",
        str(ROOT / "data/shapes/vae.safetensors"),
        str(lora),
        str(tmp_path / "no.safetensors"),
        cwd=tmp_path,
    )
    _one_error_line(bad, "error:")
    assert not (tmp_path / "no.safetensors").exists()


def test_dreambooth_makes_class_images_once_and_trains_with_them(trained, tmp_path):
    """experiment=sd15_dreambooth on the tiny parts: the base model draws the class images
    (kept, then reused by the next run), mixed with the instance shards at a loss weight."""
    shards = trained.parent / "shards"
    args = [
        "experiment=sd15_dreambooth",
        "debug=tiny_parts",
        "callbacks.throughput.window=2",
        f"init={trained / 'model.safetensors'}",
        f"instance_shards={shards}/train/00000.tar",
        "class_prompt=a red circle on a blue background",
        "class_images.n=6",
        f"class_images.out_dir={tmp_path / 'class'}",
        "class_images.sampler.steps=2",
        "data.image_size=64",
        "data.random_crop=false",
        f"data.val_shards={shards}/val/*.tar",
        "callbacks.sample_grid.prompts=[a sks circle]",
        "model.trains.unet.rank=4",
        "model.trains.unet.alpha=4",
    ]
    first = run("train.py", *args, f"hydra.run.dir={tmp_path / 'a'}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    made = sorted((tmp_path / "class").glob("*.tar"))
    assert len(made) == 1 and (tmp_path / "a/lora.safetensors").is_file()
    stamp = made[0].stat().st_mtime_ns
    again = run("train.py", *args, f"hydra.run.dir={tmp_path / 'b'}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert made[0].stat().st_mtime_ns == stamp  # reused, not redrawn
    assert "class images: reusing" in again.stdout + again.stderr


def test_textual_inversion_writes_a_word_sample_py_reads(trained, tmp_path):
    overrides = [o for o in tiny_train_overrides(trained.parent) if not o.startswith("hydra.")]
    result = run(
        "train.py",
        *overrides,
        "model/trains=textual_inversion",
        "model.trains.word='<pastel>'",
        "model.trains.vectors=2",
        f"init={trained / 'model.safetensors'}",
        "export=pastel.safetensors",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    from ldm.checkpoints.embeddings import read_embedding

    vectors, word = read_embedding(tmp_path / "run/pastel.safetensors")
    assert word == "<pastel>" and vectors.shape == (2, 32)
    from ldm.training.checkpointing import read_checkpoint

    assert read_checkpoint(tmp_path / "run/checkpoints/last.ckpt")["state_dict"]  # data only
    out = tmp_path / "out"
    result = run(
        "sample.py",
        f"ckpt={trained / 'model.safetensors'}",
        f"embedding={tmp_path / 'run/pastel.safetensors'}",
        "prompt='a red circle on a blue background, <pastel>'",
        "n=1",
        "steps=2",
        f"out_dir={out}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert Image.open(out / "000000.png").text["embedding"] == "pastel.safetensors"


def test_the_sdxl_structured_shapes_recipe_trains_exports_and_samples(tmp_path):
    """experiment=shapes_sdxl for a few steps (the default's tiny run, keeping the recipe's
    two-tower text encoder and micro-conditioned U-Net): its file is an SDXL single file that
    sample.py reads back, and the micro-conditioning's crop changes the image; a LoRA trained
    on it (U-Net and both towers) is a kohya SDXL file that sample.py applies."""
    from safetensors import safe_open

    args = [
        *tiny_train_overrides(tmp_path),
        "experiment=shapes_sdxl",
        "unet=shapes_sdxl",
        "text_encoder=shapes_sdxl",
        "text_encoder.frozen=true",
    ]
    result = run("train.py", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    weights = tmp_path / "run/model.safetensors"
    with safe_open(str(weights), "pt") as f:
        keys = set(f.keys())
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert any(k.startswith("conditioner.embedders.1.model.") for k in keys)
    for crop in ("[0,0]", "[16,8]"):
        out = tmp_path / f"crop{crop[1:3].strip(',')}"
        common = ["prompt=a red circle on a blue background", "n=1", "steps=3"]
        result = run(
            "sample.py", f"ckpt={weights}", *common, f"crop={crop}", f"out_dir={out}", cwd=tmp_path
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert Image.open(out / "000000.png").text["crop"] == crop.replace(",", ", ")
    # After 4 steps the U-Net has barely learnt to read its vector conditioning, so the images
    # differ by a rounding step at most (what a trained model does with a crop is measured in
    # bench/results/shapes_sdxl/); its prediction moves with the crop all the same.
    import torch

    from ldm.pipeline import Pipeline

    pipe, _ = Pipeline.load(str(weights))
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    with torch.no_grad():
        preds = [
            pipe.unet(x, t, **pipe.text_encoder.condition(["a red circle"], torch.tensor([ids])))
            for ids in ([64.0, 64, 0, 0, 64, 64], [64.0, 64, 16, 8, 64, 64])
        ]
    # beyond float32 rounding (a few eps of the output), by 100 eps at least
    eps = torch.finfo(torch.float32).eps
    assert (preds[0] - preds[1]).abs().max() > 100 * eps * preds[0].abs().max()

    # a LoRA on it, U-Net and both towers: kohya's SDXL file, which sample.py applies
    from ldm.checkpoints import files

    lora_args = [o for o in args if not o.startswith("hydra.")]
    result = run(
        "train.py",
        *lora_args,
        f"init={weights}",
        "model/trains=lora",
        "+lora_preset@model.trains.text_encoder=text",
        "export=lora.safetensors",
        f"hydra.run.dir={tmp_path / 'lora'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    state, meta = files.read(tmp_path / "lora/lora.safetensors")
    stems = {k.split(".")[0] for k in state}
    assert {s.split("_")[1] for s in stems} == {"unet", "te1", "te2"}
    assert all(
        s.startswith(
            (
                "lora_unet_input_blocks_",
                "lora_unet_middle_block_",
                "lora_unet_output_blocks_",
                "lora_te",
            )
        )
        for s in stems
    )
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    ups = [v for k, v in state.items() if k.startswith("lora_te2_") and "lora_up" in k]
    assert any(v.any() for v in ups)  # the second tower's adapters trained off their zero start
    out = tmp_path / "with_lora"
    result = run(
        "sample.py",
        f"ckpt={weights}",
        *common,
        f"lora={tmp_path / 'lora/lora.safetensors'}",
        f"out_dir={out}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert Image.open(out / "000000.png").text["lora"].startswith("lora.safetensors")
