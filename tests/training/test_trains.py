"""Each choice of what trains (configs/model/trains/) builds a module that trains that, and only
that, on the tiny parts."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from ldm.checkpoints.export import run_writes
from ldm.config import ROOT, register_resolvers
from ldm.training.trains import Full, LoRA, TextualInversion

TINY = ["unet=tiny", "vae=tiny", "text_encoder=tiny", "text_encoder.frozen=false"]


def build(*overrides: str):
    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        cfg = compose("train", overrides=[*TINY, *overrides])
    torch.manual_seed(0)
    return instantiate(cfg.model)


def trained(module) -> set[str]:
    """The first part of each trainable parameter's name (unet, text_encoder, unet_lora ...)."""
    return {n.split(".")[0] for n, p in module.named_parameters() if p.requires_grad}


def test_the_default_trains_the_full_unet_and_an_unfrozen_text_encoder_with_an_ema():
    m = build()
    assert isinstance(m.trains, Full) and m.ema is not None and not m.adapters()
    assert trained(m) == {"unet", "text_encoder"}
    assert len(m.parameter_groups()) == 1


def test_a_frozen_text_encoder_stays_frozen_when_the_unet_trains():
    m = build("text_encoder.frozen=true")
    assert trained(m) == {"unet"} and not m.text_encoder.training


@pytest.mark.parametrize("name", ["lora", "locon"])
def test_lora_trains_the_adapters_only_and_keeps_no_ema(name):
    m = build(f"model/trains={name}")
    assert isinstance(m.trains, LoRA) and m.ema is None
    assert trained(m) == {"unet_lora"} and set(m.adapters()) == {"unet"}
    convs = [p for p in m.unet_lora.parameters() if p.dim() == 4 and p.shape[-1] == 3]
    assert bool(convs) == (name == "locon")  # LoCon adapts the 3x3 convolutions too


def test_a_text_encoder_lora_gets_its_own_learning_rate():
    m = build(
        "model/trains=lora",
        "+lora_preset@model.trains.text_encoder=text",
        "model.trains.text_lr=5e-5",
    )
    assert trained(m) == {"unet_lora", "text_lora"}
    unet_group, text_group = m.parameter_groups()
    assert text_group["lr"] == 5e-5 and "lr" not in unet_group
    assert {id(p) for p in text_group["params"]} == {id(p) for p in m.text_lora.parameters()}


@pytest.mark.parametrize(
    "parts", [("text_encoder=tiny",), ("unet=shapes_sdxl", "text_encoder=shapes_sdxl")]
)
def test_a_text_encoder_lora_gets_gradients_on_a_frozen_tower(parts):
    """Fresh adapters (up weights zero) on the frozen tower(s) of SD's and SDXL's text encoders
    get a gradient from the loss on every adapted layer, attention included."""
    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        cfg = compose(
            "train",
            overrides=[
                "unet=tiny",
                "vae=tiny",
                *parts,
                "model/trains=lora",
                "+lora_preset@model.trains.text_encoder=text",
                "model.captions.dropout=0",
            ],
        )
    torch.manual_seed(0)
    m = instantiate(cfg.model)
    for p in m.unet.parameters():  # a fresh U-Net's zero layers (SD's init) ignore the text
        if p.dim() > 1 and not p.any():
            torch.nn.init.normal_(p, std=0.1)
    assert not any(p.requires_grad for p in m.text_encoder.parameters())
    n = 2
    batch = {
        "image": torch.rand(n, 3, 32, 32) * 2 - 1,
        "caption": ["a red circle", "a blue square"],
        "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * n),
    }
    m.training_step(batch, 0).backward()
    ups = {n: p.grad for n, p in m.text_lora.named_parameters() if n.endswith("lora_up.weight")}
    assert ups and all(g is not None and g.abs().sum() > 0 for g in ups.values()), [
        k for k, g in ups.items() if g is None or not g.abs().sum() > 0
    ]
    towers = {k.split("__")[1] for k in ups if k.startswith("adapters.embedders")}
    assert towers == (set() if len(parts) == 1 else {"0", "1"})


def test_textual_inversion_trains_the_new_word_only():
    m = build("model/trains=textual_inversion", "model.trains.word='<pastel>'")
    assert isinstance(m.trains, TextualInversion) and m.new_word == "<pastel>"
    assert trained(m) == {"word_vectors"} and m.ema is None


@pytest.mark.parametrize(
    ("overrides", "writes"),
    [
        ((), "weights"),
        (("model/trains=lora",), "lora"),
        (("model/trains=textual_inversion", "model.trains.word='<pastel>'"), "embedding"),
    ],
)
def test_the_choice_says_what_the_run_exports(overrides, writes):
    assert run_writes(build(*overrides)) == writes
    assert run_writes(torch.nn.Module()) == "weights"  # a first stage's run: no choice, its VAE
