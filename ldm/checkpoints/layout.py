"""The Stable Diffusion single-file layout: which prefix holds which part, in which names.

A full checkpoint is `model.diffusion_model.*` (U-Net) + `first_stage_model.*` (VAE) +
`cond_stage_model.*` (text encoder), so parts are found by prefix alone. A text tower with a
projection is written in open_clip names (`cond_stage_model.model.*`, as SD 2 files); one
without (the SD 1 tower) in Hugging Face CLIP names (`cond_stage_model.transformer.text_model.*`,
as SD 1 files), so that every tool that reads SD files reads ours. SDXL files hold their towers
under `conditioner.embedders.N.` instead, by the same rule: ViT-L (no projection) as
`conditioner.embedders.0.transformer.text_model.*`, bigG as `conditioner.embedders.1.model.*`
with its `text_projection` as open_clip keeps it (x @ P, where diffusers' Linear weight is P.T).
LDM training files may add the U-Net's EMA as `model_ema.*`.
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
SDXL_TEXT_PREFIX = "conditioner.embedders."  # SDXL: one prefix per tower, N.
EMA_PREFIX = "model_ema."


def tower_state(tower: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """One text tower's tensors under `prefix`: open_clip names (`model.*`) for a tower with a
    projection, CLIP names (`transformer.text_model.*`) for one without."""
    own = tower.state_dict()
    if getattr(tower.model, "text_projection", 0) is not None:
        return {prefix + k: v for k, v in own.items()}
    clip = keymaps.open_clip_to_hf_clip({k.removeprefix("model."): v for k, v in own.items()})
    return {prefix + "transformer." + k: v for k, v in clip.items()}


def sd_state(parts: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The parts' tensors under their SD single-file names (see the module docstring)."""
    state = {}
    for name, module in parts.items():
        if name != "text_encoder":
            state.update({PREFIXES[name] + k: v for k, v in module.state_dict().items()})
        elif hasattr(module, "embedders"):  # SDXL's towers
            for i, tower in enumerate(module.embedders):
                state.update(tower_state(tower, f"{SDXL_TEXT_PREFIX}{i}."))
        else:
            state.update(tower_state(module, PREFIXES[name]))
    return state


def save(
    path: str | os.PathLike,
    parts: dict[str, nn.Module],
    metadata: dict | None = None,
    dtype: torch.dtype | None = None,
    markers: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the parts under their SD names (and `markers`, tensors whose key tells tools
    something, e.g. SDXL's `v_pred`), atomically; `dtype` casts floating-point tensors."""
    return save_state(path, {**sd_state(parts), **(markers or {})}, metadata, dtype)


def split(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The sub-state-dict of one part in our module's names, its prefix removed.

    The text encoder comes in open_clip names (`cond_stage_model.model.*`) or in Hugging Face
    CLIP names (`cond_stage_model.transformer.[text_model.]*`, SD 1), mapped to open_clip's;
    an SDXL file's towers (`conditioner.embedders.N.*`, each in either naming) become
    `embedders.N.model.*`, the `DualTextEncoder`'s names."""
    if name != "text_encoder":
        prefix = PREFIXES[name]
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    towers = sorted({int(k.split(".")[2]) for k in state if k.startswith(SDXL_TEXT_PREFIX)})
    if not towers:
        return split_tower(state, PREFIXES[name])
    out = {}
    for i in towers:
        tower = split_tower(state, f"{SDXL_TEXT_PREFIX}{i}.")
        out.update({f"embedders.{i}.{k}": v for k, v in tower.items()})
    return out


def split_tower(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """One text tower's keys under `prefix` as our `model.*` (open_clip) names; open_clip's
    `logit_scale` (it scores image-text pairs, no text encoder uses it) is dropped."""
    hf_prefix = prefix + "transformer."
    if any(k.startswith(hf_prefix) for k in state):
        if any(k.startswith(prefix + "model.") for k in state):
            raise CheckpointError(
                f"the file holds two text encoders: {prefix}model.* "
                f"(open_clip names) and {hf_prefix}* (CLIP names)"
            )
        hf = {k[len(hf_prefix) :]: v for k, v in state.items() if k.startswith(hf_prefix)}
        try:
            return {"model." + k: v for k, v in keymaps.hf_clip_to_open_clip(hf).items()}
        except KeyError as e:
            raise CheckpointError(f"text encoder: {e.args[0]}") from None
    part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
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
    if part is not None:
        state = split(state, part) or state  # a bare file has no part prefix
    return load_into(module, state, what=f"{part or 'model'} ({Path(path).name})")
