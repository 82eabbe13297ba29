"""Weights on disk: safetensors in the original Stable Diffusion single-file layout.

A full checkpoint is `model.diffusion_model.*` (U-Net) + `first_stage_model.*` (VAE) +
`cond_stage_model.*` (text encoder; our tower's own names start with `model.`), so parts are
found by prefix alone. The resolved model config travels in the file's metadata, which is what
lets `sample.py ckpt=FILE` rebuild the model from the file alone.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.",
}
CONFIG_KEY = "ldm.config"


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


def save(path: str | os.PathLike, parts: dict[str, nn.Module], metadata: dict | None = None,
         dtype: torch.dtype | None = None) -> Path:
    """Write the parts under their SD prefixes, atomically (a reader never sees half a file).

    `dtype` casts floating-point tensors (e.g. torch.float16 to halve the file)."""
    tensors = {}
    for name, module in parts.items():
        for k, v in module.state_dict().items():
            v = v.detach().cpu()
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
            tensors[PREFIXES[name] + k] = v.contiguous()
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
    """The sub-state-dict of one part, its prefix removed."""
    prefix = PREFIXES[name]
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_into(module: nn.Module, state: dict[str, torch.Tensor], what: str = "model") -> nn.Module:
    """Load strictly, with an error that lists every missing, unexpected and mis-shaped key."""
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
    module.load_state_dict(state, strict=True)
    return module


def pretrained(module: nn.Module, path: str, part: str | None = None) -> nn.Module:
    """Config helper: `module` with weights from `path` (a full checkpoint's `part`, or a bare file)."""
    state, _ = read(path)
    if part is not None and any(k.startswith(PREFIXES[part]) for k in state):
        state = split(state, part)
    return load_into(module, state, what=f"{part or 'model'} ({Path(path).name})")
