"""Modules that stay on one device while the model holding them moves: `.to(device)` (which
Lightning calls on the whole training module) changes their dtype, not their device. An EMA
kept in host memory, or a frozen text encoder once its embeddings are cached, frees accelerator
memory this way; who reads them moves what they return."""

from __future__ import annotations

import torch
from torch import nn


class Pinnable(nn.Module):
    pinned: torch.device | None = None  # where it stays; None: it moves with its parent

    def pin(self, device: str | torch.device | None) -> "Pinnable":
        """Move to `device` now and stay there (None: move with the parent again)."""
        self.pinned = None
        if device is not None:
            self.to(device)
            self.pinned = torch.device(device)
        return self

    def _apply(self, fn, recurse=True):
        if self.pinned is None:
            return super()._apply(fn, recurse)

        def dtype_only(t: torch.Tensor) -> torch.Tensor:  # what fn does to t's dtype, not device
            return t.to(fn(torch.empty(0, dtype=t.dtype, device=t.device)).dtype)

        return super()._apply(dtype_only, recurse)  # a parent's .to(device) reaches here
