"""Textual-inversion embeddings: A1111's file format, read and written.

A1111 (and ComfyUI, and diffusers' `load_textual_inversion`) read a safetensors file holding
`emb_params`: the (n_vectors, width) vectors of one new word, whose name is the file's stem.
Also read: A1111's older `.pt` layout (`string_to_param["*"]`) and diffusers' own
(`{token: vector(s)}`).

Files are untrusted: a torch file is read weights-only (a pickle that would run code is refused),
the vectors must be one finite (n, width) or (width,) float tensor of at most MAX_VECTORS rows,
and the word must be one a prompt can hold (`check_word`): an empty one would be found between
every two characters of every prompt. Each refusal is one `CheckpointError` naming the file.
"""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

import torch

from ldm.checkpoints.files import (
    TORCH_SUFFIXES,
    CheckpointError,
    load_torch_file,
    read,
    save_state,
)

MAX_VECTORS = 75  # CLIP's 77 positions less the start and end tokens: more can never be seen
MAX_WORD = 100  # characters; a trigger word is typed into prompts


def save_embedding(
    path: str | os.PathLike, vectors: torch.Tensor, token: str, metadata: dict | None = None
) -> Path:
    """(n, width) vectors as A1111's `emb_params` (the trigger word in the metadata too)."""
    meta = {"ldm.token": token, **(metadata or {})}
    return save_state(path, {"emb_params": vectors.detach().float()}, meta)


def read_embedding(path: str | os.PathLike) -> tuple[torch.Tensor, str]:
    """((n, width) vectors, the word they stand for: our metadata's, else the file's stem)."""
    p = Path(path)
    try:
        exists = p.is_file()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        exists = False
    if not exists:
        raise CheckpointError(f"embedding file {str(path)!r} does not exist")
    if p.suffix in TORCH_SUFFIXES:
        obj = load_torch_file(p)
        state = obj.get("string_to_param", obj) if isinstance(obj, dict) else None
        if not isinstance(state, dict):
            raise CheckpointError(f"{p.name}: holds a {type(obj).__name__}, not an embedding")
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
        keys = sorted(map(str, state))[:5]
        raise CheckpointError(
            f"{p.name}: no embedding in it (expected emb_params, or one tensor); keys: {keys}"
        )
    word = meta.get("ldm.token", p.stem)
    return check_vectors(vectors, p.name), check_word(word, p.name)


def check_vectors(vectors: object, name: str) -> torch.Tensor:
    """The (n, width) float32 vectors of a file, or a CheckpointError naming it."""
    if not isinstance(vectors, torch.Tensor):
        raise CheckpointError(f"{name}: its embedding is a {type(vectors).__name__}, not a tensor")
    if not vectors.is_floating_point() or vectors.ndim not in (1, 2) or vectors.numel() == 0:
        raise CheckpointError(
            f"{name}: its embedding is a {vectors.dtype} tensor of shape "
            f"{tuple(vectors.shape)}; expected float vectors (n, width)"
        )
    vectors = vectors.float()
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.shape[0] > MAX_VECTORS:
        raise CheckpointError(
            f"{name}: {vectors.shape[0]} vectors for one word; a prompt holds at most {MAX_VECTORS}"
        )
    if not torch.isfinite(vectors).all():
        raise CheckpointError(f"{name}: its embedding holds NaN or infinite values")
    return vectors


def check_word(word: object, name: str) -> str:
    """The trigger word of a file if a prompt can hold it, else a CheckpointError naming the file.

    Words are matched anywhere in a prompt, case-insensitively: an empty one would match between
    every two characters, one with outer spaces or control characters cannot be typed reliably,
    and one without a letter or digit (",", "...") would match punctuation of ordinary prompts."""
    why = None
    if not isinstance(word, str) or not word.strip():
        why = "is empty"
    elif word != word.strip():
        why = "starts or ends with whitespace"
    elif len(word) > MAX_WORD:
        why = f"is {len(word)} characters long (at most {MAX_WORD})"
    elif any(unicodedata.category(c)[0] == "C" for c in word):
        why = "holds a control or invisible character"
    elif not any(c.isalnum() for c in word):
        why = "has no letter or digit, so it would match punctuation in ordinary prompts"
    if why:
        shown = repr(word[:40] + "..." if len(word) > 40 else word) if isinstance(word, str) else ""
        raise CheckpointError(
            f"{name}: its trigger word {shown} {why}; rename the file (the word is its "
            f"stem) or set its ldm.token metadata to a word such as <my-style>"
        )
    return word


def check_words(words: list[tuple[str, str]]) -> None:
    """(file name, word) pairs whose words can be told apart in a prompt: prompts are searched
    for them case-insensitively, so a word inside another ("pastel" in "<pastel>") or the same
    word twice would take the other's place."""
    for i, (name, word) in enumerate(words):
        for other_name, other in words[:i]:
            if word.lower() in other.lower() or other.lower() in word.lower():
                raise CheckpointError(
                    f"{name}: its trigger word {word!r} and {other!r} of {other_name} "
                    f"contain one another; rename one of the files"
                )
