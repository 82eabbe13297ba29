"""What a diffusion run trains, one choice (configs/model/trains/): the whole U-Net (`Full`),
LoRA / LoCon adapters (`LoRA`), or a new word's vectors (`TextualInversion`).

`LatentDiffusion` asks its choice what to freeze, which adapters to build, whether it keeps an
EMA of the U-Net, and the text encoder's own learning rate. The VAE is always frozen; a text
encoder whose config says `frozen: true` stays frozen whatever the choice."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Protocol

import torch
from torch import nn

from ldm.models.lora import LoRANetwork
from ldm.models.text_encoder import TextEncoder

Adapter = Callable[[nn.Module], LoRANetwork]  # a configs/lora_preset preset (a partial)


class Trains(Protocol):
    keeps_ema: bool  # whether the module keeps an EMA of the U-Net (adapters do not)
    text_lr: float | None  # the text encoder's (or its adapters') own learning rate
    word: str | None  # textual inversion's new word
    writes: str  # what the run exports (ldm.checkpoints.export): weights, lora or embedding

    def freeze(self, unet: nn.Module, text_encoder: TextEncoder) -> None: ...

    def adapters(
        self, unet: nn.Module, text_encoder: TextEncoder
    ) -> tuple[LoRANetwork | None, LoRANetwork | None]: ...


@dataclass(frozen=True)
class Full:
    """The whole U-Net trains, with an EMA, and the text encoder unless its config freezes it
    (`text_lr`: its own learning rate; null: the optimizer's)."""

    text_lr: float | None = None
    keeps_ema: ClassVar[bool] = True
    word: ClassVar[None] = None
    writes: ClassVar[str] = "weights"  # the EMA U-Net, VAE and text encoder, SD layout

    def freeze(self, unet: nn.Module, text_encoder: TextEncoder) -> None:
        pass

    def adapters(self, unet: nn.Module, text_encoder: TextEncoder) -> tuple[None, None]:
        return None, None


@dataclass(frozen=True)
class LoRA:
    """Adapters on the U-Net (`unet`) and / or the text encoder (`text_encoder`), each a
    configs/lora_preset preset or null; the adapted models are frozen and only the adapters
    train, without an EMA (`text_lr`: the text encoder's adapters' own learning rate)."""

    unet: Adapter | None = None
    text_encoder: Adapter | None = None
    text_lr: float | None = None
    keeps_ema: ClassVar[bool] = False
    word: ClassVar[None] = None
    writes: ClassVar[str] = "lora"  # the adapters, kohya layout

    def freeze(self, unet: nn.Module, text_encoder: TextEncoder) -> None:
        unet.requires_grad_(False)
        text_encoder.requires_grad_(False)

    def adapters(
        self, unet: nn.Module, text_encoder: TextEncoder
    ) -> tuple[LoRANetwork | None, LoRANetwork | None]:
        # built in this order (U-Net first): their initialisation draws from the global RNG
        on_unet = self.unet(unet).attach() if self.unet is not None else None
        on_text = None
        if self.text_encoder is not None:
            on_text = self.text_encoder(text_encoder).attach()
            text_encoder.add_adapters(on_text)  # the frozen tower now runs with gradients
        return on_unet, on_text


@dataclass(frozen=True)
class TextualInversion:
    """A new `word` (e.g. "<pastel>") of `vectors` vectors, started from the mean token
    embedding of `init`; only they train (U-Net and text encoder frozen, no EMA)."""

    word: str
    vectors: int = 1
    init: str = "*"
    keeps_ema: ClassVar[bool] = False
    text_lr: ClassVar[None] = None
    writes: ClassVar[str] = "embedding"  # the word's vectors, A1111's format

    def freeze(self, unet: nn.Module, text_encoder: TextEncoder) -> None:
        unet.requires_grad_(False)
        text_encoder.requires_grad_(False)

    def adapters(self, unet: nn.Module, text_encoder: TextEncoder) -> tuple[None, None]:
        return None, None

    @torch.no_grad()
    def start(self, text_encoder: TextEncoder) -> torch.Tensor:
        """(vectors, width): the mean token embedding of `init`, `vectors` times."""
        ids = torch.tensor(text_encoder.tokenizer.encode(self.init) or [0])
        return text_encoder.model.token_embedding(ids).mean(0).repeat(self.vectors, 1)
