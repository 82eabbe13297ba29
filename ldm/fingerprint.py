"""Identities of weights, stored beside what was made with them and compared before reuse.

Two strengths, both over a state dict (name -> tensor), both stable across versions (they are
stored in latent caches, Lightning checkpoints and class-image folders):

- `exact`: sha256 of every tensor's name, dtype, shape and bytes (and optional settings): a
  latent cache's VAE and text encoder, where any changed bit changes what the cache holds;
- `summary`: each floating-point tensor's shape and float64 sum, cheap on a large model: the
  frozen parts of a training checkpoint (`frozen_fingerprint`), and, hashed whole by `digest`,
  the base model that drew DreamBooth class images.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping

import torch


def tensor_record(name: str, t: torch.Tensor) -> tuple[bytes, bytes]:
    """What `exact` hashes of one tensor: its header (name, dtype, shape) and its bytes."""
    t = t.detach().cpu().contiguous()
    header = f"{name}|{t.dtype}|{tuple(t.shape)}".encode()
    return header, t.reshape(-1).view(torch.uint8).numpy().tobytes()


def exact(state: Mapping[str, torch.Tensor], extra: dict | None = None) -> str:
    """sha256 of the tensors (names, dtypes, shapes, bytes, in name order) and `extra`
    settings (whatever besides the weights changes the output)."""
    h = hashlib.sha256(json.dumps(extra or {}, sort_keys=True).encode())
    for name, t in sorted(state.items()):
        for part in tensor_record(name, t):
            h.update(part)
    return h.hexdigest()


def tensor_summary(t: torch.Tensor) -> list:
    """[shape, float64 sum]: a cheap identity of one tensor."""
    return [list(t.shape), float(t.double().sum())]


def summary(state: Mapping[str, torch.Tensor], keys: Iterable[str]) -> dict[str, list | None]:
    """`tensor_summary` of each floating-point tensor of `keys` (in name order); a key missing
    from `state` maps to None, so a lost tensor shows too."""
    return {
        k: tensor_summary(state[k]) if k in state else None
        for k in sorted(keys)
        if k not in state or state[k].is_floating_point()
    }


def digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 of the `summary` of every tensor: one string naming a model's weights."""
    return hashlib.sha256(json.dumps(summary(state, set(state))).encode()).hexdigest()
