"""Textual-inversion embeddings: A1111's file format, read and written.

A1111 (and ComfyUI, and diffusers' `load_textual_inversion`) read a safetensors file holding
`emb_params`: the (n_vectors, width) vectors of one new word, whose name is the file's stem.
Also read: A1111's older `.pt` layout (`string_to_param["*"]`) and diffusers' own
(`{token: vector(s)}`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ldm.checkpoints.files import CheckpointError, read, save_state


def save_embedding(
    path: str | os.PathLike, vectors: torch.Tensor, token: str, metadata: dict | None = None
) -> Path:
    """(n, width) vectors as A1111's `emb_params` (the trigger word in the metadata too)."""
    meta = {"ldm.token": token, **(metadata or {})}
    return save_state(path, {"emb_params": vectors.detach().float()}, meta)


def read_embedding(path: str | os.PathLike) -> tuple[torch.Tensor, str]:
    """((n, width) vectors, the word they stand for: our metadata's, else the file's stem)."""
    p = Path(path)
    if p.suffix in (".pt", ".bin") and p.is_file():
        obj = torch.load(p, map_location="cpu", weights_only=True)
        state = obj.get("string_to_param", obj) if isinstance(obj, dict) else {}
        meta = {}
    else:
        state, meta = read(p)
    if "emb_params" in state:
        vectors = state["emb_params"]
    elif "*" in state:  # A1111 .pt
        vectors = state["*"]
    elif len(state) == 1:  # diffusers: {token: vector(s)}
        (vectors,) = state.values()
    else:
        raise CheckpointError(
            f"{p.name}: no embedding in it (expected emb_params, or one "
            f"tensor); keys: {sorted(state)[:5]}"
        )
    vectors = vectors.float()
    if vectors.ndim == 1:
        vectors = vectors[None]
    return vectors, meta.get("ldm.token", p.stem)
