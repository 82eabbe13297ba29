"""LoRA adapter names: our SD module paths -> diffusers' module paths -> kohya names and back."""

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from ldm.checkpoints.diffusers_configs import diffusers_unet_config
from ldm.checkpoints.lora import canonical_name, kohya_name
from ldm.checkpoints.lora_networks import text_names, unet_names

diffusers = pytest.importorskip("diffusers")


def unet_config(name: str) -> dict:
    from omegaconf import OmegaConf

    from ldm.config import ROOT

    cfg = OmegaConf.load(ROOT / "configs" / "unet" / f"{name}.yaml")
    cfg.context_dim = {"sd15": 768, "sd21": 1024}.get(name, 64)
    return OmegaConf.to_container(cfg)


@pytest.mark.parametrize("name", ["sd15", "sd21", "shapes"])
def test_every_layer_maps_to_a_diffusers_module_and_back_through_kohya(name):
    cfg = unet_config(name)
    with torch.device("meta"):
        ours = instantiate(cfg)
        theirs = diffusers.UNet2DConditionModel(**diffusers_unet_config(cfg))
    layers = [p for p, m in ours.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    names = unet_names(layers, cfg)
    theirs_modules = dict(theirs.named_modules())
    for path, canonical in names.items():
        module = theirs_modules[canonical.removeprefix("unet.")]  # a real diffusers module
        assert type(module) is type(ours.get_submodule(path)) or isinstance(module, nn.Linear)
        assert canonical_name(kohya_name(canonical)) == canonical
    assert len(set(names.values())) == len(names)


def test_text_names_are_clip_text_model_modules():
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    with torch.device("meta"):
        hf = transformers.CLIPTextModel(config)
    # transformers 5 drops the `text_model.` level that files (and transformers 4) have
    modules = {
        f"text_model.{k}" if not k.startswith("text_model") else k: m for k, m in hf.named_modules()
    }
    paths = [
        f"model.transformer.resblocks.{i}.{m}"
        for i in range(2)
        for m in ("attn", "mlp.c_fc", "mlp.c_proj")
    ]
    for path, canonical in text_names(paths).items():
        hf_path = canonical.removeprefix("text_encoder.")
        parts = ["q_proj", "k_proj", "v_proj", "out_proj"] if path.endswith("attn") else [None]
        for part in parts:
            full = f"{hf_path}.{part}" if part else hf_path
            assert isinstance(modules[full], nn.Linear), full
            assert canonical_name(kohya_name(f"text_encoder.{full}")) == f"text_encoder.{full}"
    assert kohya_name("text_encoder.text_model.encoder.layers.0.self_attn.q_proj") == (
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    )
    with pytest.raises(ValueError, match="no CLIPTextModel name"):
        text_names(["model.token_embedding"])
    with pytest.raises(ValueError, match="neither a lora_unet"):
        canonical_name("lora_transformer_blocks_0")
