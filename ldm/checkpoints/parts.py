"""The only classes a weights file may have built, and the checks its config passes first.

A config read from a file (`ldm.config` metadata, a diffusers `config.json` translated by
`diffusers_configs`, an SD file's detected architecture) is data written by whoever made the
file. Nothing in it may choose code: `_target_` must be one of `ALLOWED`, every key one of that
class's constructor arguments, every value a plain JSON scalar or a short list of numbers, and
every size within `LIMITS`, all checked before a module is built, so a crafted file can neither
import a name nor make us build (or loop over) what it claims. `build` is the one constructor
the checkpoint package uses.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping

import open_clip
from torch import nn

from ldm.checkpoints.files import CheckpointError
from ldm.diffusion.schedule import NoiseSchedule
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.text_encoder import DualTextEncoder, TextEncoder
from ldm.models.unet import UNetModel

ALLOWED = {
    f"{c.__module__}.{c.__qualname__}": c
    for c in (UNetModel, AutoencoderKL, TextEncoder, DualTextEncoder, NoiseSchedule)
}
TOWER = f"{TextEncoder.__module__}.{TextEncoder.__qualname__}"  # what `embedders` may hold
MAX_TOWERS = 4
PART_CLASSES = {"unet": UNetModel, "vae": AutoencoderKL, "text_encoder": TextEncoder}
# open_clip `CLIPTextCfg` fields a text tower of ours may set: none of them names a model to
# fetch or a tokenizer to download (`hf_model_name`, `hf_tokenizer_name` are left out).
TEXT_CFG_KEYS = {
    "context_length",
    "vocab_size",
    "width",
    "heads",
    "layers",
    "mlp_ratio",
    "ls_init_value",
    "proj_type",
    "proj_bias",
    "pool_type",
    "embed_cls",
    "no_causal_mask",
    "pad_id",
    "final_ln_after_pool",
}
# Far above any published SD / SDXL part (SD 2's U-Net: 320 channels, 2 blocks, 4 levels; ViT-H:
# 1024 wide, 24 layers; 1000 training steps), far below what would exhaust a machine.
LIMITS = {
    "num_steps": (1, 100_000),
    "num_res_blocks": (1, 16),
    "transformer_depth": (0, 64),
    "layers": (1, 256),
    "heads": (1, 1024),
    "context_length": (1, 4096),
    "vocab_size": (1, 1 << 20),
}
INT_RANGE = (-1, 1 << 16)  # channels, head counts and widths; -1 means "unset"
LIST_LEN = 8  # channel multipliers per level, attention resolutions
STR_LEN = 64
FLOAT_RANGE = (-1e6, 1e6)


def _check_value(what: str, key: str, value) -> None:
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{what}: {key}={value!r:.80} {why}")

    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        lo, hi = LIMITS.get(key, INT_RANGE)
        if not lo <= value <= hi:
            raise bad(f"is outside [{lo}, {hi}]")
    elif isinstance(value, float):
        if key in LIMITS:
            raise bad("must be a whole number")
        if not math.isfinite(value) or not FLOAT_RANGE[0] <= value <= FLOAT_RANGE[1]:
            raise bad("is not a finite number of sane size")
    elif isinstance(value, str):
        if len(value) > STR_LEN:
            raise bad(f"is longer than {STR_LEN} characters")
    elif isinstance(value, list | tuple):
        if len(value) > LIST_LEN:
            raise bad(f"has more than {LIST_LEN} entries")
        for v in value:
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise bad("must be a list of numbers")
            _check_value(what, key, v)
    else:
        raise bad(f"has type {type(value).__name__}, not a number, string or list")


def check(config, what: str) -> dict:
    """`config` if it is a flat config of an allowed class with known, sane arguments, else a
    `CheckpointError` naming `what` (the file and part)."""
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{what}: the config is a {type(config).__name__}, not an object")
    target = config.get("_target_")
    cls = ALLOWED.get(target) if isinstance(target, str) else None
    if cls is None:
        raise CheckpointError(
            f"{what}: refused to build {target!r:.80}: a weights file may only name "
            f"{', '.join(sorted(ALLOWED))}"
        )
    known = set(inspect.signature(cls).parameters)
    unknown = sorted(set(config) - known - {"_target_"})
    if unknown:
        raise CheckpointError(f"{what}: unknown {cls.__name__} arguments {unknown[:8]}")
    for key, value in config.items():
        if key == "text_cfg" and value is not None:
            _check_text_cfg(what, value)
        elif key == "embedders":
            _check_towers(what, value)
        elif key != "_target_":
            _check_value(what, key, value)
    name = config.get("model_name")
    if name is not None and name not in open_clip.list_models():
        raise CheckpointError(f"{what}: open_clip knows no model named {name!r:.80}")
    return dict(config)


def _check_text_cfg(what: str, cfg) -> None:
    if not isinstance(cfg, Mapping):
        raise CheckpointError(f"{what}: text_cfg is a {type(cfg).__name__}, not an object")
    unknown = sorted(set(cfg) - TEXT_CFG_KEYS)
    if unknown:
        raise CheckpointError(f"{what}: text_cfg fields not allowed in a file: {unknown[:8]}")
    for key, value in cfg.items():
        _check_value(what, key, value)


def _check_towers(what: str, towers) -> None:
    """A `DualTextEncoder`'s `embedders`: a short list of flat `TextEncoder` configs."""
    if not isinstance(towers, list | tuple) or not 0 < len(towers) <= MAX_TOWERS:
        raise CheckpointError(f"{what}: embedders must be a list of 1 to {MAX_TOWERS} configs")
    for i, tower in enumerate(towers):
        if not isinstance(tower, Mapping) or tower.get("_target_") != TOWER:
            raise CheckpointError(f"{what}: embedders.{i} must be a {TOWER} config")
        check(tower, f"{what} embedders.{i}")


def build(config: Mapping, what: str = "config") -> nn.Module | NoiseSchedule:
    """The allowed class of a checked config, built on the current default device (a
    `DualTextEncoder`'s towers first, from their own checked configs)."""
    kwargs = check(config, what)
    cls = ALLOWED[kwargs.pop("_target_")]
    if "embedders" in kwargs:
        kwargs["embedders"] = [
            build(t, f"{what} embedders.{i}") for i, t in enumerate(kwargs["embedders"])
        ]
    try:
        return cls(**kwargs)
    except (ValueError, TypeError, AssertionError, ZeroDivisionError) as e:
        raise CheckpointError(f"{what}: {cls.__name__} cannot be built from it ({e})") from None


def check_model(config, what: str) -> dict:
    """A whole model config (`ldm.config`: parts, `diffusion`, `image_size`), checked."""
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{what}: its model config is a {type(config).__name__}")
    unknown = sorted(set(config) - {*PART_CLASSES, "diffusion", "image_size"})
    if unknown:
        raise CheckpointError(f"{what}: unknown model config entries {unknown[:8]}")
    for name in PART_CLASSES:
        if config.get(name) is not None:
            check(config[name], f"{what} ({name})")
    diffusion = config.get("diffusion")
    if not isinstance(diffusion, Mapping) or set(diffusion) != {"schedule", "prediction"}:
        raise CheckpointError(
            f"{what}: its model config needs a diffusion entry of exactly {{schedule, prediction}}"
        )
    check(diffusion["schedule"], f"{what} (schedule)")
    if not isinstance(diffusion["prediction"], str):
        raise CheckpointError(f"{what}: prediction must be a string")
    if "image_size" in config:
        _check_value(what, "image_size", config["image_size"])
    return dict(config)
