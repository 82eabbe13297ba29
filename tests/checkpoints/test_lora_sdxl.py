"""SDXL LoRA files against diffusers' StableDiffusionXLPipeline on the small SDXL folder diffusers
writes itself: kohya's SDXL names (lora_unet_* in diffusers' or the SD layout, lora_te1_* and
lora_te2_* in CLIP names, q/k/v on thirds of open_clip's fused in_proj) and the PEFT files of
`save_lora_weights`, merged by us (sample.py's loading, `python -m ldm.lora merge`), give the
outputs diffusers' `load_lora_weights` gives; the files we write for an SDXL model load in
diffusers with the same outputs and carry kohya's SDXL metadata."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from test_lora_files import kohya_rule, preset
from test_pipeline_vs_diffusers_sdxl import reference_images, sample_py, start_noise
from torch import nn

from ldm import lora as lora_cli
from ldm.checkpoints import CheckpointError, files, layout, load_model
from ldm.checkpoints.diffusers_configs import diffusers_unet_config
from ldm.checkpoints.lora import canonical_name, is_sdxl_lora, kohya_name, read_lora, read_loras
from ldm.checkpoints.lora_networks import (
    build_networks,
    merge_loras,
    save_networks,
    sd_unet_names,
    text_names,
    unet_names,
)
from ldm.config import ROOT
from ldm.models.lora import LoRAModule, adapt_text_encoder
from ldm.models.unet import micro_conditioning
from ldm.pipeline import Pipeline
from sd_fixtures import SDXL_CONTEXT, SDXL_POOLED, sd_parts, sdxl_diffusers_folder

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

PROMPT = "a red circle on a blue background"
# PEFT targets: every Linear of the U-Net's transformers (kohya's set) and of the towers' blocks
UNET_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
TOLERANCE = 1e-4  # float32


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory, single_thread):
    """(folder root, diffusers pipeline, PEFT states by component, their LoraConfigs)."""
    root = tmp_path_factory.mktemp("sdxl_lora")
    pipe = sdxl_diffusers_folder(root / "pipe")
    pipe.set_progress_bar_config(disable=True)
    states, configs = peft_lora(pipe)
    return root, pipe, states, configs


def peft_lora(pipe, seed: int = 0):
    """PEFT LoRA states of the pipeline's U-Net and both towers, as PEFT injects them (on
    copies), with every lora_A / lora_B weight random; ranks and alphas differ by component."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    configs = {
        "unet": LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS),
        "text_encoder": LoraConfig(r=2, lora_alpha=1, target_modules=TEXT_TARGETS),
        "text_encoder_2": LoraConfig(r=4, lora_alpha=2, target_modules=TEXT_TARGETS),
    }
    gen = torch.Generator().manual_seed(seed)
    states = {}
    for name, config in configs.items():
        module = inject_adapter_in_model(config, copy.deepcopy(getattr(pipe, name)), "x")
        state = get_peft_model_state_dict(module, adapter_name="x")
        states[name] = {k: torch.randn(v.shape, generator=gen) * 0.08 for k, v in state.items()}
    return states, configs


def kohya_file(sdxl, folder, name: str = "kohya.safetensors"):
    """The PEFT states as diffusers' own PEFT -> kohya conversion writes them (lora_te1_ /
    lora_te2_, diffusers-path U-Net names, alpha = rank)."""
    from diffusers.utils import convert_state_dict_to_kohya

    _, _, states, _ = sdxl
    flat = {f"{c}.{k}": v for c, state in states.items() for k, v in state.items()}
    return files.save_state(folder / name, convert_state_dict_to_kohya(flat))


def peft_file(sdxl, folder):
    """The PEFT states as `StableDiffusionXLPipeline.save_lora_weights` writes them, with
    each component's LoraConfig as its adapter metadata."""
    _, _, states, configs = sdxl
    diffusers.StableDiffusionXLPipeline.save_lora_weights(
        folder,
        unet_lora_layers=states["unet"],
        text_encoder_lora_layers=states["text_encoder"],
        text_encoder_2_lora_layers=states["text_encoder_2"],
        unet_lora_adapter_metadata=configs["unet"].to_dict(),
        text_encoder_lora_adapter_metadata=configs["text_encoder"].to_dict(),
        text_encoder_2_lora_adapter_metadata=configs["text_encoder_2"].to_dict(),
    )
    return folder / "pytorch_lora_weights.safetensors"


FILES = {"kohya": kohya_file, "peft": peft_file}


def inputs(text_encoder):
    gen = torch.Generator().manual_seed(1)
    return {
        "x": torch.randn(1, 4, 8, 8, generator=gen),
        "t": torch.tensor([500]),
        "context": torch.randn(1, 16, SDXL_CONTEXT, generator=gen),
        "pooled": torch.randn(1, SDXL_POOLED, generator=gen),
        "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]),
        "ids": [e.tokenize([PROMPT]) for e in text_encoder.embedders],
    }


@torch.no_grad()
def ours(unet, text_encoder, inp) -> dict[str, torch.Tensor]:
    first, second = text_encoder.embedders
    hidden_2, pooled = second.encode_tokens(inp["ids"][1], pooled=True)
    y = torch.cat([inp["pooled"], micro_conditioning(inp["time_ids"])], dim=1)
    return {
        "unet": unet(inp["x"], inp["t"], inp["context"], y),
        "hidden_1": first.encode_tokens(inp["ids"][0]),
        "hidden_2": hidden_2,
        "pooled": pooled,
    }


@torch.no_grad()
def theirs(pipe, inp) -> dict[str, torch.Tensor]:
    """The same outputs of diffusers' modules: the penultimate hidden states SDXL reads."""
    out_1 = pipe.text_encoder(inp["ids"][0], output_hidden_states=True)
    out_2 = pipe.text_encoder_2(inp["ids"][1], output_hidden_states=True)
    added = {"text_embeds": inp["pooled"], "time_ids": inp["time_ids"]}
    return {
        "unet": pipe.unet(
            inp["x"], inp["t"], encoder_hidden_states=inp["context"], added_cond_kwargs=added
        ).sample,
        "hidden_1": out_1.hidden_states[-2],
        "hidden_2": out_2.hidden_states[-2],
        "pooled": out_2.text_embeds,
    }


def with_lora(pipe, path, fn):
    """fn() with the LoRA file loaded into the diffusers pipeline by `load_lora_weights`."""
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="style")
    try:
        return fn()
    finally:
        pipe.delete_adapters("style")


def assert_close(got: dict, expected: dict, base: dict | None = None) -> None:
    diffs = {k: (got[k] - expected[k]).abs().max().item() for k in expected}
    print("max |ours - diffusers|:", {k: f"{v:.2e}" for k, v in diffs.items()})
    assert all(v <= TOLERANCE for v in diffs.values()), diffs
    if base is not None:  # the LoRA really changes each output, far beyond the tolerance
        moved = {k: (expected[k] - base[k]).abs().max().item() for k in expected}
        assert all(v > 100 * TOLERANCE for v in moved.values()), moved


def merged_model(root, path, how: str, tmp_path):
    """Our model of the folder with the LoRA file merged: by sample.py's loading
    (Pipeline.load with loras), or by `python -m ldm.lora merge` to an SD single file."""
    if how == "pipeline":
        pipe, _ = Pipeline.load(str(root / "pipe"), "cpu", "32-true", loras=[(str(path), 1.0)])
        return pipe.unet, pipe.text_encoder
    out = tmp_path / "merged.safetensors"
    assert lora_cli.main(["merge", str(root / "pipe"), str(path), str(out)]) == 0
    model = load_model(out)
    return model.unet, model.text_encoder


# --------------------------------------------------------------------------------------------
# reading SDXL files: ours merged = diffusers' load_lora_weights


@pytest.mark.parametrize("kind", list(FILES))
@pytest.mark.parametrize("how", ["pipeline", "cli"])
def test_an_sdxl_lora_merged_by_us_gives_diffusers_outputs(sdxl, kind, how, tmp_path):
    root, pipe, _, _ = sdxl
    path = FILES[kind](sdxl, tmp_path)
    adapters, meta = read_lora(path)
    components = {n.split(".", 1)[0] for n in adapters}
    assert components == {"unet", "text_encoder", "text_encoder_2"} and is_sdxl_lora(adapters, meta)
    unet, text_encoder = merged_model(root, path, how, tmp_path)
    inp = inputs(text_encoder)
    expected = with_lora(pipe, path, lambda: theirs(pipe, inp))
    assert_close(ours(unet, text_encoder, inp), expected, base=theirs(pipe, inp))


@pytest.mark.parametrize("kind", list(FILES))
def test_sample_py_with_an_sdxl_lora_gives_diffusers_image(sdxl, kind, tmp_path):
    root, pipe, _, _ = sdxl
    path = FILES[kind](sdxl, tmp_path)
    got = sample_py(root, tmp_path / "out", "sampler=euler", f"lora={path}")
    noise = start_noise(Pipeline.load(str(root / "pipe"), "cpu", "32-true")[0])
    expected = with_lora(pipe, path, lambda: reference_images(pipe, noise, "euler", "np")[0])
    diff = np.abs(got - np.round(expected * 255).astype(np.int32))
    print(f"{kind}: sample.py vs diffusers, max {diff.max()}/255")
    assert diff.max() <= 3, f"sample.py's image differs by up to {diff.max()}/255"
    without = reference_images(pipe, noise, "euler", "np")[0]
    assert np.abs(expected - without).mean() * 255 > 1.0, "the LoRA changed nothing"


# --------------------------------------------------------------------------------------------
# writing: our networks on an SDXL model -> kohya's SDXL names, read by diffusers


def trained_networks(model, which: str = "kohya"):
    """LoRA networks on our SDXL model (U-Net preset, both towers) with non-zero up weights."""
    torch.manual_seed(0)
    networks = {
        "unet": preset(which)(model.unet),
        "text_encoder": adapt_text_encoder(model.text_encoder, rank=4, alpha=2.0),
    }
    for net in networks.values():
        for m in net.modules():
            if isinstance(m, LoRAModule):
                nn.init.normal_(m.lora_up.weight, std=0.05)
    return networks


@pytest.mark.parametrize("which", ["kohya", "locon"])
def test_our_sdxl_lora_file_has_kohyas_names_and_loads_in_diffusers(sdxl, which, tmp_path):
    root, pipe, _, _ = sdxl
    model = load_model(root / "pipe")
    networks = trained_networks(model, which)
    path = save_networks(tmp_path / "ours.safetensors", networks, model.config["unet"], "eps")
    state, meta = files.read(path)
    stems = {k.split(".")[0] for k in state}
    assert {s.split("_")[1] for s in stems} == {"unet", "te1", "te2"}
    unet_stems = {s for s in stems if s.startswith("lora_unet_")}
    # kohya's SDXL networks name the U-Net by its SD paths
    assert unet_stems == {"lora_unet_" + p.replace(".", "_") for p in networks["unet"].paths}
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj" in stems
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    for net in networks.values():
        net.attach()
    inp = inputs(model.text_encoder)
    got = ours(model.unet, model.text_encoder, inp)
    for net in networks.values():
        net.detach()

    def check():
        injected = sum(
            1 for _, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and "style" in m.lora_A
        )
        assert injected == len(networks["unet"].paths)  # no key left unconverted
        return theirs(pipe, inp)

    assert_close(got, with_lora(pipe, path, check))
    # and read back by us: the same adapters, now by SD path, merged into a fresh model
    again = load_model(root / "pipe")
    merge_loras(again, read_loras([(str(path), 1.0)]))
    assert_close(ours(again.unet, again.text_encoder, inp), got)


# ComfyUI's names for an SDXL checkpoint's layers (comfy/lora.py: model_lora_keys_unet, every
# `diffusion_model.<path>.weight` as lora_unet_<path with underscores>; model_lora_keys_clip,
# clip_l / clip_g layers b in CLIP names as lora_te1_ / lora_te2_text_model_encoder_layers_b_*)
COMFY_CLIP = ("mlp_fc1", "mlp_fc2", *(f"self_attn_{p}_proj" for p in ("q", "k", "v", "out")))


def comfy_names(single_file_keys, layers: tuple[int, int]) -> set[str]:
    unet = {
        "lora_unet_" + k[len("model.diffusion_model.") : -len(".weight")].replace(".", "_")
        for k in single_file_keys
        if k.startswith("model.diffusion_model.") and k.endswith(".weight")
    }
    text = {
        f"lora_te{t + 1}_text_model_encoder_layers_{b}_{c}"
        for t, n in enumerate(layers)
        for b in range(n)
        for c in COMFY_CLIP
    }
    return unet | text


def test_our_sdxl_kohya_file_has_only_names_comfyui_maps(sdxl, tmp_path):
    root, _, _, _ = sdxl
    model = load_model(root / "pipe")
    networks = trained_networks(model, "locon")
    path = save_networks(tmp_path / "ours.safetensors", networks, model.config["unet"], "eps")
    single = tmp_path / "sdxl.safetensors"
    assert lora_cli.main(["merge", str(root / "pipe"), str(path), str(single)]) == 0
    keys = files.read(single)[0]
    layers = tuple(len(e.model.transformer.resblocks) for e in model.text_encoder.embedders)
    stems = {k.split(".")[0] for k in files.read(path)[0]}
    assert stems and stems <= comfy_names(keys, layers), sorted(stems - comfy_names(keys, layers))


def test_our_sdxl_peft_file_loads_in_diffusers(sdxl, tmp_path):
    root, pipe, _, _ = sdxl
    model = load_model(root / "pipe")
    networks = trained_networks(model)
    path = save_networks(tmp_path / "p.safetensors", networks, model.config["unet"], "eps", "peft")
    prefixes = {k.split(".")[0] for k in files.read(path)[0]}
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"}
    for net in networks.values():
        net.attach()
    got = ours(model.unet, model.text_encoder, inputs(model.text_encoder))
    for net in networks.values():
        net.detach()
    assert_close(got, with_lora(pipe, path, lambda: theirs(pipe, inputs(model.text_encoder))))


# --------------------------------------------------------------------------------------------
# names, module sets, conversion and errors


def full_size():
    """SDXL base's U-Net and towers (configs/*/sdxl.yaml) on the meta device."""
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "unet" / "sdxl.yaml"))
    text = OmegaConf.load(ROOT / "configs" / "text_encoder" / "sdxl.yaml")
    with torch.device("meta"):
        return cfg, instantiate(cfg), instantiate(text)


@pytest.mark.parametrize("which", ["kohya", "locon"])
def test_sdxl_presets_create_kohyas_module_set_at_full_size(which):
    """kohya's SDXL networks: every Linear / Conv2d in the transformers (+ the ResBlocks' and
    down/upsamplers' with conv_dim) of its SD-layout U-Net, named by SD path; both towers in
    CLIP names (kohya: 72 + 192 modules; ours leave ViT-L's last block, which SDXL never reads:
    66 + 192)."""
    cfg, unet, text = full_size()
    with torch.device("meta"):
        theirs_unet = diffusers.UNet2DConditionModel(**diffusers_unet_config(cfg))
        net = preset(which)(unet)
        text_net = adapt_text_encoder(text)
    expected = kohya_rule(theirs_unet, which == "locon")  # diffusers names of those modules
    assert {kohya_name(n) for n in unet_names(net.paths, cfg).values()} == expected
    assert len(net.paths) == (722 if which == "kohya" else len(expected))
    names = [kohya_name(n, sdxl=True) for n in sd_unet_names(net.paths).values()]
    assert all(canonical_name(k) == f"unet.{p}" for k, p in zip(names, net.paths))
    towers = [n.split(".")[0] for n in text_names(text_net.paths).values()]
    # an attention module stands for q, k, v and out, with the two MLP layers 6 per block
    assert [towers.count(c) // 3 * 6 for c in ("text_encoder", "text_encoder_2")] == [66, 192]


def test_sdxl_kohya_names_read_back():
    assert canonical_name("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") == (
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    )
    assert canonical_name("lora_te2_encoder_layers_31_mlp_fc1") == (
        "text_encoder_2.text_model.encoder.layers.31.mlp.fc1"
    )
    assert canonical_name("lora_unet_output_blocks_2_1_transformer_blocks_9_ff_net_0_proj") == (
        "unet.output_blocks.2.1.transformer_blocks.9.ff.net.0.proj"
    )
    assert canonical_name("lora_unet_input_blocks_1_0_emb_layers_1") == (
        "unet.input_blocks.1.0.emb_layers.1"
    )
    name = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    assert kohya_name(name) == "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert kohya_name(name, sdxl=True) == "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"


def test_converting_sdxl_files_keeps_kohyas_sdxl_names(sdxl, tmp_path, capsys):
    root, _, _, _ = sdxl
    peft = peft_file(sdxl, tmp_path)
    out = tmp_path / "k.safetensors"
    assert lora_cli.main(["convert", str(peft), str(out), "--to", "kohya"]) == 0
    stems = {k.split(".")[0] for k in files.read(out)[0]}
    assert {s.split("_")[1] for s in stems} == {"unet", "te1", "te2"}
    model = load_model(root / "pipe")
    ours_kohya = save_networks(
        tmp_path / "o.safetensors", trained_networks(model), model.config["unet"], "eps"
    )
    with pytest.raises(SystemExit):
        lora_cli.main(["convert", str(ours_kohya), str(tmp_path / "p.safetensors"), "--to", "peft"])
    assert "SD module paths" in capsys.readouterr().err


def test_an_sdxl_lora_on_an_sd1_model_is_a_clear_error(sdxl, tmp_path):
    model = load_model(layout.save(tmp_path / "sd1.safetensors", sd_parts("sd1")))
    path = kohya_file(sdxl, tmp_path, "xl.safetensors")
    te2 = {n: p for n, p in read_lora(path)[0].items() if n.startswith("text_encoder_2.")}
    with pytest.raises(CheckpointError, match="xl.safetensors: .* second text encoder.*SD 1/2"):
        merge_loras(model, [("xl.safetensors", te2, 1.0)])


def test_one_layer_named_twice_is_a_clear_error(sdxl):
    root, _, _, _ = sdxl
    model = load_model(root / "pipe")
    path = "input_blocks.3.1.transformer_blocks.0.attn1.to_q"
    (diffusers_name,) = unet_names([path], model.config["unet"]).values()
    layer = model.unet.get_submodule(path)
    parts = {"down": torch.zeros(2, layer.in_features), "up": torch.zeros(layer.out_features, 2)}
    parts["alpha"] = torch.tensor(2.0)
    twice = {f"unet.{path}": parts, diffusers_name: parts}
    with pytest.raises(CheckpointError, match="adapters of one layer"):
        build_networks(twice, model.unet, model.text_encoder, model.config["unet"])
