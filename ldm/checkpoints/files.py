"""Weight files on disk: safetensors (memory-mapped) and weights-only torch files in, safetensors
out, written atomically. Our files carry the resolved model config under `ldm.config` in their
safetensors metadata, which is what lets a file be loaded without any config beside it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ldm.fileio import atomic_path

CONFIG_KEY = "ldm.config"
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model; the message says why."""


def _existing(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not exist; pass ckpt=PATH to a "
            f".safetensors or .ckpt file, or to a diffusers folder"
        )
    if p.suffix != ".safetensors" and p.suffix not in TORCH_SUFFIXES:
        raise CheckpointError(
            f"{p.name}: expected .safetensors, {', '.join(TORCH_SUFFIXES)} or a folder"
        )
    return p


def _open_safetensors(p: Path, tensors: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            return ({k: f.get_tensor(k) for k in f.keys()} if tensors else {}), meta
    except Exception as e:  # safetensors raises several types for a damaged header
        raise CheckpointError(
            f"{p.name} is not a readable safetensors file ({e}); "
            f"re-export it or point ckpt= at another file"
        ) from None


def load_torch_file(p: Path) -> object:
    """`torch.load(weights_only=True)` of a file: tensors and plain containers, never code (a
    pickle naming anything else is refused), or one `CheckpointError` line naming the file."""
    try:
        try:
            return torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (pre-zip) format cannot be memory-mapped
            return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's message is many lines and offers an unsafe way round
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        named = [x for x in lines if "global" in x.lower()]  # the name the pickle asked for
        why = (named or lines or [""])[0 if named else -1]
        raise CheckpointError(
            f"{p.name} is refused: it does not load as plain tensors with "
            f"torch.load(weights_only=True) ({type(e).__name__}: {why[:200]}); "
            f"only tensor files are read, never arbitrary pickles"
        ) from None


def _read_torch(p: Path) -> dict[str, torch.Tensor]:
    obj = load_torch_file(p)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning / LDM training checkpoints
    if not isinstance(obj, dict):
        raise CheckpointError(f"{p.name} holds a {type(obj).__name__}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (memory-mapped where the format allows) and metadata of a `.safetensors` file or
    a weights-only torch file (`.ckpt`, `.pt`, `.pth`, `.bin`; no metadata)."""
    p = _existing(path)
    if p.suffix in TORCH_SUFFIXES:
        return _read_torch(p), {}
    return _open_safetensors(p, tensors=True)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """A safetensors file's metadata, from its header alone; {} for a torch file."""
    p = _existing(path)
    return {} if p.suffix in TORCH_SUFFIXES else _open_safetensors(p, tensors=False)[1]


def read_config(path: str | os.PathLike) -> dict:
    """The model config stored in a file written by this project (reads the header only)."""
    meta = read_metadata(path)
    if CONFIG_KEY not in meta:
        raise CheckpointError(
            f"{Path(path).name} carries no model config in its metadata; "
            f"it was not written by this project's train.py"
        )
    return parse_config(meta[CONFIG_KEY], Path(path).name)


def parse_config(raw: str, name: str) -> dict:
    """The JSON of a file's `ldm.config` metadata (`parts.check_model` checks it before use)."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(
            f"{name}: its {CONFIG_KEY} metadata is not valid JSON ({e})"
        ) from None


def save_state(
    path: str | os.PathLike,
    state: dict[str, torch.Tensor],
    metadata: dict | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a state dict as safetensors, atomically (a reader never sees half a file);
    `dtype` casts floating-point tensors (e.g. torch.float16 to halve the file)."""
    tensors = {}
    for k, v in state.items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous()
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(
            tmp, 0o666 & ~umask
        )  # safetensors creates owner-only files; weights are for sharing
    return Path(path)


def check_output(path: str | os.PathLike, overwrite: bool) -> None:
    """Refuse to replace a file (or a folder) unless asked: it may be the user's only copy."""
    if Path(path).exists() and not overwrite:
        raise CheckpointError(f"{path} exists; pass --overwrite to replace it")
