"""LoRA files and our models: the canonical name (`ldm.checkpoints.lora`) of each layer of our
U-Net and text towers, a read file's adapters built into LoRA networks for a loaded model and
merged into it, and a LoRA run's networks written as a file with kohya's metadata.

Our U-Net's module paths (SD names) become diffusers' through `keymaps`; an adapter named by the
SD path itself (kohya's SDXL files) finds its layer too. Our text towers' paths (open_clip names)
become transformers' `CLIPTextModel` paths: SD 1/2's one tower is `text_encoder`, an SDXL
model's `DualTextEncoder` towers `embedders.0` / `embedders.1` are `text_encoder` /
`text_encoder_2` (kohya's `lora_te1_` / `lora_te2_`). An open_clip attention module stands for
its four projections, `<name>.{q,k,v,out}_proj`, q/k/v being thirds of its fused `in_proj`
weight (`ldm.models.lora`). Putting the tensors into adapter modules, and checking that they
fit, is `ldm.models.lora.networks_from`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

from torch import nn

from ldm.checkpoints import keymaps
from ldm.checkpoints.detect import architecture_name
from ldm.checkpoints.files import CheckpointError
from ldm.checkpoints.lora import Adapters, save_lora
from ldm.diffusion.prediction import Prediction
from ldm.models.lora import LoRAModule, LoRANetwork, Place, adapter_tensors, networks_from

_TEXT_BLOCK = re.compile(
    r"^(?:embedders\.(\d+)\.)?model\.transformer\.resblocks\.(\d+)\.(attn|mlp\.c_fc|mlp\.c_proj)$"
)
TOWERS = ("text_encoder", "text_encoder_2")  # the components of a DualTextEncoder's towers
_TEXT_HF = {"mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
ATTENTION_PARTS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "out_proj"}


def is_sdxl(unet_config: Mapping) -> bool:
    """Whether a U-Net config is SDXL-structured (a vector conditioning), as elsewhere."""
    return unet_config.get("adm_in_channels") is not None


def unet_names(paths: list[str], unet_config: Mapping) -> dict[str, str]:
    """Our U-Net module paths (SD names) -> canonical names (diffusers paths behind `unet.`)."""
    fake = {f"{p}.weight": None for p in paths}
    renamed = keymaps.sd_unet_to_diffusers(fake, unet_config)  # keeps insertion order
    return {p: "unet." + k.removesuffix(".weight") for p, k in zip(paths, renamed)}


def sd_unet_names(paths: list[str]) -> dict[str, str]:
    """Our U-Net module paths -> canonical names in SD layout, as kohya names SDXL's U-Net."""
    return {p: f"unet.{p}" for p in paths}


def unet_file_names(paths: list[str], unet_config: Mapping, layout: str) -> dict[str, str]:
    """Our U-Net module paths -> the canonical names a file of `layout` gives them: SD paths in
    an SDXL model's kohya file (kohya's SDXL networks name their SD-layout U-Net so), diffusers
    paths otherwise (kohya's SD 1/2 networks adapt diffusers' U-Net; PEFT names its modules)."""
    if layout == "kohya" and is_sdxl(unet_config):
        return sd_unet_names(paths)
    return unet_names(paths, unet_config)


def text_names(paths: list[str]) -> dict[str, str]:
    """Our text-tower paths (open_clip names under `model.`, or `embedders.N.model.` for a
    DualTextEncoder's towers) -> canonical names; an attention module stands for its four
    projections, named `<canonical>.{q,k,v,out}_proj` by callers."""
    out = {}
    for p in paths:
        m = _TEXT_BLOCK.match(p)
        if m is None or int(m.group(1) or 0) >= len(TOWERS):
            raise ValueError(
                f"no CLIPTextModel name for the text-encoder layer {p!r}: LoRA files "
                f"hold the attention and MLP layers of the transformer blocks of one or two "
                f"towers only"
            )
        tower, layer, module = m.groups()
        name = "self_attn" if module == "attn" else _TEXT_HF[module]
        out[p] = f"{TOWERS[int(tower or 0)]}.text_model.encoder.layers.{layer}.{name}"
    return out


# --------------------------------------------------------------------------------------------
# adapters <-> our networks


def network_adapters(network: LoRANetwork, names: Mapping[str, str]) -> Adapters:
    """The adapters of a network by canonical name (`names`: our path -> canonical name)."""
    return {
        names[path] + (f".{ATTENTION_PARTS[part]}" if part else ""): tensors
        for path, part, tensors in adapter_tensors(network)
    }


def layer_names(
    unet: nn.Module | None, text_encoder: nn.Module | None, unet_config: Mapping | None
) -> dict[str, Place]:
    """canonical name -> (component, our path, layer, attention projection or None) of every
    layer a LoRA file may adapt."""
    table = {}
    if unet is not None:
        paths = [p for p, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        # either name finds the layer: the two layouts share no first word (SD_UNET_ROOTS)
        for names in (unet_names(paths, unet_config), sd_unet_names(paths)):
            for p, name in names.items():
                table[name] = ("unet", p, unet.get_submodule(p), None)
    if text_encoder is not None:
        paths = [
            p
            for p, m in text_encoder.named_modules()
            if p.endswith((".attn", ".mlp.c_fc", ".mlp.c_proj")) and ".resblocks." in p
        ]
        for p, name in text_names(paths).items():
            layer = text_encoder.get_submodule(p)
            if isinstance(layer, nn.MultiheadAttention):
                for part, proj in ATTENTION_PARTS.items():
                    table[f"{name}.{proj}"] = ("text_encoder", p, layer, part)
            else:
                table[name] = ("text_encoder", p, layer, None)
    return table


def build_networks(
    adapters: Adapters,
    unet: nn.Module | None,
    text_encoder: nn.Module | None,
    unet_config: Mapping | None,
    what: str = "LoRA",
) -> dict[str, LoRANetwork]:
    """LoRA networks ({"unet": ..., "text_encoder": ...}, those the adapters reach) holding the
    adapters' weights for these modules. An adapter that fits no layer, or whose shapes do not
    fit its layer, is an error naming it: nothing is dropped."""
    places = layer_names(unet, text_encoder, unet_config)
    second = sorted(n for n in adapters if n.startswith("text_encoder_2."))
    if second and not any(n.startswith("text_encoder_2.") for n in places):
        # said apart from "fits no layer": the likely cause is the base model, not the file
        raise CheckpointError(
            f"{what}: {len(second)} adapter(s) are for SDXL's second text encoder "
            f"(lora_te2_* / text_encoder_2.*, e.g. {second[0]}), but this model has no second "
            f"text encoder: an SDXL LoRA on an SD 1/2 model?"
        )
    try:
        return networks_from(adapters, places)
    except ValueError as e:
        raise CheckpointError(f"{what}: {e}") from None


# --------------------------------------------------------------------------------------------
# what a LoRA run writes, and merging LoRA files


KOHYA_VERSIONS = {
    "stable-diffusion-v1": "sd_v1",
    "stable-diffusion-v2-512": "sd_v2",
    "stable-diffusion-v2-768-v": "sd_v2_v",
    "stable-diffusion-xl-v1-base": "sdxl_base_v1-0",
    "ldm-custom": "ldm_custom",
}


def base_version(unet_config: Mapping, prediction: str) -> tuple[str, str]:
    """(kohya's ss_base_model_version, the model spec's architecture) of a base model.

    An SDXL-structured model of another size is still kohya's `sdxl_base_v1-0`: that key picks
    the family whose names the file uses (lora_te1_ / lora_te2_, the SD-layout U-Net), which
    is what tools read it for; the model spec keeps the exact architecture."""
    name = architecture_name({"unet": unet_config, "diffusion": {"prediction": prediction}})
    version = "sdxl_base_v1-0" if is_sdxl(unet_config) else KOHYA_VERSIONS[name]
    return version, f"{name}/lora"


def lora_metadata(
    networks: Mapping[str, LoRANetwork],
    unet_config: Mapping,
    prediction: str,
    extra: Mapping[str, object] | None = None,
) -> dict[str, str]:
    """kohya's `ss_*` keys (the minimum set tools read) and the model spec's, as strings."""
    modules = [m for net in networks.values() for m in net.modules() if isinstance(m, LoRAModule)]
    linear = [
        m for m in modules if m.lora_down.weight.ndim == 2 or m.lora_down.weight.shape[-1] == 1
    ]
    conv = [m for m in modules if m not in linear]
    version, architecture = base_version(unet_config, prediction)
    args = (
        {"conv_dim": str(conv[0].rank), "conv_alpha": f"{float(conv[0].alpha):g}"} if conv else {}
    )
    first = linear[0] if linear else modules[0]
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(first.rank),
        "ss_network_alpha": f"{float(first.alpha):g}",
        "ss_network_args": json.dumps(args),
        "ss_v2": str(version.startswith("sd_v2")),
        "ss_base_model_version": version,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": architecture,
        "modelspec.implementation": "diffusers",
        "modelspec.prediction_type": Prediction.parse(prediction).modelspec_name,
    }
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (extra or {}).items()})
    return meta


def save_networks(
    path: str | os.PathLike,
    networks: Mapping[str, LoRANetwork],
    unet_config: Mapping,
    prediction: str,
    layout: str = "kohya",
    extra_metadata: Mapping[str, object] | None = None,
) -> Path:
    """A LoRA run's networks as one file (kohya layout by default) with kohya's metadata. An
    SDXL model's kohya file names the U-Net by its SD paths and the towers lora_te1_ /
    lora_te2_, as kohya's SDXL networks do (diffusers' load_lora_weights reads those too); a
    PEFT file always names diffusers' modules."""
    adapters: Adapters = {}
    for component, net in networks.items():
        if component == "unet":
            names = unet_file_names(net.paths, unet_config, layout)
        else:
            names = text_names(net.paths)
        adapters.update(network_adapters(net, names))
    meta = lora_metadata(networks, unet_config, prediction, extra_metadata)
    return save_lora(path, adapters, layout, meta, sdxl=is_sdxl(unet_config))


def merge_loras(model, loras: list[tuple[str, Adapters, float]]) -> None:
    """Merge read LoRA files, each at its scale, into a loaded model's U-Net and text encoder."""
    for name, adapters, scale in loras:
        try:
            networks = build_networks(
                adapters, model.unet, model.text_encoder, model.config["unet"], what=name
            )
        except ValueError as e:  # e.g. an adapter on a layer LoRA cannot adapt
            raise CheckpointError(f"{name}: {e}") from None
        for net in networks.values():
            net.set_multiplier(scale)
            net.merge()
