"""Key maps between our (original Stable Diffusion) names and diffusers / Hugging Face CLIP names.

Pure functions on state dicts (name -> tensor), one per direction and part. Tensors are shared,
never copied, except where a layout really differs (CLIP's q/k/v are concatenated into
open_clip's `in_proj`). Unknown names raise KeyError naming the key, so a map can never drop
weights silently.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

# ------------------------------------------------------------------------------- U-Net

# Renames inside a ResBlock; transformer parameter names are identical in both layouts.
_RESNET_RENAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _unet_prefix_map(config: Mapping) -> dict[str, tuple[str, bool]]:
    """diffusers module prefix -> (SD prefix, is_resnet) for a `UNetModel` config."""
    n_levels, n_res = len(config["channel_mult"]), config["num_res_blocks"]
    attention_levels = {lv for lv in range(n_levels) if 2**lv in config["attention_resolutions"]}
    prefixes = {
        "time_embedding.linear_1.": ("time_embed.0.", False),
        "time_embedding.linear_2.": ("time_embed.2.", False),
        "conv_in.": ("input_blocks.0.0.", False),
        "conv_norm_out.": ("out.0.", False),
        "conv_out.": ("out.2.", False),
        "mid_block.resnets.0.": ("middle_block.0.", True),
        "mid_block.attentions.0.": ("middle_block.1.", False),
        "mid_block.resnets.1.": ("middle_block.2.", True),
    }
    if config.get("adm_in_channels") is not None:  # SDXL's vector conditioning
        prefixes["add_embedding.linear_1."] = ("label_emb.0.0.", False)
        prefixes["add_embedding.linear_2."] = ("label_emb.0.2.", False)
    # Down path: input_blocks.0 is conv_in, then n_res blocks per level and a Downsample
    # after every level but the last.
    for level in range(n_levels):
        first = 1 + level * (n_res + 1)
        for j in range(n_res):
            prefixes[f"down_blocks.{level}.resnets.{j}."] = (f"input_blocks.{first + j}.0.", True)
            prefixes[f"down_blocks.{level}.attentions.{j}."] = (
                f"input_blocks.{first + j}.1.",
                False,
            )
        if level < n_levels - 1:
            prefixes[f"down_blocks.{level}.downsamplers.0.conv."] = (
                f"input_blocks.{first + n_res}.0.op.",
                False,
            )
    # Up path: up block i is level n_levels - 1 - i with n_res + 1 blocks; the Upsample sits
    # after the ResBlock, and after the transformer where there is one.
    for i in range(n_levels):
        first = i * (n_res + 1)
        for j in range(n_res + 1):
            prefixes[f"up_blocks.{i}.resnets.{j}."] = (f"output_blocks.{first + j}.0.", True)
            prefixes[f"up_blocks.{i}.attentions.{j}."] = (f"output_blocks.{first + j}.1.", False)
        up_index = 2 if (n_levels - 1 - i) in attention_levels else 1
        prefixes[f"up_blocks.{i}.upsamplers.0.conv."] = (
            f"output_blocks.{first + n_res}.{up_index}.conv.",
            False,
        )
    return prefixes


def _rename_by_prefix(
    state: Mapping[str, torch.Tensor],
    prefixes: dict[str, tuple[str, bool]],
    resnet_renames: dict[str, str],
    what: str,
) -> dict[str, torch.Tensor]:
    # Longest prefix first: "input_blocks.1." must not claim "input_blocks.10.".
    ordered = sorted(prefixes, key=len, reverse=True)
    out = {}
    for key, value in state.items():
        match = next((p for p in ordered if key.startswith(p)), None)
        if match is None:
            raise KeyError(f"no {what} name for U-Net key {key!r}")
        new_prefix, is_resnet = prefixes[match]
        rest = key[len(match) :]
        if is_resnet:
            module, param = _split_resnet(rest)
            if module not in resnet_renames:
                raise KeyError(f"no {what} name for U-Net key {key!r}")
            rest = f"{resnet_renames[module]}.{param}"
        out[new_prefix + rest] = value
    return out


def _split_resnet(rest: str) -> tuple[str, str]:
    """'in_layers.2.weight' -> ('in_layers.2', 'weight'); 'norm1.bias' -> ('norm1', 'bias')."""
    module, _, param = rest.rpartition(".")
    return module, param


def diffusers_unet_to_sd(
    state: Mapping[str, torch.Tensor], config: Mapping
) -> dict[str, torch.Tensor]:
    """A diffusers `UNet2DConditionModel` state dict in SD names (no `model.diffusion_model.`).

    `config` holds the `UNetModel` arguments `channel_mult`, `num_res_blocks`,
    `attention_resolutions` and (SDXL) `adm_in_channels`."""
    return _rename_by_prefix(state, _unet_prefix_map(config), _RESNET_RENAMES, "SD")


def sd_unet_to_diffusers(
    state: Mapping[str, torch.Tensor], config: Mapping
) -> dict[str, torch.Tensor]:
    """The inverse of `diffusers_unet_to_sd`."""
    inverse = {sd: (diff, res) for diff, (sd, res) in _unet_prefix_map(config).items()}
    return _rename_by_prefix(
        state, inverse, {v: k for k, v in _RESNET_RENAMES.items()}, "diffusers"
    )


# ------------------------------------------------------------------------------- VAE

_VAE_ATTN = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    # names used by diffusers before its attention refactor
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}
_VAE_ATTN_BACK = {
    "norm": "group_norm",
    "q": "to_q",
    "k": "to_k",
    "v": "to_v",
    "proj_out": "to_out.0",
}


def diffusers_vae_to_sd(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers `AutoencoderKL` state dict in SD names.

    diffusers lists decoder levels from the lowest resolution (`up_blocks.0`) while SD indexes
    them by channel multiplier (`up.{n-1}` is the lowest), and diffusers' mid-block attention
    uses Linear layers where SD has 1x1 convs, so those weights gain two unit dims."""
    num_up = _count_levels(state, r"decoder\.up_blocks\.(\d+)\.")
    out = {}
    for key, value in state.items():
        sd_key = _vae_key_to_sd(key, num_up)
        if ".attn_1." in sd_key and sd_key.endswith(".weight") and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)  # Linear (C, C) -> 1x1 conv (C, C, 1, 1)
        out[sd_key] = value
    return out


def sd_vae_to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `diffusers_vae_to_sd` (attention weights as diffusers' Linear layers)."""
    num_up = _count_levels(state, r"decoder\.up\.(\d+)\.")
    out = {}
    for key, value in state.items():
        d_key = _vae_key_to_diffusers(key, num_up)
        if ".attentions.0." in d_key and d_key.endswith(".weight") and value.ndim == 4:
            value = value.reshape(value.shape[0], value.shape[1])  # 1x1 conv -> Linear
        out[d_key] = value
    return out


def _count_levels(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    found = [int(m.group(1)) for k in state if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def _vae_key_to_sd(key: str, num_up: int) -> str:
    key = re.sub(r"down_blocks\.(\d+)\.resnets\.(\d+)\.", r"down.\1.block.\2.", key)
    key = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", key)
    key = re.sub(
        r"up_blocks\.(\d+)\.resnets\.(\d+)\.",
        lambda m: f"up.{num_up - 1 - int(m.group(1))}.block.{m.group(2)}.",
        key,
    )
    key = re.sub(
        r"up_blocks\.(\d+)\.upsamplers\.0\.",
        lambda m: f"up.{num_up - 1 - int(m.group(1))}.upsample.",
        key,
    )
    key = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}.", key)
    if "mid_block.attentions.0." in key:
        prefix, name = key.split("mid_block.attentions.0.")
        layer, param = name.rsplit(".", 1)
        if layer not in _VAE_ATTN:
            raise KeyError(f"no SD name for VAE key {key!r}")
        key = f"{prefix}mid.attn_1.{_VAE_ATTN[layer]}.{param}"
    return key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")


def _vae_key_to_diffusers(key: str, num_up: int) -> str:
    if re.search(r"(down|up)\.\d+\.attn\.", key):
        raise KeyError(f"diffusers' AutoencoderKL has no per-level attention ({key!r})")
    key = re.sub(r"down\.(\d+)\.block\.(\d+)\.", r"down_blocks.\1.resnets.\2.", key)
    key = re.sub(r"down\.(\d+)\.downsample\.", r"down_blocks.\1.downsamplers.0.", key)
    key = re.sub(
        r"up\.(\d+)\.block\.(\d+)\.",
        lambda m: f"up_blocks.{num_up - 1 - int(m.group(1))}.resnets.{m.group(2)}.",
        key,
    )
    key = re.sub(
        r"up\.(\d+)\.upsample\.",
        lambda m: f"up_blocks.{num_up - 1 - int(m.group(1))}.upsamplers.0.",
        key,
    )
    key = re.sub(r"mid\.block_(\d+)\.", lambda m: f"mid_block.resnets.{int(m.group(1)) - 1}.", key)
    if "mid.attn_1." in key:
        prefix, name = key.split("mid.attn_1.")
        layer, param = name.rsplit(".", 1)
        key = f"{prefix}mid_block.attentions.0.{_VAE_ATTN_BACK[layer]}.{param}"
    return key.replace("nin_shortcut", "conv_shortcut").replace("norm_out", "conv_norm_out")


# ------------------------------------------------------------------------------- text encoder

_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_CLIP_LAYER_KEY = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def hf_clip_to_open_clip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers `CLIPTextModel` state dict (with or without `text_model.`) in open_clip
    `TextTransformer` names. q/k/v are concatenated into `in_proj`; `position_ids` is dropped
    (a constant arange); a `text_projection.weight` (CLIPTextModelWithProjection) is transposed."""
    out, qkv = {}, {}
    for key, value in state.items():
        name = key.removeprefix("text_model.")
        if name == "embeddings.position_ids":
            continue
        if name == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()  # one memory layout, one rounding
        elif name in _CLIP_TOP:
            out[_CLIP_TOP[name]] = value
        elif m := _CLIP_LAYER_KEY.match(name):
            layer, module, param = m.groups()
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((layer, param), {})[module[10]] = value
            elif module in _CLIP_LAYER:
                out[f"transformer.resblocks.{layer}.{_CLIP_LAYER[module]}.{param}"] = value
            else:
                raise KeyError(f"no open_clip name for CLIP key {key!r}")
        else:
            raise KeyError(f"no open_clip name for CLIP key {key!r}")
    for (layer, param), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"CLIP layer {layer} has {param}s for {sorted(parts)} of q, k, v only")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat(
            [parts[c] for c in "qkv"]
        )
    return out


def open_clip_to_hf_clip(
    state: Mapping[str, torch.Tensor], layers: int | None = None
) -> dict[str, torch.Tensor]:
    """open_clip `TextTransformer` names -> transformers `CLIPTextModel` names (`text_model.*`).

    Only the first `layers` blocks are written (a CLIPTextModel of a penultimate-layer encoder
    stops one block early, as SD 2 diffusers folders do); `text_projection` is not part of a
    CLIPTextModel and is dropped; `position_ids` is added as SD 1 files carry it."""
    top = {v: k for k, v in _CLIP_TOP.items()}
    back = {v: k for k, v in _CLIP_LAYER.items()}
    block = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
    out = {}
    for key, value in state.items():
        if key == "text_projection":
            continue
        if key in top:
            out["text_model." + top[key]] = value
            if key == "positional_embedding":
                out["text_model.embeddings.position_ids"] = torch.arange(value.shape[0])[None]
            continue
        m = block.match(
            key.replace("in_proj_weight", "in_proj.weight").replace("in_proj_bias", "in_proj.bias")
        )
        if m is None:
            raise KeyError(f"no CLIP name for open_clip key {key!r}")
        layer, module, param = m.groups()
        if layers is not None and int(layer) >= layers:
            continue
        prefix = f"text_model.encoder.layers.{layer}."
        if module == "attn.in_proj":
            for c, part in zip("qkv", value.chunk(3)):
                out[f"{prefix}self_attn.{c}_proj.{param}"] = part.clone()  # no shared storage
        elif module in back:
            out[f"{prefix}{back[module]}.{param}"] = value
        else:
            raise KeyError(f"no CLIP name for open_clip key {key!r}")
    return out


# ------------------------------------------------------------------------------- EMA


def ldm_ema_key(unet_key: str) -> str:
    """The EMA name of a U-Net key in LDM checkpoints: the dots after `model_ema.` removed.

    'input_blocks.0.0.weight' -> 'model_ema.diffusion_modelinput_blocks00weight'."""
    return "model_ema." + ("diffusion_model." + unet_key).replace(".", "")
