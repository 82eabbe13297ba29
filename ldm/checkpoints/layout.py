"""The Stable Diffusion single-file layout: which prefix holds which part, in which names.

A full checkpoint is `model.diffusion_model.*` (U-Net) + `first_stage_model.*` (VAE) +
`cond_stage_model.*` (text encoder), so parts are found by prefix alone. A text tower with a
projection is written in open_clip names (`cond_stage_model.model.*`, as SD 2 files); one
without (the SD 1 tower) in Hugging Face CLIP names (`cond_stage_model.transformer.text_model.*`,
as SD 1 files), so that every tool that reads SD files reads ours. LDM training files may add
the U-Net's EMA as `model_ema.*`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from ldm.checkpoints import keymaps
from ldm.checkpoints.files import CheckpointError, read, save_state

log = logging.getLogger(__name__)
PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.",
}
PARTS = tuple(PREFIXES)
HF_TEXT_PREFIX = "cond_stage_model.transformer."  # SD 1: transformers CLIPTextModel names
EMA_PREFIX = "model_ema."


def sd_state(parts: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The parts' tensors under their SD single-file names (see the module docstring)."""
    state = {}
    for name, module in parts.items():
        own = module.state_dict()
        if name == "text_encoder" and getattr(module.model, "text_projection", 0) is None:
            tower = {k.removeprefix("model."): v for k, v in own.items()}
            state.update(
                {HF_TEXT_PREFIX + k: v for k, v in keymaps.open_clip_to_hf_clip(tower).items()}
            )
        else:
            state.update({PREFIXES[name] + k: v for k, v in own.items()})
    return state


def save(
    path: str | os.PathLike,
    parts: dict[str, nn.Module],
    metadata: dict | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the parts under their SD names, atomically; `dtype` casts floating-point tensors."""
    return save_state(path, sd_state(parts), metadata, dtype)


def split(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The sub-state-dict of one part in our module's names, its prefix removed.

    The text encoder comes in open_clip names (`cond_stage_model.model.*`, the SD 2 tower's
    `logit_scale` dropped: it scores image-text pairs, no text encoder uses it) or in Hugging
    Face CLIP names (`cond_stage_model.transformer.[text_model.]*`, SD 1), mapped to open_clip's."""
    prefix = PREFIXES[name]
    if name == "text_encoder" and any(k.startswith(HF_TEXT_PREFIX) for k in state):
        if any(k.startswith(prefix + "model.") for k in state):
            raise CheckpointError(
                "the file holds two text encoders: cond_stage_model.model.* "
                "(open_clip names) and cond_stage_model.transformer.* (CLIP names)"
            )
        hf = {k[len(HF_TEXT_PREFIX) :]: v for k, v in state.items() if k.startswith(HF_TEXT_PREFIX)}
        try:
            return {"model." + k: v for k, v in keymaps.hf_clip_to_open_clip(hf).items()}
        except KeyError as e:
            raise CheckpointError(f"text encoder: {e.args[0]}") from None
    part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if name == "text_encoder":
        part.pop("model.logit_scale", None)
    return part


def part_states(state: dict[str, torch.Tensor], use_ema: bool = False) -> dict[str, dict]:
    """Each part's state in our names; with `use_ema`, the U-Net from the `model_ema.*` copy."""
    parts = {name: split(state, name) for name in PARTS}
    ema = [
        k
        for k in state
        if k.startswith(EMA_PREFIX) and k not in (EMA_PREFIX + "decay", EMA_PREFIX + "num_updates")
    ]
    if use_ema:
        if not ema:
            raise CheckpointError(
                "use_ema: the file holds no EMA weights (model_ema.*); load without it"
            )
        missing = [k for k in parts["unet"] if keymaps.ldm_ema_key(k) not in state]
        if missing:
            raise CheckpointError(
                f"EMA weights missing for {len(missing)} U-Net keys: {missing[:8]}"
            )
        parts["unet"] = {k: state[keymaps.ldm_ema_key(k)] for k in parts["unet"]}
    elif ema:
        log.info("the file also holds EMA weights (%d tensors); use_ema=True loads them", len(ema))
    return parts


def check_fit(module: nn.Module, state: dict[str, torch.Tensor], what: str = "model") -> None:
    """Raise CheckpointError listing every missing, unexpected and mis-shaped key."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:

        def show(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" ... (+{len(items) - 8})" if len(items) > 8 else "")

        raise CheckpointError(
            f"{what} weights do not fit the configured architecture: "
            f"{len(missing)} missing [{show(missing)}], {len(unexpected)} unexpected "
            f"[{show(unexpected)}], {len(shapes)} shape mismatches [{show(shapes)}]"
        )


def load_into(module: nn.Module, state: dict[str, torch.Tensor], what: str = "model") -> nn.Module:
    """Load strictly (copying into the module's tensors, so its dtype and device stay), with
    an error that lists every missing, unexpected and mis-shaped key."""
    check_fit(module, state, what)
    module.load_state_dict(state, strict=True)
    return module


def pretrained(module: nn.Module, path: str, part: str | None = None) -> nn.Module:
    """Config helper: `module` with weights from `path` (a full checkpoint's `part`, or a bare
    file)."""
    state, _ = read(path)
    if part is not None and any(k.startswith(PREFIXES[part]) for k in state):
        state = split(state, part)
    return load_into(module, state, what=f"{part or 'model'} ({Path(path).name})")
