"""Weights on disk: safetensors in the original Stable Diffusion single-file layout.

A full checkpoint is `model.diffusion_model.*` (U-Net) + `first_stage_model.*` (VAE) +
`cond_stage_model.*` (text encoder), so parts are found by prefix alone. A text tower with a
projection is written in open_clip names (`cond_stage_model.model.*`, as SD 2 files); one
without (the SD 1 tower) in Hugging Face CLIP names (`cond_stage_model.transformer.text_model.*`,
as SD 1 files), so that every tool that reads SD files reads ours. Other layouts (diffusers
folders, `.ckpt`, EMA keys) are read by `ldm.formats`. The resolved model config travels in
the file's metadata, which is what lets `sample.py ckpt=FILE` rebuild the model from the file
alone.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ldm import keymaps

PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.",
}
CONFIG_KEY = "ldm.config"
HF_TEXT_PREFIX = "cond_stage_model.transformer."  # SD 1: transformers CLIPTextModel names


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model; the message says why."""


def _check_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; pass ckpt=PATH to a .safetensors file")
    if p.suffix != ".safetensors":
        raise CheckpointError(f"{p.name}: expected a .safetensors file")
    return p


def _open(path: str | os.PathLike, tensors: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    p = _check_file(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            return ({k: f.get_tensor(k) for k in f.keys()} if tensors else {}), meta
    except Exception as e:  # safetensors raises several types for a damaged header
        raise CheckpointError(f"{p.name} is not a readable safetensors file ({e}); "
                              f"re-export it or point ckpt= at another file") from None


def read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file."""
    return _open(path, tensors=True)


def read_config(path: str | os.PathLike) -> dict:
    """The model config stored in a checkpoint written by `save` (reads the header only)."""
    _, meta = _open(path, tensors=False)
    if CONFIG_KEY not in meta:
        raise CheckpointError(f"{Path(path).name} carries no model config in its metadata; "
                              f"it was not written by this project's train.py")
    return json.loads(meta[CONFIG_KEY])


def sd_state(parts: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The parts' tensors under their SD single-file names (see the module docstring)."""
    state = {}
    for name, module in parts.items():
        own = module.state_dict()
        if name == "text_encoder" and getattr(module.model, "text_projection", 0) is None:
            tower = {k.removeprefix("model."): v for k, v in own.items()}
            state.update({HF_TEXT_PREFIX + k: v for k, v in keymaps.open_clip_to_hf_clip(tower).items()})
        else:
            state.update({PREFIXES[name] + k: v for k, v in own.items()})
    return state


def save(path: str | os.PathLike, parts: dict[str, nn.Module], metadata: dict | None = None,
         dtype: torch.dtype | None = None) -> Path:
    """Write the parts under their SD names, atomically (a reader never sees half a file).

    `dtype` casts floating-point tensors (e.g. torch.float16 to halve the file)."""
    return save_state(path, sd_state(parts), metadata, dtype)


def save_state(path: str | os.PathLike, state: dict[str, torch.Tensor], metadata: dict | None = None,
               dtype: torch.dtype | None = None) -> Path:
    """Write a state dict as safetensors, atomically; `dtype` casts floating-point tensors."""
    tensors = {}
    for k, v in state.items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous()
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates owner-only files; weights are for sharing
    os.replace(tmp, path)
    return path


def split(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The sub-state-dict of one part in our module's names, its prefix removed.

    The text encoder comes in open_clip names (`cond_stage_model.model.*`, the SD 2 tower's
    `logit_scale` dropped: it scores image-text pairs, no text encoder uses it) or in Hugging
    Face CLIP names (`cond_stage_model.transformer.[text_model.]*`, SD 1), mapped to open_clip's."""
    prefix = PREFIXES[name]
    if name == "text_encoder" and any(k.startswith(HF_TEXT_PREFIX) for k in state):
        if any(k.startswith(prefix + "model.") for k in state):
            raise CheckpointError("the file holds two text encoders: cond_stage_model.model.* "
                                  "(open_clip names) and cond_stage_model.transformer.* (CLIP names)")
        hf = {k[len(HF_TEXT_PREFIX):]: v for k, v in state.items() if k.startswith(HF_TEXT_PREFIX)}
        try:
            return {"model." + k: v for k, v in keymaps.hf_clip_to_open_clip(hf).items()}
        except KeyError as e:
            raise CheckpointError(f"text encoder: {e.args[0]}") from None
    part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if name == "text_encoder":
        part.pop("model.logit_scale", None)
    return part


def check_fit(module: nn.Module, state: dict[str, torch.Tensor], what: str = "model") -> None:
    """Raise CheckpointError listing every missing, unexpected and mis-shaped key."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        def show(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" ... (+{len(items) - 8})" if len(items) > 8 else "")
        raise CheckpointError(
            f"{what} weights do not fit the configured architecture: "
            f"{len(missing)} missing [{show(missing)}], {len(unexpected)} unexpected "
            f"[{show(unexpected)}], {len(shapes)} shape mismatches [{show(shapes)}]")


def load_into(module: nn.Module, state: dict[str, torch.Tensor], what: str = "model") -> nn.Module:
    """Load strictly (copying into the module's tensors, so its dtype and device stay), with
    an error that lists every missing, unexpected and mis-shaped key."""
    check_fit(module, state, what)
    module.load_state_dict(state, strict=True)
    return module


def pretrained(module: nn.Module, path: str, part: str | None = None) -> nn.Module:
    """Config helper: `module` with weights from `path` (a full checkpoint's `part`, or a bare file)."""
    state, _ = read(path)
    if part is not None and any(k.startswith(PREFIXES[part]) for k in state):
        state = split(state, part)
    return load_into(module, state, what=f"{part or 'model'} ({Path(path).name})")
