"""SDXL single files both ways: what we write, diffusers' own converters read back exactly; a
file in SDXL's layout without our metadata is detected as SDXL from its keys alone; the full-size
layout (built on the meta device from configs/*/sdxl.yaml) is what diffusers recognises as SDXL
base and converts into its own modules' key sets."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm.checkpoints import convert, detect, export, files, layout, load_model
from ldm.checkpoints.files import CONFIG_KEY
from ldm.config import ROOT
from ldm.models.text_encoder import DualTextEncoder
from sd_fixtures import SDXL_POOLED, sdxl_diffusers_folder, sdxl_parts

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders import single_file_utils as sfu  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory, single_thread):
    root = tmp_path_factory.mktemp("sdxl")
    ref = sdxl_diffusers_folder(root / "pipe")
    path = root / "sdxl.safetensors"
    assert convert.main([str(root / "pipe"), str(path)]) == 0
    return root, ref, path


def _without_text_model(state: dict) -> dict:
    return {k.removeprefix("text_model."): v for k, v in state.items()}


def test_our_sdxl_file_reads_back_exactly_through_diffusers_converters(sdxl):
    _, ref, path = sdxl
    state, meta = files.read(path)  # (too small for diffusers' SDXL key probe: see full size)
    assert {k.split(".")[0] for k in state} == {"model", "first_stage_model", "conditioner"}
    assert any(k.startswith("conditioner.embedders.0.transformer.text_model.") for k in state)
    # bigG's projection as open_clip keeps it (x @ P): the transpose of diffusers' Linear weight
    torch.testing.assert_close(
        state["conditioner.embedders.1.model.text_projection"],
        ref.text_encoder_2.text_projection.weight.t(),
        rtol=0,
        atol=0,
    )
    got = {
        "unet": sfu.convert_ldm_unet_checkpoint(state, ref.unet.config),
        "vae": sfu.convert_ldm_vae_checkpoint(state, ref.vae.config),
        "text": sfu.convert_ldm_clip_checkpoint(state),
        "text_2": sfu.convert_open_clip_checkpoint(
            ref.text_encoder_2, state, prefix="conditioner.embedders.1.model."
        ),
    }
    expected = {
        "unet": ref.unet.state_dict(),
        "vae": ref.vae.state_dict(),
        "text": ref.text_encoder.state_dict(),
        "text_2": ref.text_encoder_2.state_dict(),
    }
    for part, exp in expected.items():
        exp, conv = _without_text_model(exp), _without_text_model(got[part])
        exp.pop("embeddings.position_ids", None)
        assert not set(exp) - set(conv), (part, sorted(set(exp) - set(conv))[:5])
        for k in exp:
            assert torch.equal(conv[k].reshape(exp[k].shape), exp[k]), (part, k)
    assert detect.architecture_name(files.parse_config(meta[CONFIG_KEY], "f")) == "ldm-custom"


def test_an_sdxl_file_without_our_metadata_is_detected_from_its_keys(sdxl, tmp_path):
    root, _, path = sdxl
    state, _ = files.read(path)
    bare = files.save_state(tmp_path / "outside.safetensors", state)  # keys only, no metadata
    model, folder = load_model(bare), load_model(root / "pipe")
    assert model.source == "sd" and isinstance(model.text_encoder, DualTextEncoder)
    assert model.config["image_size"] == 1024 and model.prediction == "eps"
    assert model.vae.scale_factor == pytest.approx(0.13025) and not model.vae.fp16_safe
    assert model.config["unet"]["transformer_depth"] == [0, 1, 2]
    assert model.config["unet"]["adm_in_channels"] == SDXL_POOLED + 6 * 256
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(model, part).state_dict(), getattr(folder, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    prompts = ["a red circle", ""]
    time_ids = torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)
    with torch.no_grad():
        ours = model.text_encoder.condition(prompts, time_ids, drop=[False, True])
        theirs = folder.text_encoder.condition(prompts, time_ids, drop=[False, True])
    for k in ("context", "y"):
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=0)
    assert detect.markers(state) == {}  # an eps model carries no v_pred key


def test_diffusers_from_single_file_loads_our_sdxl_export(sdxl, monkeypatch):
    """diffusers' own single-file loader, offline (component configs from the folder)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root, ref, path = sdxl
    pipe = diffusers.StableDiffusionXLPipeline.from_single_file(
        str(path), config=str(root / "pipe"), local_files_only=True
    )
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(pipe, name).state_dict(), getattr(ref, name).state_dict()
        a, b = _without_text_model(a), _without_text_model(b)
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_sdxl_round_trip_is_exact_and_a_v_model_is_marked(tmp_path):
    parts = sdxl_parts()
    src = layout.save(tmp_path / "ours.safetensors", parts)
    state, _ = files.read(src)
    model = load_model(files.save_state(tmp_path / "bare.safetensors", state), prediction="v")
    out, meta = files.read(export.save_sd(tmp_path / "v.safetensors", model))
    assert meta["modelspec.prediction_type"] == "v"
    assert out.keys() - state.keys() == {detect.V_PRED_KEY}
    assert all(torch.equal(out[k], state[k]) for k in state)
    marked = {k: v for k, v in out.items()}
    again = load_model(files.save_state(tmp_path / "marked.safetensors", marked))
    assert again.prediction == "v"  # from the v_pred key alone (no metadata)
    assert not (tmp_path / "v.yaml").exists()


def _sdxl_config() -> dict:
    def part(group: str) -> dict:
        cfg = OmegaConf.load(ROOT / "configs" / group / "sdxl.yaml")
        for base in cfg.pop("defaults", []):  # configs/vae/sdxl.yaml extends sd.yaml
            if base != "_self_":
                cfg = OmegaConf.merge(
                    OmegaConf.load(ROOT / "configs" / group / f"{base}.yaml"), cfg
                )
        return OmegaConf.to_container(cfg)

    return {group: part(group) for group in ("unet", "vae", "text_encoder")}


def test_full_size_sdxl_layout_is_sdxl_base_to_diffusers_and_detects_back():
    """configs/{unet,vae,text_encoder}/sdxl.yaml at full size on the meta device: diffusers calls
    the file SDXL base and converts it into exactly its modules' keys; our detection reads the
    same architecture back (built again, the same parameter names and shapes)."""
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
    )

    from ldm.checkpoints.diffusers_configs import diffusers_unet_config

    config = _sdxl_config()
    with torch.device("meta"):
        parts = {k: instantiate(v) for k, v in config.items()}
        state = layout.sd_state(parts)
        unet = diffusers.UNet2DConditionModel(**diffusers_unet_config(config["unet"]))
        big_g = CLIPTextModelWithProjection(
            CLIPTextConfig(
                hidden_size=1280,
                intermediate_size=5120,
                num_hidden_layers=32,
                num_attention_heads=20,
                projection_dim=1280,
                hidden_act="gelu",
            )
        )
        vit_l = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                hidden_act="quick_gelu",
            )
        )
    assert sfu.infer_diffusers_model_type(state) == "xl_base"
    converted = {
        "unet": sfu.convert_ldm_unet_checkpoint(state, unet.config),
        "vit_l": sfu.convert_ldm_clip_checkpoint(state),
        "big_g": sfu.convert_open_clip_checkpoint(
            big_g, state, prefix="conditioner.embedders.1.model."
        ),
    }
    for name, module in (("unet", unet), ("vit_l", vit_l), ("big_g", big_g)):
        want = _without_text_model(module.state_dict())
        got = _without_text_model(converted[name])
        want.pop("embeddings.position_ids", None)
        got.pop("embeddings.position_ids", None)
        assert got.keys() == want.keys(), name
        assert all(got[k].shape == want[k].shape for k in want), name
    states = layout.part_states(state)
    detected = detect.sd_config(states, ROOT / "sd_xl_base_1.0.safetensors", {}, None)
    assert detected["image_size"] == 1024
    assert detect.architecture_name(detected) == "stable-diffusion-xl-v1-base"
    with torch.device("meta"):
        for part in ("unet", "vae", "text_encoder"):
            again = instantiate(detected[part]).state_dict()
            own = parts[part].state_dict()
            assert {k: v.shape for k, v in again.items()} == {k: v.shape for k, v in own.items()}
    assert detected["vae"]["scale_factor"] == config["vae"]["scale_factor"] == 0.13025
    for got, want in zip(
        detected["text_encoder"]["embedders"], config["text_encoder"]["embedders"]
    ):
        for k in ("model_name", "layer", "final_norm", "pad_with_eot", "quick_gelu"):
            assert got[k] == want[k], k
