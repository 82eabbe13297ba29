"""Stable Diffusion formats in and out: diffusers folders written by diffusers itself, SD single
files read back by diffusers' own conversion functions, exact round trips, the CLI.

Models are small with SD's exact structure (tests/sd_fixtures.py) and random weights."""

from __future__ import annotations

import json

import pytest
import torch

from ldm.checkpoints import convert, export, files, layout, load_model
from ldm.diffusion.prediction import Prediction
from sd_fixtures import TEXT, UNET, VAE, randomize_

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers.loaders import single_file_utils as sfu  # noqa: E402

from ldm.checkpoints.diffusers_configs import diffusers_unet_config, diffusers_vae_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def _clip_config(family: str) -> dict:
    cfg = TEXT[family]["text_cfg"]
    layers = cfg["layers"] - (1 if family == "sd2" else 0)  # SD 2 folders stop one block early
    return dict(
        vocab_size=49408,
        hidden_size=cfg["width"],
        intermediate_size=4 * cfg["width"],
        num_hidden_layers=layers,
        num_attention_heads=cfg["heads"],
        max_position_embeddings=cfg["context_length"],
        hidden_act="quick_gelu" if family == "sd1" else "gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407 if family == "sd1" else 0,
    )


def make_diffusers_folder(root, family: str, prediction: str = "eps"):
    """A pipeline folder written by diffusers/transformers `save_pretrained`, random weights."""
    torch.manual_seed(0)
    unet = randomize_(
        diffusers.UNet2DConditionModel(**diffusers_unet_config(UNET[family])), 1
    ).eval()
    vae = randomize_(diffusers.AutoencoderKL(**diffusers_vae_config(VAE)), 2).eval()
    text = randomize_(
        transformers.CLIPTextModel(transformers.CLIPTextConfig(**_clip_config(family))), 3, 0.02
    ).eval()
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    text.save_pretrained(root / "text_encoder")
    pred = "v_prediction" if prediction == "v" else "epsilon"
    diffusers.DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=pred
    ).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return unet, vae, text


def _no_text_model_prefix(state: dict) -> dict:
    """transformers 5 saves CLIPTextModel without the `text_model.` level that 4.x files (and
    ours, for the tools that expect it) have; both versions load either."""
    return {k.removeprefix("text_model."): v for k, v in state.items()}


def unet_inputs(context_dim: int):
    g = torch.Generator().manual_seed(5)
    return (
        torch.randn(2, 4, 16, 16, generator=g),
        torch.tensor([10, 900]),
        torch.randn(2, 7, context_dim, generator=g),
    )


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def family_folder(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    refs = make_diffusers_folder(
        root / "pipe", request.param, "v" if request.param == "sd2" else "eps"
    )
    return request.param, root, refs


def test_diffusers_folder_loads_with_parity(family_folder):
    family, root, (unet, vae, text) = family_folder
    model = load_model(root / "pipe")
    assert model.prediction == ("v" if family == "sd2" else "eps")
    assert model.text_encoder.layer == ("penultimate" if family == "sd2" else "last")
    x, t, context = unet_inputs(UNET[family]["context_dim"])
    ids = model.text_encoder.tokenize(["an astronaut riding a horse", ""])
    with torch.no_grad():
        expected = unet(x, t, encoder_hidden_states=context).sample
        assert (model.unet(x, t, context) - expected).abs().max() <= 1e-5 * expected.abs().max()
        image = torch.rand(1, 3, 32, 32) * 2 - 1
        torch.testing.assert_close(
            model.vae.posterior(image).mean, vae.encode(image).latent_dist.mean, rtol=0, atol=1e-5
        )
        hidden = text(input_ids=ids).last_hidden_state
        torch.testing.assert_close(model.text_encoder.encode_tokens(ids), hidden, rtol=0, atol=1e-5)


def test_diffusers_round_trip_is_exact_and_from_pretrained_loads(family_folder):
    family, root, (unet, _, _) = family_folder
    out = export.save_diffusers(root / "again", load_model(root / "pipe"))
    for part, name in (
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
    ):
        a, _ = files.read(root / "pipe" / part / f"{name}.safetensors")
        b, _ = files.read(out / part / f"{name}.safetensors")
        a, b = _no_text_model_prefix(a), _no_text_model_prefix(b)
        assert a.keys() == b.keys(), part
        assert all(torch.equal(a[k], b[k]) for k in a), part
    reloaded = diffusers.UNet2DConditionModel.from_pretrained(out, subfolder="unet").eval()
    diffusers.AutoencoderKL.from_pretrained(out, subfolder="vae")
    text = transformers.CLIPTextModel.from_pretrained(out / "text_encoder").eval()
    x, t, context = unet_inputs(UNET[family]["context_dim"])
    ours = load_model(out)
    assert ours.config["image_size"] == load_model(root / "pipe").config["image_size"]
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(x, t, encoder_hidden_states=context).sample,
            ours.unet(x, t, context),
            rtol=0,
            atol=1e-5,
        )
    # The tokenizer we write from open_clip's vocabulary is transformers' CLIPTokenizer.
    tok = transformers.CLIPTokenizer.from_pretrained(out / "tokenizer")
    # (no "!": SD 2's tokenizer pads with "!", which makes transformers split a literal "!" off as
    # the pad token, id 0, where CLIP's BPE says "!</w>"; the published SD 2 tokenizers do the same)
    prompts = ["a photograph of an astronaut riding a horse", "Hello, World."]
    ids = tok(
        prompts,
        padding="max_length",
        max_length=ours.text_encoder.context_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    assert torch.equal(ids, ours.text_encoder.tokenize(prompts))
    with torch.no_grad():
        torch.testing.assert_close(
            text(input_ids=ids).last_hidden_state,
            ours.text_encoder.encode_tokens(ids),
            rtol=0,
            atol=1e-5,
        )


def test_single_file_reads_back_exactly_through_diffusers_converters(family_folder, tmp_path):
    family, root, (unet, vae, text) = family_folder
    path = export.save_sd(tmp_path / "model.safetensors", load_model(root / "pipe"))
    state, meta = files.read(path)
    assert meta["modelspec.prediction_type"] == ("v" if family == "sd2" else "epsilon")
    assert (tmp_path / "model.yaml").is_file() == (family == "sd2")  # v models: YAML beside
    expected = {"unet": unet.state_dict(), "vae": vae.state_dict(), "text": text.state_dict()}
    got = {
        "unet": sfu.convert_ldm_unet_checkpoint(state, unet.config),
        "vae": sfu.convert_ldm_vae_checkpoint(state, vae.config),
    }
    if family == "sd1":
        assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in state)
        got["text"] = sfu.convert_ldm_clip_checkpoint(state)
    else:
        assert any(k.startswith("cond_stage_model.model.transformer.") for k in state)
        got["text"] = sfu.convert_open_clip_checkpoint(text, state)
    got["text"], expected["text"] = (
        _no_text_model_prefix(got["text"]),
        _no_text_model_prefix(expected["text"]),
    )
    for part in expected:
        exp, conv = expected[part], got[part]
        missing = set(exp) - set(conv)
        assert not missing, (part, sorted(missing)[:5])
        for k in exp:
            assert torch.equal(conv[k].reshape(exp[k].shape), exp[k]), (part, k)
            assert conv[k].shape == exp[k].shape or part == "vae", (part, k)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_diffusers_from_single_file_loads_our_export(family, tmp_path, monkeypatch):
    """diffusers' own single-file loader, offline: component configs from a folder we export,
    the architecture from the inference YAML we write beside the file."""
    from sd_fixtures import sd_parts

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_model(
        layout.save(tmp_path / "m.safetensors", sd_parts(family)),
        prediction="v" if family == "sd2" else None,
    )
    export.save_diffusers(tmp_path / "pipe", model)
    path = export.save_sd(tmp_path / "out.safetensors", model, write_yaml=True)
    pipe = diffusers.StableDiffusionPipeline.from_single_file(
        str(path),
        config=str(tmp_path / "pipe"),
        original_config=str(tmp_path / "out.yaml"),
        local_files_only=True,
        safety_checker=None,
    )
    x, t, context = unet_inputs(UNET[family]["context_dim"])
    ids = model.text_encoder.tokenize(["an astronaut riding a horse"])
    with torch.no_grad():
        torch.testing.assert_close(
            pipe.unet(x, t, encoder_hidden_states=context).sample,
            model.unet(x, t, context),
            rtol=0,
            atol=1e-5,
        )
        torch.testing.assert_close(
            pipe.text_encoder(ids).last_hidden_state,
            model.text_encoder.encode_tokens(ids),
            rtol=0,
            atol=1e-5,
        )
    assert pipe.scheduler.config.prediction_type == (
        "v_prediction" if family == "sd2" else "epsilon"
    )


def _original_layout(parts: dict, family: str) -> dict[str, torch.Tensor]:
    """An LDM training checkpoint's state dict: our SD names plus EMA weights (dot-less names),
    schedule buffers and, for SD 2, open_clip's logit_scale."""
    from ldm.checkpoints.keymaps import ldm_ema_key

    state = layout.sd_state(parts)
    for k, v in parts["unet"].state_dict().items():
        state[ldm_ema_key(k)] = v + 1.0
    state["model_ema.num_updates"] = torch.tensor(7)
    state["alphas_cumprod"] = torch.linspace(1, 0, 1000)
    if family == "sd2":
        state["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
    return state


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_sd_single_file_round_trip_and_ema(family, suffix, tmp_path):
    from sd_fixtures import sd_parts

    parts = sd_parts(family)
    state = _original_layout(parts, family)
    src = tmp_path / f"model{suffix}"
    if suffix == ".ckpt":
        torch.save({"state_dict": state, "global_step": 3}, src)
    else:
        files.save_state(src, state)
    model = load_model(src)
    assert model.source == "sd" and model.prediction == "eps"
    out, _ = files.read(export.save_sd(tmp_path / "out.safetensors", model))
    kept = {k for k in state if k.startswith(tuple(layout.PREFIXES.values()))}
    kept.discard("cond_stage_model.model.logit_scale")
    assert set(out) == kept
    assert all(torch.equal(out[k], state[k]) for k in kept)
    ema = load_model(src, use_ema=True)
    for k, v in parts["unet"].state_dict().items():
        assert torch.equal(ema.unet.state_dict()[k], v + 1.0), k


def test_fp16_file_stays_half_unless_asked(tmp_path):
    from sd_fixtures import sd_parts

    path = layout.save(tmp_path / "h.safetensors", sd_parts("sd1"), dtype=torch.float16)
    model = load_model(path)
    assert model.unet.input_blocks[0][0].weight.dtype == torch.float16
    assert (
        load_model(path, dtype=torch.float32).unet.input_blocks[0][0].weight.dtype == torch.float32
    )


@pytest.mark.parametrize("source", ["sd_file", "diffusers"])
def test_sample_py_loads_every_format(source, family_folder, tmp_path):
    from ldm.diffusion.samplers import SamplerConfig
    from ldm.pipeline import Pipeline
    from sd_fixtures import sd_parts

    family, root, _ = family_folder
    ckpt = (
        root / "pipe"
        if source == "diffusers"
        else layout.save(tmp_path / "m.ckpt.safetensors", sd_parts(family))
    )
    pipe, config = Pipeline.load(str(ckpt), torch.device("cpu"))
    assert pipe.prediction == ("v" if family == "sd2" and source == "diffusers" else "eps")
    images = pipe(["a red circle"], [0], SamplerConfig(name="ddim", steps=2), None, 32, 32)
    assert images.shape == (1, 32, 32, 3) and images.dtype == torch.uint8


def test_prediction_rules(tmp_path):
    from sd_fixtures import sd_parts

    state = layout.sd_state(sd_parts("sd2"))
    for name in ("v2-1_768-ema-pruned.safetensors", "base.safetensors"):
        files.save_state(tmp_path / name, state)
    assert load_model(tmp_path / "v2-1_768-ema-pruned.safetensors").prediction == "v"
    assert load_model(tmp_path / "base.safetensors").prediction == "eps"
    assert load_model(tmp_path / "base.safetensors", prediction="v").prediction == "v"
    (tmp_path / "base.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    assert load_model(tmp_path / "base.safetensors").prediction == "v"


def test_separate_vae_in_diffusers_names(family_folder, tmp_path):
    family, root, (_, vae, _) = family_folder
    from sd_fixtures import sd_parts

    path = layout.save(tmp_path / "m.safetensors", sd_parts(family))
    model = load_model(path, vae=str(root / "pipe" / "vae" / "diffusion_pytorch_model.safetensors"))
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(
            model.vae.posterior(image).mean, vae.encode(image).latent_dist.mean, rtol=0, atol=1e-5
        )


def test_open_clip_text_encoder_file(tmp_path):
    from sd_fixtures import sd_parts

    parts = sd_parts("sd2")
    path = layout.save(tmp_path / "m.safetensors", {"unet": parts["unet"], "vae": parts["vae"]})
    with pytest.raises(files.CheckpointError, match="no text_encoder weights.*text_encoder=FILE"):
        load_model(path)
    other = randomize_(sd_parts("sd2", seed=9)["text_encoder"], 9)
    # open_clip's own checkpoint layout: the whole CLIP model, its text tower at the top level
    clip = {k.removeprefix("model."): v for k, v in other.state_dict().items()}
    clip.update({"visual.proj": torch.zeros(2, 2), "logit_scale": torch.tensor(1.0)})
    torch.save(clip, tmp_path / "open_clip_pytorch_model.bin")
    model = load_model(path, text_encoder=str(tmp_path / "open_clip_pytorch_model.bin"))
    assert model.text_encoder.layer == "penultimate"
    with torch.no_grad():
        torch.testing.assert_close(model.text_encoder(["a cat"]), other(["a cat"]), rtol=0, atol=0)


def test_mismatch_and_bad_files_are_clear_errors(tmp_path):
    from sd_fixtures import sd_parts

    state = layout.sd_state(sd_parts("sd1"))
    del state["model.diffusion_model.out.2.weight"]
    state["model.diffusion_model.extra.weight"] = torch.zeros(1)
    files.save_state(tmp_path / "broken.safetensors", state)
    with pytest.raises(files.CheckpointError, match=r"1 missing \[out.2.weight\], 1 unexpected"):
        load_model(tmp_path / "broken.safetensors")
    with pytest.raises(files.CheckpointError, match="no EMA weights"):
        layout.save(tmp_path / "ok.safetensors", sd_parts("sd1"))
        load_model(tmp_path / "ok.safetensors", use_ema=True)
    (tmp_path / "pickle.ckpt").write_bytes(b"not a zip")
    with pytest.raises(files.CheckpointError, match="weights_only"):
        load_model(tmp_path / "pickle.ckpt")


def test_cli(tmp_path, capsys):
    from sd_fixtures import sd_parts

    src = layout.save(tmp_path / "m.safetensors", sd_parts("sd1"))
    assert convert.main([str(src), str(tmp_path / "pipe"), "--to", "diffusers"]) == 0
    assert (
        convert.main(
            [str(tmp_path / "pipe"), str(tmp_path / "back.safetensors"), "--dtype", "fp16"]
        )
        == 0
    )
    assert "wrote" in capsys.readouterr().out
    back, meta = files.read(tmp_path / "back.safetensors")
    assert meta["modelspec.architecture"] == "ldm-custom"
    assert back["model.diffusion_model.out.2.weight"].dtype == torch.float16
    with pytest.raises(SystemExit, match="1"):
        convert.main([str(tmp_path / "missing.safetensors"), str(tmp_path / "x.safetensors")])
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_train_initialised_from_an_sd_file_trains_and_its_export_loads(tmp_path):
    """train.py init=FILE with an LDM-layout .ckpt (EMA keys, schedule buffers) of the tiny
    configs' structure: two steps, then the exported file loads with the frozen VAE unchanged."""
    from hydra.utils import instantiate
    from test_entrypoints import run, tiny_train_overrides

    from conftest import tiny_configs

    cfg = tiny_configs()
    parts = {
        k: randomize_(instantiate(cfg[k]), i) for i, k in enumerate(("unet", "vae", "text_encoder"))
    }
    init = tmp_path / "init.ckpt"
    torch.save({"state_dict": _original_layout(parts, "sd2")}, init)
    overrides = tiny_train_overrides(tmp_path)
    result = run(
        "train.py",
        *overrides,
        f"init={init}",
        "trainer.max_steps=2",
        "callbacks.sample_grid=null",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "initialised unet, vae, text_encoder" in result.stdout + result.stderr
    model = load_model(tmp_path / "run" / "model.safetensors")
    for k, v in parts["vae"].state_dict().items():
        assert torch.equal(model.vae.state_dict()[k], v), k
    trained = model.unet.state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in parts["unet"].state_dict().items())
    # An init that does not fit is an error naming the part, before any training.
    bad = [f"init={init}", "unet.model_channels=16", f"hydra.run.dir={tmp_path / 'bad'}"]
    result = run("train.py", *overrides, *bad, cwd=tmp_path)  # a fresh folder: the run above stays
    assert result.returncode != 0 and "unet (init.ckpt) weights do not fit" in result.stderr


@pytest.mark.parametrize(
    "experiment, params", [("sd15_finetune", 859_520_964), ("sd21_768", 865_910_724)]
)
def test_sd_configs_are_what_detection_reads_from_their_weights(experiment, params):
    """The shipped SD configs, built on the meta device (no memory), and the architecture that
    `ldm.checkpoints.detect` reads back from their state dicts' names and shapes agree."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from ldm.checkpoints import detect
    from ldm.config import ROOT

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        cfg = compose("train", overrides=[f"experiment={experiment}", "init=x.safetensors"])
    with torch.device("meta"):
        parts = {k: instantiate(cfg[k]) for k in ("unet", "vae", "text_encoder")}
    assert sum(p.numel() for p in parts["unet"].parameters()) == params
    states = {k: layout.split(layout.sd_state(parts), k) for k in parts}
    found = detect.sd_config(states, __import__("pathlib").Path("m.safetensors"), {}, None)
    for k in parts:
        wanted = OmegaConf.to_container(cfg[k], resolve=True)
        wanted.pop("use_checkpoint", None)
        assert {key: found[k].get(key) for key in wanted} == wanted, k
    assert found["diffusion"]["prediction"] == cfg.diffusion.prediction or experiment == "sd21_768"
    assert cfg.diffusion.prediction == ("v" if experiment == "sd21_768" else "eps")
    assert cfg.data.image_size == (768 if experiment == "sd21_768" else 512)


def test_x0_prediction_survives_every_round_trip(tmp_path):
    """An x0 model: our file -> SD single file -> ours, ours -> diffusers folder -> ours, and
    an SD file whose only hint is the model spec's name for x0 ("sample")."""
    from sd_fixtures import sd_parts

    model = load_model(layout.save(tmp_path / "m.safetensors", sd_parts("sd2")), prediction="x0")
    assert model.prediction is Prediction.X0
    single = export.save_sd(tmp_path / "x0.safetensors", model)
    meta = files.read_metadata(single)
    assert meta["modelspec.prediction_type"] == "sample"
    assert "parameterization: x0" in (tmp_path / "x0.yaml").read_text()
    assert load_model(single).prediction is Prediction.X0
    folder = export.save_diffusers(tmp_path / "pipe", model)
    assert (
        json.loads((folder / "scheduler/scheduler_config.json").read_text())["prediction_type"]
        == "sample"
    )
    assert load_model(folder).prediction is Prediction.X0
    state, _ = files.read(single)  # no config of ours: the model spec alone decides
    files.save_state(tmp_path / "spec.safetensors", state, {"modelspec.prediction_type": "sample"})
    assert load_model(tmp_path / "spec.safetensors").prediction is Prediction.X0
    with pytest.raises(files.CheckpointError, match="unknown prediction type 'flow'"):
        load_model(single, prediction="flow")


def test_a_run_exports_the_prediction_its_objective_trained_with(tmp_path):
    """The weights file takes the prediction type from the objective, not from cfg.diffusion
    (which an override of model.objective.prediction would leave stale)."""
    from conftest import tiny_configs, tiny_parts
    from ldm.checkpoints.export import run_metadata
    from ldm.diffusion.objective import DiffusionObjective
    from ldm.diffusion.schedule import NoiseSchedule

    cfg = tiny_configs()
    objective = DiffusionObjective(NoiseSchedule(zero_terminal_snr=True), prediction="x0")
    assert cfg.diffusion.prediction == "v"
    meta = run_metadata(cfg, objective)
    assert meta[files.CONFIG_KEY]["diffusion"]["prediction"] == "x0"
    assert meta[files.CONFIG_KEY]["diffusion"]["schedule"]["zero_terminal_snr"] is True
    unet, vae, text = tiny_parts()
    path = layout.save(
        tmp_path / "run.safetensors", {"unet": unet, "vae": vae, "text_encoder": text}, meta
    )
    assert load_model(path).prediction is Prediction.X0
