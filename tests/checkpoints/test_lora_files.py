"""LoRA files against the tools that read them: the module sets kohya's scripts create, diffusers'
own `load_lora_weights` and kohya conversion, and exact kohya <-> PEFT round trips."""

import json
import os
import pickle
import re

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn

from ldm.checkpoints import CheckpointError, files, layout, load_model
from ldm.checkpoints.diffusers_configs import diffusers_unet_config
from ldm.checkpoints.export import save_diffusers
from ldm.checkpoints.lora import kohya_name, read_lora, save_lora
from ldm.checkpoints.lora_networks import build_networks, network_adapters, text_names, unet_names
from ldm.config import ROOT, register_resolvers
from ldm.models.lora import LoRAModule, adapt_text_encoder
from ldm.models.text_encoder import TextEncoder
from sd_fixtures import TEXT, UNET, sd_parts

diffusers = pytest.importorskip("diffusers")
register_resolvers()
# kohya sd-scripts' networks.lora, run on SD 1.5 / 2.1: U-Net modules (linear, 1x1, 3x3 conv)
# and text-encoder modules per preset (6 per CLIP layer: q, k, v, out, fc1, fc2)
KOHYA_COUNTS = {
    ("sd15", "kohya"): (160, 32, 0, 72),
    ("sd15", "locon"): (182, 46, 50, 72),
    ("sd21", "kohya"): (192, 0, 0, 138),
    ("sd21", "locon"): (214, 14, 50, 138),
}


def preset(name: str):
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return instantiate(compose("train", overrides=[f"+lora_preset={name}"]).lora_preset)


def config_of(name: str) -> dict:
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(ROOT / "configs" / "unet" / f"{name}.yaml")
    cfg.context_dim = {"sd15": 768, "sd21": 1024}[name]
    return OmegaConf.to_container(cfg)


def kohya_rule(unet: nn.Module, locon: bool) -> set[str]:
    """kohya's selection, by class name, on diffusers' U-Net: every Linear / Conv2d inside a
    Transformer2DModel (+ ResnetBlock2D, Downsample2D, Upsample2D with conv_dim)."""
    targets = {"Transformer2DModel"} | (
        {"ResnetBlock2D", "Downsample2D", "Upsample2D"} if locon else set()
    )
    names = set()
    for name, module in unet.named_modules():
        if type(module).__name__ in targets:
            for child, m in module.named_modules():
                if type(m).__name__ in ("Linear", "Conv2d"):
                    names.add(f"lora_unet_{name}.{child}".replace(".", "_"))
    return names


@pytest.mark.parametrize("model", ["sd15", "sd21"])
@pytest.mark.parametrize("which", ["kohya", "locon"])
def test_presets_create_kohyas_module_set_at_full_size(model, which):
    cfg = config_of(model)
    text_cfg = {
        "sd15": dict(model_name="ViT-L-14", pad_with_eot=True, quick_gelu=True),
        "sd21": dict(model_name="ViT-H-14", layer="penultimate"),
    }[model]
    with torch.device("meta"):
        unet = instantiate(cfg)
        theirs = diffusers.UNet2DConditionModel(**diffusers_unet_config(cfg))
        net = preset(which)(unet)
        text = adapt_text_encoder(TextEncoder(**text_cfg))
    kinds = [
        f"conv{m.lora_down.weight.shape[-1]}" if m.lora_down.weight.ndim == 4 else "linear"
        for _, m in net.items()
    ]
    counts = (
        kinds.count("linear"),
        kinds.count("conv1"),
        kinds.count("conv3"),
        6 * len(text.paths) // 3,
    )
    assert counts == KOHYA_COUNTS[(model, which)]
    ours = {kohya_name(n) for n in unet_names(net.paths, cfg).values()}
    assert ours == kohya_rule(theirs, which == "locon")


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def base(request, tmp_path_factory, single_thread):
    """(family, our model, diffusers pipeline) of one tiny SD-structured model."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    model = load_model(layout.save(root / "m.safetensors", sd_parts(family)))
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        save_diffusers(root / "pipe", model),
        safety_checker=None,
        requires_safety_checker=False,
        local_files_only=True,
    )
    return family, model, pipe


def trained_networks(model, family: str, which: str, alpha_is_rank: bool = False):
    """LoRA networks on our model with non-zero up weights, like a trained LoRA."""
    torch.manual_seed(0)
    unet_net = preset(which)(model.unet)
    text_net = adapt_text_encoder(model.text_encoder, rank=4, alpha=4.0 if alpha_is_rank else 2.0)
    for net in (unet_net, text_net):
        for m in net.modules():
            if isinstance(m, LoRAModule):
                nn.init.normal_(m.lora_up.weight, std=0.05)
                if alpha_is_rank:
                    m.alpha.fill_(m.rank)
    return {"unet": unet_net, "text_encoder": text_net}


def adapters_of(networks, model):
    names = {
        "unet": unet_names(networks["unet"].paths, model.config["unet"]),
        "text_encoder": text_names(networks["text_encoder"].paths),
    }
    return {k: v for c, net in networks.items() for k, v in network_adapters(net, names[c]).items()}


def outputs(model, pipe=None):
    g = torch.Generator().manual_seed(0)
    ctx_dim = UNET["sd1"]["context_dim"]
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    context = torch.randn(1, 16, ctx_dim, generator=g)
    ids = model.text_encoder.tokenize(["a red circle on a blue background"])
    with torch.no_grad():
        if pipe is None:
            return model.unet(x, t, context), model.text_encoder.encode_tokens(ids)
        return (
            pipe.unet(x, t, encoder_hidden_states=context).sample,
            pipe.text_encoder(ids).last_hidden_state,
        )


@pytest.mark.parametrize("which", ["kohya", "locon"])
def test_diffusers_load_lora_weights_reads_our_kohya_file_and_agrees(base, which, tmp_path):
    family, model, pipe = base
    networks = trained_networks(model, family, which)
    path = save_lora(tmp_path / "style.safetensors", adapters_of(networks, model))
    for net in networks.values():
        net.attach()
    ours = outputs(model)
    for net in networks.values():
        net.detach()
    pipe.load_lora_weights(str(tmp_path), weight_name=path.name, adapter_name="style")
    try:
        n_injected = sum(
            1 for _, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and "style" in m.lora_A
        )
        assert n_injected == len(networks["unet"].paths)  # no key left unconverted
        theirs = outputs(model, pipe)
        torch.testing.assert_close(theirs[0], ours[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(theirs[1], ours[1], atol=1e-4, rtol=1e-4)
    finally:
        pipe.delete_adapters("style")
    assert TEXT[family]  # the tower the folder holds


def test_kohya_and_peft_layouts_round_trip_bit_exact(base, tmp_path):
    family, model, _ = base
    adapters = adapters_of(trained_networks(model, family, "locon"), model)
    adapters["unet." + next(iter(adapters)).split(".", 1)[1]]["alpha"] = torch.tensor(3.0)
    peft = save_lora(tmp_path / "peft.safetensors", adapters, layout="peft")
    back, _ = read_lora(peft)
    kohya = save_lora(tmp_path / "kohya.safetensors", back)
    again, _ = read_lora(kohya)
    assert again.keys() == adapters.keys()
    for name, parts in adapters.items():
        for part in ("down", "up", "alpha"):
            assert torch.equal(again[name][part], parts[part]), (name, part)


def test_a_kohya_file_from_diffusers_conversion_loads_in_ours(base, tmp_path):
    """diffusers' own PEFT -> kohya conversion (alpha = rank, `lora_te1_` names) read by us."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict

    family, model, pipe = base
    networks = trained_networks(model, family, "kohya", alpha_is_rank=True)
    path = save_lora(tmp_path / "ours.safetensors", adapters_of(networks, model))
    pipe.load_lora_weights(str(tmp_path), weight_name=path.name, adapter_name="x")
    try:
        peft_sd = {
            f"unet.{k}": v
            for k, v in get_peft_model_state_dict(pipe.unet, adapter_name="x").items()
        }
        peft_sd |= {
            f"text_encoder.{k}": v
            for k, v in get_peft_model_state_dict(pipe.text_encoder, adapter_name="x").items()
        }
        kohya_sd = convert_state_dict_to_kohya(peft_sd)
        theirs = outputs(model, pipe)
    finally:
        pipe.delete_adapters("x")
    files.save_state(tmp_path / "converted.safetensors", kohya_sd)
    adapters, _ = read_lora(tmp_path / "converted.safetensors")
    loaded = build_networks(adapters, model.unet, model.text_encoder, model.config["unet"])
    for net in loaded.values():
        net.attach()
    try:
        ours = outputs(model)
    finally:
        for net in loaded.values():
            net.detach()
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours[1], theirs[1], atol=1e-4, rtol=1e-4)


def test_files_that_do_not_fit_are_clear_errors(base, tmp_path):
    family, model, _ = base
    adapters = adapters_of(trained_networks(model, family, "kohya"), model)
    other = dict(adapters)
    other["unet.down_blocks.9.attentions.0.proj_in"] = next(iter(adapters.values()))
    with pytest.raises(CheckpointError, match="fit no layer.*down_blocks.9"):
        build_networks(other, model.unet, model.text_encoder, model.config["unet"])
    name = next(n for n in adapters if n.endswith("to_q"))
    wrong = {name: {**adapters[name], "down": torch.zeros(4, 7)}}
    with pytest.raises(CheckpointError, match="has shape"):
        build_networks(wrong, model.unet, model.text_encoder, model.config["unet"])
    state = files.read(save_lora(tmp_path / "a.safetensors", adapters))[0]
    state["lora_unet_foo.lora_mid.weight"] = torch.zeros(1)
    files.save_state(tmp_path / "mid.safetensors", state)
    with pytest.raises(CheckpointError, match="not supported"):
        read_lora(tmp_path / "mid.safetensors")
    state.pop("lora_unet_foo.lora_mid.weight")
    state["something.weight"] = torch.zeros(1)
    files.save_state(tmp_path / "odd.safetensors", state)
    with pytest.raises(CheckpointError, match="something.weight"):
        read_lora(tmp_path / "odd.safetensors")


# --------------------------------------------------------------------------------------------
# untrusted files: one CheckpointError naming the file; nothing run, nothing sized by a claim


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def one_adapter(rank: int = 2, alpha: float | None = 2.0) -> dict:
    """A PEFT-layout state of one U-Net linear adapter of the tiny SD 1 model (32 -> 32)."""
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    parts = {"down": torch.zeros(rank, 32), "up": torch.zeros(32, rank)}
    if alpha is not None:
        parts["alpha"] = torch.tensor(alpha)
    return {name: parts}


def peft_file(path, config) -> str:
    """A PEFT-layout file whose lora_adapter_metadata is `config` (JSON text, or dumped)."""
    raw = config if isinstance(config, str) else json.dumps(config)
    state = {f"{n}.lora_A.weight": p["down"] for n, p in one_adapter().items()}
    state |= {f"{n}.lora_B.weight": p["up"] for n, p in one_adapter().items()}
    files.save_state(path, state, {"lora_adapter_metadata": raw})
    return path


@pytest.mark.parametrize(
    "config, why",
    [
        ("[1, 2]", "a JSON list, not an object"),
        ('"unet.r"', "a JSON str"),
        ("7", "a JSON int"),
        ("null", "a JSON NoneType"),
        ('{"unet.r": 4', "not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
        ({"unet.r": "x"}, 'unet.r is "x"; expected an integer rank'),
        ({"unet.r": 10**30}, "unet.r is 1000000000000000000000000000000;"),
        ({"unet.r": True}, "unet.r is true"),
        ({"unet.lora_alpha": "big"}, "unet.lora_alpha"),
        ('{"unet.lora_alpha": 1e999}', "unet.lora_alpha is Infinity"),
        ({"unet.lora_alpha": 10**400}, "unet.lora_alpha"),
        ({"unet.lora_alpha": -1}, "finite number >= 0"),
        ({"unet.alpha_pattern": [1]}, "unet.alpha_pattern"),
        ({"unet.alpha_pattern": {"to_q": "2"}}, "unet.alpha_pattern"),
        ({"unet.rank_pattern": {"to_q": -1}}, "unet.rank_pattern"),
        ({"unet.target_modules": 3}, "unet.target_modules"),
    ],
)
def test_peft_metadata_of_the_wrong_shape_is_one_error_naming_the_file(config, why, tmp_path):
    path = peft_file(tmp_path / "style.safetensors", config)
    with pytest.raises(CheckpointError, match=f"^style.safetensors: .*{re.escape(why)}") as e:
        read_lora(path)
    assert "\n" not in str(e.value)


def test_metadata_naming_code_is_data_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    call = {"_target_": "subprocess.run", "args": [["touch", str(marker)]], "shell": False}
    config = {
        "unet.r": 2,
        "unet.lora_alpha": 1,
        "unet._target_": "subprocess.run",
        "unet.init_lora_weights": call,
        "unet.target_modules": ["subprocess.run"],
        "unet.rank_pattern": {"subprocess.run": 2},
    }
    adapters, meta = read_lora(peft_file(tmp_path / "style.safetensors", config))
    assert float(next(iter(adapters.values()))["alpha"]) == 1.0
    path = save_lora(tmp_path / "k.safetensors", adapters, metadata={"ldm.config": call, "x": call})
    assert read_lora(path)[1]["ldm.config"] == json.dumps(call)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickles_that_run_code_and_garbage_are_refused_in_one_line(suffix, tmp_path):
    marker = tmp_path / "pwned"
    zipped, raw, junk = (tmp_path / f"{n}{suffix}" for n in ("zipped", "raw", "junk"))
    torch.save({"lora_unet_x.lora_down.weight": Evil(marker)}, zipped)
    with open(raw, "wb") as f:
        pickle.dump({"state_dict": Evil(marker)}, f)
    junk.write_bytes(os.urandom(512))
    for path in (zipped, raw, junk):
        with pytest.raises(CheckpointError, match=re.escape(path.name)) as e:
            read_lora(path)
        assert "\n" not in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "parts, why",
    [
        ({"down": torch.zeros(70_000, 0), "up": torch.zeros(32, 70_000)}, "rank 1..65536"),
        ({"down": torch.zeros(4, 32), "up": torch.zeros(32, 8)}, "do not make a LoRA"),
        ({"down": torch.zeros(2, 32, dtype=torch.int64), "up": torch.zeros(32, 2)}, "int64"),
        ({"down": torch.zeros(2), "up": torch.zeros(32, 2)}, "1 dims"),
        ({"down": torch.zeros(2, 32), "up": torch.zeros(32, 2), "alpha": torch.ones(3)}, "one"),
        (
            {"down": torch.zeros(2, 32), "up": torch.zeros(32, 2), "alpha": torch.tensor(-1.0)},
            "finite number >= 0",
        ),
        (
            {"down": torch.zeros(2, 32), "up": torch.zeros(32, 2), "alpha": torch.tensor(np.nan)},
            "nan",
        ),
    ],
)
def test_adapter_tensors_of_the_wrong_kind_are_refused(parts, why, tmp_path):
    state = {
        f"lora_unet_x.{k}": v
        for k, v in zip(["lora_down.weight", "lora_up.weight", "alpha"], parts.values())
    }
    path = files.save_state(tmp_path / "bad.safetensors", state)
    with pytest.raises(CheckpointError, match=f"^bad.safetensors: adapter unet.x: .*{why}"):
        read_lora(path)


def test_a_kohya_alpha_of_zero_means_alpha_equals_rank(tmp_path):
    ((name, parts),) = one_adapter(rank=4, alpha=0.0).items()
    adapters, _ = read_lora(save_lora(tmp_path / "z.safetensors", {name: parts}))
    assert float(adapters[name]["alpha"]) == 4.0


def test_nothing_is_allocated_for_a_shape_the_layer_cannot_take(base, monkeypatch):
    """A rank of 2**20 for a 32-wide layer, from 4 MB of file: refused before the adapter (of
    2**20 x 32 x 2 floats) would be built."""
    _, model, _ = base
    built = []
    original = LoRAModule.__init__
    monkeypatch.setattr(
        LoRAModule, "__init__", lambda self, *a, **k: built.append(a) or original(self, *a, **k)
    )
    ((name, _),) = one_adapter().items()
    huge = {
        name: {
            "down": torch.zeros(2**20, 1),
            "up": torch.zeros(32, 2**20),
            "alpha": torch.tensor(1.0),
        }
    }
    with pytest.raises(CheckpointError, match="has shape \\(1048576, 1\\) but the layer needs"):
        build_networks(huge, model.unet, model.text_encoder, model.config["unet"], what="huge")
    assert built == []
