"""The diffusion module's small settings, one dataclass each (configs/model/ldm.yaml holds one node
per class): the learning-rate schedule, the EMA, caption augmentation, speed options."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch


def warmup_lambda(warmup_steps: int, decay_steps: int | None = None) -> Callable[[int], float]:
    """Linear learning-rate warmup from 0, then constant, or with `decay_steps` a cosine decay
    to 0 at that step (a short fine-tune at a high rate ends on settled weights)."""

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, warmup_steps))
        if decay_steps is None or step < warmup_steps:
            return warm
        done = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
        return warm * 0.5 * (1.0 + math.cos(math.pi * done))

    return factor


@dataclass(frozen=True)
class LRSchedule:
    """The learning rate's factor by step: `warmup_steps` of linear warmup, then constant, or a
    cosine to 0 at `decay_steps` (see `warmup_lambda`)."""

    warmup_steps: int = 100
    decay_steps: int | None = None

    def factor(self) -> Callable[[int], float]:
        return warmup_lambda(self.warmup_steps, self.decay_steps)


@dataclass(frozen=True)
class EMASettings:
    """The EMA of the U-Net, where the choice of what trains keeps one (`Trains.keeps_ema`):
    its `decay` (null: none), an update every `every` optimizer steps (with the decay of that
    many), and its `device` ("cpu": host memory, swapped into the U-Net to validate and sample;
    null: the U-Net's)."""

    decay: float | None = 0.999
    every: int = 1
    device: str | None = None


def keep_mask(
    n: int,
    p: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(n,) bool: which captions survive caption dropout with probability p. Dropped ones become
    the empty prompt, which teaches the unconditional model classifier-free guidance needs."""
    return torch.rand(n, generator=generator, device=device) >= p


def augment_tags(
    caption: str,
    shuffle: bool,
    keep_first: int,
    dropout: float,
    generator: torch.Generator | None = None,
) -> str:
    """Tag-style captions ("tag, tag, tag"): drop each tag after the first `keep_first` with
    probability `dropout`, and shuffle those (kohya's shuffle_caption / keep_tokens /
    caption_tag_dropout_rate); the first tags (e.g. a trigger word) stay in place."""
    tags = [t.strip() for t in caption.split(",")]
    head, tail = tags[:keep_first], tags[keep_first:]
    if dropout:
        tail = [t for t in tail if torch.rand((), generator=generator) >= dropout]
    if shuffle and len(tail) > 1:
        tail = [tail[i] for i in torch.randperm(len(tail), generator=generator).tolist()]
    return ", ".join(t for t in head + tail if t)


@dataclass(frozen=True)
class Captions:
    """Caption dropout (probability `dropout` of the empty prompt, see `keep_mask`) and, for
    tag-style captions, `tag_shuffle`, `tag_keep_first`, `tag_dropout` (see `augment_tags`)."""

    dropout: float = 0.1
    tag_shuffle: bool = False
    tag_keep_first: int = 0
    tag_dropout: float = 0.0

    def keep(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """(n,) bool: the captions that survive dropout (the one draw of it, see `keep_mask`)."""
        return keep_mask(n, self.dropout, generator, device)

    def augment(self, captions: list[str], generator: torch.Generator | None = None) -> list[str]:
        """The captions with their tags shuffled or dropped, if asked (else as they are)."""
        if not (self.tag_shuffle or self.tag_dropout):
            return captions
        tags = (self.tag_shuffle, self.tag_keep_first, self.tag_dropout)
        return [augment_tags(c, *tags, generator=generator) for c in captions]


def attention_backend(name: str | None):
    """A context choosing PyTorch's attention kernel (flash, efficient, cudnn, math), or none."""
    if name is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kinds = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }
    if name not in kinds:
        raise ValueError(f"attention_backend {name!r}: use one of {sorted(kinds)} or null")
    return sdpa_kernel(kinds[name])


@dataclass(frozen=True)
class Speed:
    """Speed options, each measured in bench/train_vs_diffusers.py: `channels_last` (NHWC U-Net
    convolutions), `compile` (torch.compile of the U-Net for training), `attention_backend`
    (force flash / efficient / cudnn / math; null: PyTorch picks)."""

    channels_last: bool = False
    compile: bool = False
    attention_backend: str | None = None

    def attention(self):
        return attention_backend(self.attention_backend)
