"""The architecture of a Stable Diffusion (1.x, 2.x, XL) checkpoint, from its key names and shapes.

SD 1.x and 2.x differ in the U-Net's transformer projections (1x1 convs vs linear), its heads
(8 per layer vs 64 channels each), its context width (768 vs 1024) and the text tower (OpenAI
CLIP ViT-L/14 in Hugging Face names, last layer, padded with the end token; OpenCLIP ViT-H/14
in open_clip names, penultimate layer, zero padding). SDXL shows itself by its vector
conditioning (`label_emb`) and its two towers (`conditioner.embedders.N`), both read at the
penultimate layer without the final LayerNorm; its VAE scale is 0.13025 and its images 1024 px.
What weights cannot tell (GroupNorm groups: 32) takes SD's value; `load_model(overrides=...)`
changes it.

The prediction type is not in the weights: SD 2's 768-v and 512-base files have identical keys.
`prediction` decides, first match wins: the explicit argument; the file's metadata
(`ldm.config`, `modelspec.prediction_type`, `prediction_type`); a `v_pred` key (SDXL v models,
as ComfyUI and A1111 read them); an inference YAML beside the file (`NAME.yaml` with
`parameterization: "v"`, as A1111 reads it); an SD 2 file whose name says `768` or `-v`;
otherwise eps.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from ldm.checkpoints.files import CheckpointError
from ldm.diffusion.prediction import Prediction
from ldm.diffusion.schedule import SD_SCHEDULE
from ldm.models.autoencoder import SD_SCALE_FACTOR, SDXL_SCALE_FACTOR

log = logging.getLogger(__name__)
OPEN_CLIP_NAMES = {
    (768, 12): "ViT-L-14",
    (1024, 24): "ViT-H-14",
    (1280, 32): "ViT-bigG-14",
}  # (width, layers) -> open_clip name
V_PRED_KEY = "v_pred"  # an empty tensor marking an SDXL v-prediction file


def unet_config(u: dict[str, torch.Tensor]) -> dict:
    """`UNetModel` arguments from an SD U-Net state dict (no `model.diffusion_model.` prefix)."""
    if "input_blocks.0.0.weight" not in u:
        raise CheckpointError("no U-Net weights (model.diffusion_model.input_blocks.0.0.weight)")
    conv_in = u["input_blocks.0.0.weight"]  # (C, in_channels, 3, 3)
    base = conv_in.shape[0]
    levels: list[list[tuple[int, bool]]] = [[]]
    i = 1
    while f"input_blocks.{i}.0.op.weight" in u or f"input_blocks.{i}.0.in_layers.2.weight" in u:
        if f"input_blocks.{i}.0.op.weight" in u:
            levels.append([])
        else:
            width = u[f"input_blocks.{i}.0.in_layers.2.weight"].shape[0]
            levels[-1].append((width, f"input_blocks.{i}.1.proj_in.weight" in u))
        i += 1
    proj = u.get("middle_block.1.proj_in.weight")
    if proj is None:
        raise CheckpointError("no middle-block transformer: not an SD 1.x/2.x/XL U-Net")
    linear = proj.ndim == 2  # SD 2 and XL: Linear projections, SD 1: 1x1 convs
    config = dict(
        _target_="ldm.models.unet.UNetModel",
        in_channels=conv_in.shape[1],
        out_channels=u["out.2.weight"].shape[0] if "out.2.weight" in u else conv_in.shape[1],
        model_channels=base,
        channel_mult=[lv[0][0] // base for lv in levels],
        num_res_blocks=len(levels[0]),
        attention_resolutions=sorted(
            (2**n for n, lv in enumerate(levels) if lv[0][1]), reverse=True
        ),
        context_dim=u["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1],
        transformer_depth=_depths(u, levels),
        use_linear_in_transformer=linear,
        norm_groups=32,
    )
    if "label_emb.0.0.weight" in u:  # SDXL's vector conditioning
        config["adm_in_channels"] = u["label_emb.0.0.weight"].shape[1]
    if linear:
        config["num_head_channels"] = 64
    else:
        config["num_heads"] = 8
    return config


def _depths(u: dict[str, torch.Tensor], levels: list[list[tuple[int, bool]]]) -> int | list[int]:
    """Transformer blocks per level (0 where a level has no attention; the middle block has the
    last level's), as one number when every attention level has the middle block's."""

    def count(prefix: str) -> int:
        return len({k[len(prefix) :].split(".")[0] for k in u if k.startswith(prefix)})

    middle = count("middle_block.1.transformer_blocks.")
    depths, block = [], 1
    for lv in levels:
        depths.append(count(f"input_blocks.{block}.1.transformer_blocks.") if lv[0][1] else 0)
        block += len(lv) + 1  # its res blocks and the downsampler after them
    if all(d == middle for d, lv in zip(depths, levels) if lv[0][1]):
        return middle
    return depths


def vae_config(v: dict[str, torch.Tensor], scale_factor: float = SD_SCALE_FACTOR) -> dict:
    """`AutoencoderKL` arguments from an SD VAE state dict (no `first_stage_model.` prefix)."""
    if "encoder.conv_in.weight" not in v:
        raise CheckpointError("no VAE weights (first_stage_model.encoder.conv_in.weight)")
    ch = v["encoder.conv_in.weight"].shape[0]
    n_levels = len({k.split(".")[2] for k in v if k.startswith("encoder.down.")})
    mult = [v[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in range(n_levels)]
    resolution = 256
    return dict(
        _target_="ldm.models.autoencoder.AutoencoderKL",
        in_channels=v["encoder.conv_in.weight"].shape[1],
        out_channels=v["decoder.conv_out.weight"].shape[0],
        ch=ch,
        ch_mult=mult,
        num_res_blocks=len({k.split(".")[4] for k in v if k.startswith("encoder.down.0.block.")}),
        z_channels=v["decoder.conv_in.weight"].shape[1],
        embed_dim=v["post_quant_conv.weight"].shape[1],
        attn_resolutions=[
            resolution // 2**i for i in range(n_levels) if f"encoder.down.{i}.attn.0.q.weight" in v
        ],
        resolution=resolution,
        norm_groups=32,
        scale_factor=scale_factor,
        shift_factor=0.0,
    )


def text_config(
    t: dict[str, torch.Tensor], hf_names: bool, conventions: dict | None = None
) -> dict:
    """`TextEncoder` arguments from an open_clip tower state dict (`model.*` keys).

    `hf_names`: the file used CLIP (SD 1) names, so SD 1's conventions apply (quick GELU, last
    layer, end-token padding, no projection); else SD 2's, unless `conventions` (a text config
    whose layer / padding / activation to keep) says otherwise."""
    if "model.token_embedding.weight" not in t:
        raise CheckpointError("no text encoder weights (token embedding) in the file")
    vocab, width = t["model.token_embedding.weight"].shape
    layers = len({k.split(".")[3] for k in t if k.startswith("model.transformer.resblocks.")})
    has_proj = "model.text_projection" in t
    cfg = {
        "context_length": t["model.positional_embedding"].shape[0],
        "vocab_size": vocab,
        "width": width,
        "heads": max(1, width // 64),
        "layers": layers,
        "mlp_ratio": t["model.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
    }
    if not has_proj:
        cfg["proj_type"] = "none"
    name = OPEN_CLIP_NAMES.get((width, layers))
    if name is not None:  # a known tower: its name says the rest
        cfg = {k: v for k, v in cfg.items() if k == "proj_type"}
    out = dict(
        _target_="ldm.models.text_encoder.TextEncoder",
        model_name=name,
        text_cfg=cfg or None,
        layer="last" if hf_names else "penultimate",
        frozen=True,
        pad_with_eot=hf_names,
        quick_gelu=hf_names,
    )
    if conventions:
        out.update(
            {
                k: conventions[k]
                for k in ("layer", "final_norm", "pad_with_eot", "quick_gelu")
                if k in conventions
            }
        )
    return out


def prediction(path: Path, meta: dict, sd2: bool, explicit: str | None = None) -> Prediction:
    """The prediction type of a file without our config (the rule is in the module docstring)."""
    if explicit is not None:
        return parse_prediction(explicit)
    for key in ("modelspec.prediction_type", "prediction_type"):
        if key in meta:
            return parse_prediction(meta[key])
    yaml = path.with_suffix(".yaml")
    if yaml.is_file():
        found = re.search(r"parameterization:\s*['\"]?(\w+)['\"]?\s*$", yaml.read_text(), re.M)
        return parse_prediction(found.group(1)) if found else Prediction.EPS
    if sd2 and re.search(r"768|(^|[-_])v([-_.]|$)", path.stem.lower()):
        log.info(
            "%s: v-prediction assumed from the file name (override with prediction=eps)", path.name
        )
        return Prediction.V
    return Prediction.EPS


def parse_prediction(name: str) -> Prediction:
    """`Prediction.parse` with a checkpoint's error type."""
    try:
        return Prediction.parse(name)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def sd_config(states: dict[str, dict], path: Path, meta: dict, explicit: str | None) -> dict:
    """The whole model config of an SD single file (parts it lacks are left out)."""
    config: dict = {}
    try:
        _detect_parts(states, config)
    except (KeyError, IndexError) as e:  # a part without the keys its architecture shows in
        raise CheckpointError(
            f"{path.name}: cannot tell the architecture, key {e} is missing; "
            f"is it an SD 1.x/2.x/XL checkpoint?"
        ) from None
    unet = config.get("unet", {})
    xl = "adm_in_channels" in unet
    sd2 = bool(unet.get("use_linear_in_transformer")) and not xl
    pred = prediction(path, meta, sd2, explicit)
    config["diffusion"] = {"schedule": dict(SD_SCHEDULE), "prediction": pred.value}
    config["image_size"] = 1024 if xl else 768 if sd2 and pred is Prediction.V else 512
    return config


def markers(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """What a file says about itself in keys rather than metadata (SDXL's `v_pred`)."""
    return {"prediction_type": "v"} if V_PRED_KEY in state else {}


def _detect_parts(states: dict[str, dict], config: dict) -> None:
    unet = states["unet"]
    if unet:
        config["unet"] = unet_config(unet)
    xl = "label_emb.0.0.weight" in unet or any(
        k.startswith("embedders.") for k in states["text_encoder"]
    )
    if states["vae"]:
        config["vae"] = vae_config(states["vae"], SDXL_SCALE_FACTOR if xl else SD_SCALE_FACTOR)
        config["vae"]["fp16_safe"] = not xl  # SDXL's VAE overflows float16
    text = states["text_encoder"]
    if text and not xl:
        # SD 1 towers (CLIP names) have no projection, SD 2's (open_clip names) have one.
        hf = "model.text_projection" not in text
        config["text_encoder"] = text_config(text, hf_names=hf)
    elif text:
        config["text_encoder"] = dict(
            _target_="ldm.models.text_encoder.DualTextEncoder",
            embedders=[_sdxl_tower(text, i) for i in sorted({int(k.split(".")[1]) for k in text})],
        )


def _sdxl_tower(text: dict[str, torch.Tensor], i: int) -> dict:
    """SDXL tower N: ViT-L in CLIP names (CLIP's conventions) or bigG in open_clip names (zero
    padding), either read at its penultimate hidden states without the final LayerNorm."""
    tower = {
        k.removeprefix(f"embedders.{i}."): v
        for k, v in text.items()
        if k.startswith(f"embedders.{i}.")
    }
    hf = "model.text_projection" not in tower
    return text_config(
        tower, hf_names=hf, conventions={"layer": "penultimate", "final_norm": False}
    )


def architecture_name(config: dict) -> str:
    """The modelspec architecture of a model config ("stable-diffusion-v1", ...)."""
    unet, pred = config["unet"], Prediction.parse(config["diffusion"]["prediction"])
    if unet.get("adm_in_channels") == 2816 and unet.get("context_dim") == 2048:
        return "stable-diffusion-xl-v1-base"
    if unet.get("use_linear_in_transformer") and unet.get("context_dim") == 1024:
        return "stable-diffusion-v2-768-v" if pred is Prediction.V else "stable-diffusion-v2-512"
    if not unet.get("use_linear_in_transformer") and unet.get("context_dim") == 768:
        return "stable-diffusion-v1"
    return "ldm-custom"
