"""LoRA files: the kohya layout (A1111, ComfyUI and diffusers read it) and the diffusers / PEFT
layout, each read and written, with their key names; a newcomer adding a layout adds it here.

Every adapter has a canonical name: its component (`unet`, `text_encoder`, and SDXL's second
tower `text_encoder_2`) and the module path diffusers' `UNet2DConditionModel` or transformers'
`CLIPTextModel` give that layer, e.g.
`unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q` or
`text_encoder.text_model.encoder.layers.3.self_attn.q_proj` (which layer of our models has which
canonical name is `ldm.checkpoints.lora_networks`'). A U-Net adapter may also be named by the
original SD module path (`unet.input_blocks.4.1.transformer_blocks.0.attn1.to_q`): kohya trains
SDXL on an SD-layout U-Net and names its adapters so, and turning those names into diffusers'
needs the model's U-Net config, which a file alone does not give. A file is read into adapters
by canonical name, {name: {"down", "up", "alpha"}}, and written from them; a key that fits
neither layout, or an adapter without its pair, is an error naming it.

kohya: `lora_unet_<U-Net path>.lora_down.weight` / `.lora_up.weight` / `.alpha` (dots of the
path as underscores), the text encoder as `lora_te_text_model_encoder_layers_N_...`, `ss_*`
training metadata. SDXL's files (`sdxl=True` when writing) name the towers `lora_te1_` and
`lora_te2_` and the U-Net by its SD paths, as kohya's SDXL networks do; `lora_te1_` is read as
the (first) text encoder for any model. This is the layout written by default. Underscores
inside module names (`down_blocks`, `to_q`, `self_attn`, `input_blocks`, `emb_layers`, ...) are
told apart by a table (`_WORDS`), so a kohya name can be turned back without the model.
diffusers / PEFT: `unet.<diffusers path>.lora_A.weight` / `.lora_B.weight`, the text encoders as
`text_encoder[_2].text_model.encoder.layers.N...` (read with or without `text_model.`), and the
alphas in diffusers' `lora_adapter_metadata` (PEFT LoraConfig per component: `r`, `lora_alpha`,
`rank_pattern`, `alpha_pattern`, `target_modules`), since diffusers refuses tensor keys without
`lora` in them. Every tensor and alpha survives kohya <-> PEFT unchanged.

Files are untrusted, and only data is taken from them: torch files are read weights-only, no
metadata value is ever a class or function to call, the PEFT metadata is checked field by field
(`peft_config`), every adapter's tensors and alpha are checked (`check_adapter`), and a module is
only allocated once its tensors are known to fit the layer (`ldm.models.lora.networks_from`), so
its size is that of the file's own tensors, never a size the file merely claims. Each refusal is
one CheckpointError naming the file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ldm.checkpoints.files import CheckpointError, read, save_state

Adapters = dict[str, dict[str, torch.Tensor]]  # canonical name -> {"down", "up", "alpha"}
KOHYA_SUFFIX = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
PEFT_SUFFIX = {"lora_A.weight": "down", "lora_B.weight": "up", "alpha": "alpha"}
UNSUPPORTED = ("lora_mid", "hada_", "lokr_", "dora_scale", "oft_", "diff", ".w_norm", ".b_norm")
MAX_RANK = 65536  # far above any published LoRA; PEFT metadata claiming more is not a LoRA file


# --------------------------------------------------------------------------------------------
# kohya names <-> canonical names

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # diffusers' names of the parts
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
KOHYA_SDXL_PREFIX = {**KOHYA_PREFIX, "text_encoder": "lora_te1_"}  # kohya's SDXL networks
READ_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
# the first module of an SD-layout U-Net path; diffusers' paths begin with other words
SD_UNET_ROOTS = ("time_embed", "label_emb", "input_blocks", "middle_block", "output_blocks", "out")
# module names that hold an underscore themselves (longest first): diffusers', transformers',
# and the SD U-Net's (kohya's SDXL names)
_WORDS = sorted(
    [
        "down_blocks",
        "up_blocks",
        "mid_block",
        "transformer_blocks",
        "proj_in",
        "proj_out",
        "to_q",
        "to_k",
        "to_v",
        "to_out",
        "time_emb_proj",
        "conv_shortcut",
        "conv_in",
        "conv_out",
        "text_model",
        "self_attn",
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
        "final_layer_norm",
        "layer_norm1",
        "layer_norm2",
        "time_embedding",
        "add_embedding",
        "linear_1",
        "linear_2",
        "conv_norm_out",
        "input_blocks",
        "middle_block",
        "output_blocks",
        "in_layers",
        "out_layers",
        "emb_layers",
        "skip_connection",
        "time_embed",
        "label_emb",
    ],
    key=len,
    reverse=True,
)


def kohya_name(canonical: str, sdxl: bool = False) -> str:
    """`unet.down_blocks.0...to_q` -> `lora_unet_down_blocks_0_..._to_q`; with `sdxl`, the
    first tower is `lora_te1_` (kohya's SDXL names) rather than `lora_te_`."""
    component, path = canonical.split(".", 1)
    return (KOHYA_SDXL_PREFIX if sdxl else KOHYA_PREFIX)[component] + path.replace(".", "_")


def canonical_name(kohya: str) -> str:
    """The inverse of `kohya_name`; ValueError for a name of no known component. Text names
    without `text_model_` (transformers 5 module paths) are read too."""
    for prefix, component in READ_PREFIXES.items():
        if kohya.startswith(prefix):
            return _with_text_model(f"{component}.{_dotted(kohya[len(prefix) :])}")
    raise ValueError(f"{kohya!r} is neither a lora_unet_* nor a lora_te_* / lora_te[12]_* name")


def _with_text_model(name: str) -> str:
    """A text adapter's name with its `text_model.` level, which transformers 5's CLIPTextModel
    (and so diffusers' files and conversions made with it) leaves out."""
    component, path = name.split(".", 1)
    if component != "unet" and not path.startswith("text_model."):
        return f"{component}.text_model.{path}"
    return name


def is_sd_unet_name(name: str) -> bool:
    """Whether a canonical name is a U-Net adapter named by its SD module path."""
    component, path = name.split(".", 1)
    return component == "unet" and path.split(".", 1)[0] in SD_UNET_ROOTS


def is_sdxl_lora(adapters: Adapters, meta: Mapping[str, str]) -> bool:
    """Whether a read file is an SDXL model's LoRA: a second tower, SD-layout U-Net names (only
    kohya's SDXL networks write those), or kohya's / the model spec's metadata saying so."""
    return (
        any(n.startswith("text_encoder_2.") or is_sd_unet_name(n) for n in adapters)
        or str(meta.get("ss_base_model_version", "")).startswith("sdxl")
        or str(meta.get("modelspec.architecture", "")).startswith("stable-diffusion-xl")
    )


def _dotted(flat: str) -> str:
    out, rest = [], flat
    while rest:
        word = next((w for w in _WORDS if rest == w or rest.startswith(w + "_")), None)
        word = word or rest.split("_", 1)[0]
        out.append(word)
        rest = rest[len(word) + 1 :]
    return ".".join(out)


# --------------------------------------------------------------------------------------------
# files <-> adapters


def read_lora(path: str | os.PathLike) -> tuple[Adapters, dict[str, str]]:
    """(adapters by canonical name, metadata) of a kohya- or PEFT-layout LoRA file."""
    try:
        exists = Path(path).is_file()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        exists = False
    if not exists:
        raise CheckpointError(f"LoRA file {str(path)!r} does not exist")
    state, meta = read(path)
    try:
        return adapters_from_state(state, meta), meta
    except ValueError as e:
        raise CheckpointError(f"{Path(path).name}: {e}") from None


def adapters_from_state(
    state: Mapping[str, torch.Tensor],
    meta: Mapping[str, str] | None = None,
) -> Adapters:
    """Adapters of a state dict in either layout; a PEFT file's alphas come from its metadata,
    and where nothing says, alpha = rank (scale 1), as kohya and diffusers assume. A kohya
    alpha of 0 also means alpha = rank, as in kohya's own loader."""
    adapters: Adapters = {}
    for key, value in state.items():
        name, part = _split_key(key)
        parts = adapters.setdefault(name, {})
        if part in parts:  # e.g. lora_te_X and lora_te1_X: two names of one layer
            raise ValueError(f"{key}: a second {part} tensor for adapter {name}")
        parts[part] = value
    peft_alphas = _peft_alphas(adapters, meta or {})
    for name, parts in adapters.items():
        if "down" not in parts or "up" not in parts:
            missing = "lora_down/lora_A" if "down" not in parts else "lora_up/lora_B"
            raise ValueError(f"adapter {name} has no {missing} weight")
        check_adapter(name, parts)
        alpha = peft_alphas.get(name, float(parts["down"].shape[0]))
        parts.setdefault("alpha", torch.tensor(alpha, dtype=torch.float32))
        if float(parts["alpha"]) == 0:
            parts["alpha"] = torch.tensor(float(parts["down"].shape[0]))
    return adapters


def check_adapter(name: str, parts: Mapping[str, torch.Tensor]) -> None:
    """ValueError unless down (rank, in[, k, k]) and up (out, rank[, 1, 1]) are float tensors of
    one rank in 1..MAX_RANK, and alpha (if given) is one finite number >= 0."""
    down, up = parts["down"], parts["up"]
    for part, t in (("down", down), ("up", up)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.ndim not in (2, 4):
            what = f"a {t.dtype} tensor of {t.ndim} dims" if isinstance(t, torch.Tensor) else t
            raise ValueError(f"adapter {name}: its {part} weight is {what}, not a float matrix")
    rank = down.shape[0]
    if not 1 <= rank <= MAX_RANK or up.shape[1] != rank or 0 in down.shape or 0 in up.shape:
        raise ValueError(
            f"adapter {name}: down {tuple(down.shape)} and up {tuple(up.shape)} do not make "
            f"a LoRA of rank 1..{MAX_RANK} (down (rank, in), up (out, rank))"
        )
    if "alpha" in parts:
        alpha = parts["alpha"]
        if not isinstance(alpha, torch.Tensor) or alpha.numel() != 1 or alpha.is_complex():
            raise ValueError(f"adapter {name}: its alpha is not one number")
        if not math.isfinite(float(alpha)) or float(alpha) < 0:
            raise ValueError(
                f"adapter {name}: its alpha {float(alpha)} is not a finite number >= 0"
            )


def _split_key(key: str) -> tuple[str, str]:
    """(canonical name, "down" | "up" | "alpha") of one tensor's key in either layout."""
    if not isinstance(key, str):  # a torch file's dict may have any keys
        raise ValueError(f"key {key!r} is not a string: not a LoRA state dict")
    if any(u in key for u in UNSUPPORTED):
        raise ValueError(
            f"{key}: this adapter kind (LoHa, LoKr, DoRA, OFT, Tucker LoCon, full "
            f"diff) is not supported; plain LoRA and LoCon are"
        )
    for suffixes, kohya in ((KOHYA_SUFFIX, True), (PEFT_SUFFIX, False)):
        for suffix, part in suffixes.items():
            if key.endswith("." + suffix):
                stem = key[: -len(suffix) - 1]
                if kohya and stem.startswith(tuple(READ_PREFIXES)):
                    return canonical_name(stem), part
                if not kohya and stem.split(".", 1)[0] in COMPONENTS and "." in stem:
                    return _with_text_model(stem), part
    raise ValueError(
        f"key {key!r} is neither kohya's lora_unet_*/lora_te_*/lora_te[12]_* "
        f"(.lora_down/.lora_up/.alpha) nor diffusers' unet.*/text_encoder[_2].* "
        f"(.lora_A/.lora_B)"
    )


def kohya_state(adapters: Adapters, sdxl: bool = False) -> dict[str, torch.Tensor]:
    out = {}
    for name, parts in adapters.items():
        stem = kohya_name(name, sdxl)
        out[f"{stem}.lora_down.weight"] = parts["down"]
        out[f"{stem}.lora_up.weight"] = parts["up"]
        out[f"{stem}.alpha"] = parts["alpha"]
    return out


def peft_state(adapters: Adapters) -> dict[str, torch.Tensor]:
    sd_named = [n for n in adapters if is_sd_unet_name(n)]
    if sd_named:
        # diffusers finds a PEFT adapter by its diffusers module path; which one an SD path is
        # depends on the U-Net's config (blocks per level, levels with attention)
        raise ValueError(
            f"{len(sd_named)} adapter(s) name the U-Net by its SD module paths (kohya's SDXL "
            f"names, e.g. {sd_named[0]}); the PEFT layout needs diffusers' paths, which only "
            f"the model's U-Net config gives: keep this file in the kohya layout"
        )
    out = {}
    for name, parts in adapters.items():
        out[f"{name}.lora_A.weight"] = parts["down"]
        out[f"{name}.lora_B.weight"] = parts["up"]
    return out


def peft_metadata(adapters: Adapters) -> dict[str, object]:
    """diffusers' `lora_adapter_metadata`: a PEFT LoraConfig per component, prefixed by it.

    Module paths are given without the text encoder's `text_model.` level, so that they match
    under transformers 4 (which has it) and 5 (which does not)."""
    out: dict[str, object] = {}
    for component in sorted({n.split(".", 1)[0] for n in adapters}):
        own = {_peft_path(n): p for n, p in adapters.items() if n.startswith(component + ".")}
        ranks = {k: int(p["down"].shape[0]) for k, p in own.items()}
        alphas = {k: float(p["alpha"]) for k, p in own.items()}
        r, alpha = _most_common(ranks.values()), _most_common(alphas.values())
        out[component] = {
            "r": r,
            "lora_alpha": alpha,
            "target_modules": sorted(own),
            "rank_pattern": {k: v for k, v in ranks.items() if v != r},
            "alpha_pattern": {k: v for k, v in alphas.items() if v != alpha},
        }
    return {f"{c}.{k}": v for c, config in out.items() for k, v in config.items()}


def _peft_path(name: str) -> str:
    return name.split(".", 1)[1].removeprefix("text_model.")


def _most_common(values) -> float:
    values = list(values)
    return max(values, key=values.count)


def _peft_alphas(adapters: Adapters, meta: Mapping[str, str]) -> dict[str, float]:
    """Alphas of PEFT-layout adapters from diffusers' `lora_adapter_metadata`, if present."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return {}
    config = peft_config(raw)
    out = {}
    for name in adapters:
        component, path = name.split(".", 1)[0], _peft_path(name)
        alpha = config.get(f"{component}.alpha_pattern", {}).get(path)
        if alpha is None:
            alpha = config.get(f"{component}.lora_alpha")
        if alpha is not None:
            out[name] = float(alpha)
    return out


def _is_number(v: object) -> bool:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer beyond any float
        return False


def _is_rank(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_RANK


def _is_alpha(v: object) -> bool:
    return _is_number(v) and v >= 0


def _is_mapping_of(check):
    return lambda v: (
        isinstance(v, dict) and all(isinstance(k, str) and check(x) for k, x in v.items())
    )


def _is_modules(v: object) -> bool:  # PEFT: a list of names, or one regular expression
    return (
        v is None
        or isinstance(v, str)
        or (isinstance(v, list) and all(isinstance(x, str) for x in v))
    )


# the PEFT LoraConfig fields read or written here, and what each must be; others are ignored
PEFT_FIELDS = {
    "r": (_is_rank, f"an integer rank in 1..{MAX_RANK}"),
    "lora_alpha": (_is_alpha, "a finite number >= 0"),
    "rank_pattern": (_is_mapping_of(_is_rank), f"an object of ranks in 1..{MAX_RANK}"),
    "alpha_pattern": (_is_mapping_of(_is_alpha), "an object of finite numbers >= 0"),
    "target_modules": (_is_modules, "a list of module names or one pattern"),
}


def peft_config(raw: str) -> dict[str, object]:
    """diffusers' `lora_adapter_metadata` JSON: an object whose `<component>.<field>` entries
    of PEFT_FIELDS have their types (ValueError otherwise); any other entry is ignored, and
    nothing in it is ever called or instantiated."""
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"its lora_adapter_metadata is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(
            f"its lora_adapter_metadata is a JSON {type(config).__name__}, not an object of "
            f"PEFT settings"
        )
    for key, value in config.items():
        field = key.rsplit(".", 1)[-1]
        if field in PEFT_FIELDS and not PEFT_FIELDS[field][0](value):
            shown = json.dumps(value)
            shown = shown if len(shown) <= 40 else shown[:40] + "..."
            raise ValueError(
                f"its lora_adapter_metadata {key} is {shown}; expected {PEFT_FIELDS[field][1]}"
            )
    return config


def save_lora(
    path: str | os.PathLike,
    adapters: Adapters,
    layout: str = "kohya",
    metadata: dict | None = None,
    dtype: torch.dtype | None = None,
    sdxl: bool = False,
) -> Path:
    """Write adapters in the kohya or the PEFT layout (safetensors, atomically); `sdxl`: an
    SDXL model's, whose kohya names say `lora_te1_` for the first tower."""
    if layout not in ("kohya", "peft"):
        raise ValueError(f"unknown LoRA layout {layout!r}; choose kohya or peft")
    metadata = dict(metadata or {})
    if layout == "peft":
        metadata["lora_adapter_metadata"] = json.dumps(peft_metadata(adapters), sort_keys=True)
        return save_state(path, peft_state(adapters), metadata, dtype)
    return save_state(path, kohya_state(adapters, sdxl), metadata, dtype)


def read_loras(loras: list[tuple[str, float]]) -> list[tuple[str, Adapters, float]]:
    """(file name, adapters, scale) of LoRA files: read, and checked, before any model is."""
    return [(Path(path).name, read_lora(path)[0], scale) for path, scale in loras]


def pair_scales(files: list[str], scales) -> list[tuple[str, float]]:
    """(file, scale) pairs from one scale for every file, or one scale each."""
    scales = [scales] if isinstance(scales, int | float) else list(scales)
    if len(scales) == 1:
        scales = scales * len(files)
    if len(scales) != len(files):
        raise ValueError(
            f"{len(files)} LoRA files but {len(scales)} scales: give one scale, or one per file"
        )
    return list(zip(files, map(float, scales)))
