"""Optimizers a config can name besides torch's own."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def adamw_8bit(
    params: Iterable,
    lr: float = 1e-4,
    betas=(0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
) -> torch.optim.Optimizer:
    """bitsandbytes' 8-bit AdamW (its state in 8 bits: ~6 bytes less per parameter), which
    needs bitsandbytes and a CUDA device: a clear error otherwise."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ImportError(
            "optim=adamw8bit needs bitsandbytes (pip install bitsandbytes) and a "
            "CUDA GPU; use optim=adamw otherwise"
        ) from None
    if not torch.cuda.is_available():
        raise RuntimeError("optim=adamw8bit runs on a CUDA GPU only; use optim=adamw on the CPU")
    return bnb.optim.AdamW8bit(
        params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay
    )
