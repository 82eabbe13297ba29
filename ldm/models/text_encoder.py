"""Text encoder: an open_clip text tower returning per-token embeddings for cross-attention.

The tower is open_clip's own `TextTransformer`, kept as `self.model`, so its parameter names are
open_clip's (`model.token_embedding`, `model.transformer.resblocks.*`, `model.ln_final`) and a
Stable Diffusion 2 `cond_stage_model.model.*` checkpoint maps onto it by prefix alone.
"""

from __future__ import annotations

import re

import open_clip
import torch
from open_clip.model import _build_text_tower
from open_clip.tokenizer import SimpleTokenizer
from torch import nn

from ldm.models.placement import Pinnable
from ldm.models.unet import micro_conditioning

# A prompt is cut to CHARS_PER_TOKEN * context_length characters before it is tokenized, so a
# 1 MB caption costs what a long one does (~10 ms, not ~1-3 s), and no realistic prompt's tokens
# change: a token is at most 32 characters of the tokenizer's cleaned text (the longest entry of
# CLIP's vocabulary) plus a space, so the first L tokens come from the first 33 L cleaned
# characters; 4x that leaves room for what the cleaning removes (whitespace runs collapse to one
# space, HTML entities to one character).
CHARS_PER_TOKEN = 4 * 33


def cut_prompt(prompt: str, context_length: int) -> str:
    """`prompt` cut far past where its `context_length` tokens can end (see CHARS_PER_TOKEN)."""
    return prompt[: CHARS_PER_TOKEN * context_length]


def _tower_config(model_name: str | None, text_cfg: dict | None) -> tuple[int, dict, bool]:
    """(embed_dim, text_cfg, quick_gelu) of a named open_clip model, overridden by `text_cfg`."""
    embed_dim, cfg, quick_gelu = 0, {}, False
    if model_name is not None:
        full = open_clip.get_model_config(model_name)
        if full is None:
            raise ValueError(
                f"open_clip knows no model named {model_name!r}; see open_clip.list_models()"
            )
        embed_dim, cfg, quick_gelu = (
            full["embed_dim"],
            dict(full["text_cfg"]),
            full.get("quick_gelu", False),
        )
    cfg.update(text_cfg or {})
    return embed_dim or cfg.get("width", 512), cfg, quick_gelu


class TextEncoder(Pinnable):
    """Prompts -> token embeddings (B, L, D) from the last or penultimate transformer layer.

    Args:
        model_name: an open_clip model name (e.g. "ViT-H-14"), or None for a custom tower.
        text_cfg: open_clip `CLIPTextCfg` fields overriding or defining the tower
            (width, heads, layers, context_length, ...).
        layer: "last" or "penultimate" (SD 2 uses the penultimate layer's output).
        frozen: no gradients and eval mode throughout training.
        train_token_embedding: when not frozen, whether the (vocab x width) token table trains;
            it is most of a small tower's parameters and of its optimizer cost.
        pad_with_eot: pad with the end-of-text token (SD 1.x) instead of zeros (open_clip).
        final_norm: the final LayerNorm on the output (SD 1/2); SDXL reads both towers'
            penultimate hidden states without it.

    `encode_tokens(ids, pooled=True)` also returns the pooled vector: the last layer's
    (normalised) end-of-text token through `text_projection` (SDXL's second tower: the 1280-d
    vector conditioning), whichever layer the per-token output comes from.

    New words (textual inversion, Gal et al., 2022): `add_embedding(token, vectors)` makes
    `token` in a prompt stand for (n, width) vectors of its own, given ids after the vocabulary.
    The tower and its state dict are unchanged: the vectors are held by reference (a trainer
    registers its trainable ones itself), so weights files never carry them.
    """

    def __init__(
        self,
        model_name: str | None = None,
        text_cfg: dict | None = None,
        layer: str = "last",
        frozen: bool = True,
        train_token_embedding: bool = True,
        pad_with_eot: bool = False,
        quick_gelu: bool | None = None,
        final_norm: bool = True,
    ) -> None:
        super().__init__()
        if layer not in ("last", "penultimate"):
            raise ValueError(f"layer must be 'last' or 'penultimate', got {layer!r}")
        embed_dim, cfg, default_quick_gelu = _tower_config(model_name, text_cfg)
        gelu = default_quick_gelu if quick_gelu is None else quick_gelu
        self.model = _build_text_tower(embed_dim, cfg, quick_gelu=gelu)
        self.context_length = self.model.context_length
        self.tokenizer = SimpleTokenizer(context_length=self.context_length)
        self.layer, self.frozen, self.pad_with_eot = layer, frozen, pad_with_eot
        self.final_norm = final_norm
        self.quick_gelu = gelu  # part of the architecture: exporters write it into configs
        self.set_frozen(frozen, train_token_embedding)
        self._words: dict[str, torch.Tensor] = {}  # new word (lower case) -> (n, width) vectors
        self._adapters: list[nn.Module] = []  # LoRA networks hooked into its layers (held outside)

    def set_frozen(self, frozen: bool, train_token_embedding: bool = True) -> None:
        self.frozen = frozen
        self.requires_grad_(not frozen)
        if frozen:
            self.eval()
        elif not train_token_embedding:
            self.model.token_embedding.requires_grad_(False)
        if isinstance(self.model.text_projection, nn.Module | nn.Parameter):
            # The pooled output's projection: unused by the per-token context, and kept at its
            # pretrained value where it makes SDXL's pooled vector (as the neighbours keep it).
            self.model.text_projection.requires_grad_(False)

    @property
    def width(self) -> int:
        return self.model.width

    def train(self, mode: bool = True) -> "TextEncoder":
        return super().train(mode and not self.frozen)  # frozen means eval, always

    # -- textual inversion ---------------------------------------------------------------------
    def add_embedding(self, token: str, vectors: torch.Tensor) -> None:
        """Make `token` (a new word, e.g. "<pastel>") stand for `vectors` (n, width), kept by
        reference (a trainable Parameter stays the one that trains)."""
        if vectors.ndim != 2 or vectors.shape[1] != self.width:
            raise ValueError(
                f"embedding for {token!r} has shape {tuple(vectors.shape)}; this text "
                f"encoder needs (n, {self.width})"
            )
        pieces = self.tokenizer.encode(token)
        if len(pieces) == 1 or token.lower() in self._words:
            raise ValueError(
                f"{token!r} is already a word of the vocabulary (or an embedding): "
                f"choose a new trigger such as <{token.strip('<>')}-style>"
            )
        self._words[token.lower()] = vectors

    def embedding(self, token: str) -> torch.Tensor:
        return self._words[token.lower()]

    def _new_ids(self) -> dict[str, list[int]]:
        """Each new word's placeholder ids (after the vocabulary, in the order added)."""
        out, next_id = {}, self.model.vocab_size
        for word, vectors in self._words.items():
            n = vectors.shape[0]
            out[word] = list(range(next_id, next_id + n))
            next_id += n
        return out

    def _tokenize_with_words(self, prompts: list[str]) -> torch.Tensor:
        new_ids = self._new_ids()
        pattern = re.compile("(" + "|".join(re.escape(w) for w in new_ids) + ")", re.IGNORECASE)
        sot, eot, n = self.tokenizer.sot_token_id, self.tokenizer.eot_token_id, self.context_length
        rows = []
        for prompt in prompts:
            ids = [sot]
            for piece in pattern.split(prompt):
                ids += new_ids.get(piece.lower()) or (self.tokenizer.encode(piece) if piece else [])
            ids = ids[: n - 1] + [eot]  # truncated as open_clip does: the end token kept
            rows.append(ids + [0] * (n - len(ids)))
        return torch.tensor(rows)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        prompts = [cut_prompt(p, self.context_length) for p in prompts]
        if self._words:
            ids = self._tokenize_with_words(prompts)
        else:
            ids = self.tokenizer(prompts, context_length=self.context_length)  # (B, L)
        if self.pad_with_eot:
            eot = self.tokenizer.eot_token_id
            last = (ids == eot).int().argmax(dim=-1, keepdim=True)  # the first EOT
            after = torch.arange(ids.shape[1]).unsqueeze(0) > last
            ids = ids.masked_fill(after, eot)
        return ids

    def encode_tokens(
        self, ids: torch.Tensor, pooled: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, L) -> embeddings (B, L, width); with `pooled`, (embeddings, the pooled
        vector (B, projection width))."""
        m = self.model
        x = self._embed(ids) + m.positional_embedding[: ids.shape[1]]  # (B, L, D)
        mask = (
            m.attn_mask[: ids.shape[1], : ids.shape[1]].to(x.dtype)
            if m.attn_mask is not None
            else None
        )
        blocks = m.transformer.resblocks
        depth = len(blocks) - (1 if self.layer == "penultimate" else 0)
        for block in blocks[:depth]:
            x = block(x, attn_mask=mask)
        context = m.ln_final(x) if self.final_norm else x
        if not pooled:
            return context
        for block in blocks[depth:]:
            x = block(x, attn_mask=mask)
        first_eot = (ids == self.tokenizer.eot_token_id).int().argmax(dim=-1)  # (B,)
        return context, self.project(m.ln_final(x)[torch.arange(ids.shape[0]), first_eot])

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(B, width) -> (B, projection width) through open_clip's `text_projection`: a (width,
        dim) matrix applied as x @ P (a transformers `text_projection.weight` is its transpose,
        `ldm.checkpoints.keymaps`), a Linear, or none."""
        proj = self.model.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Module) else x @ proj

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, L, D); ids past the vocabulary are the new words' vectors."""
        table = self.model.token_embedding
        vocab = self.model.vocab_size
        if not self._words:
            return table(ids)
        extra = torch.cat(list(self._words.values())).to(table.weight)
        known = table(ids.clamp(max=vocab - 1))
        new = extra[(ids - vocab).clamp(min=0, max=extra.shape[0] - 1)]
        return torch.where((ids >= vocab)[..., None], new, known)

    def add_adapters(self, network: nn.Module) -> None:
        """Count `network` (LoRA adapters attached to this tower's layers, held by the training
        module) in `trains`: a frozen tower then runs with gradients, for its adapters' sake."""
        self._adapters.append(network)

    @property
    def trains(self) -> bool:
        """Whether its output can change in training: the tower's weights, a new word's vectors
        or its adapters (both held outside its state dict) require grad."""
        held = [p for a in self._adapters for p in a.parameters()]
        return any(p.requires_grad for p in [*self.parameters(), *self._words.values(), *held])

    def forward(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenize(prompts).to(self.model.positional_embedding.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trains):
            return self.encode_tokens(ids)

    def condition(
        self, prompts: list[str], time_ids: torch.Tensor | None = None, drop=None
    ) -> torch.Tensor:
        """The U-Net's condition for `prompts`: their context; prompts where `drop` (B,) is
        true read as the empty prompt (SD 1/2's unconditional input). `time_ids` are SDXL's
        and ignored here."""
        if drop is not None:
            prompts = ["" if d else p for p, d in zip(prompts, drop)]
        return self(list(prompts))


class DualTextEncoder(Pinnable):
    """SDXL's text conditioning: two `TextEncoder` towers read the same prompt; their per-token
    outputs are concatenated (CLIP ViT-L 768 + OpenCLIP bigG 1280 = 2048) and the last tower's
    pooled vector is the U-Net's vector conditioning, with the micro-conditioning
    (`ldm.models.unet.micro_conditioning`). Parameter names `embedders.N.model.*`, as an SDXL
    single file's `conditioner.embedders.N`. `frozen` / `train_token_embedding`, where given,
    set every tower's (`text_encoder.frozen=false` trains both, as it trains SD's one)."""

    def __init__(
        self,
        embedders: list[TextEncoder],
        frozen: bool | None = None,
        train_token_embedding: bool = True,
    ) -> None:
        super().__init__()
        lengths = {e.context_length for e in embedders}
        if len(embedders) < 2 or len(lengths) != 1:
            raise ValueError(
                f"a DualTextEncoder needs two or more towers of one context length, got "
                f"{len(embedders)} of lengths {sorted(lengths)}"
            )
        self.embedders = nn.ModuleList(embedders)
        self.context_length = lengths.pop()
        if frozen is not None:
            for e in embedders:
                e.set_frozen(frozen, train_token_embedding)

    @property
    def width(self) -> int:
        return sum(e.width for e in self.embedders)

    def add_adapters(self, network: nn.Module) -> None:
        for e in self.embedders:  # one network adapts both towers (adapt_text_encoder)
            e.add_adapters(network)

    @property
    def trains(self) -> bool:
        return any(e.trains for e in self.embedders)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (B, L, sum of widths), pooled (B, the last tower's projection width))."""
        contexts = []
        for e in self.embedders[:-1]:
            contexts.append(e(prompts))
        last = self.embedders[-1]
        ids = last.tokenize(prompts).to(last.model.positional_embedding.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and last.trains):
            context, pooled = last.encode_tokens(ids, pooled=True)
        return torch.cat([*contexts, context], dim=-1), pooled

    def forward(self, prompts: list[str]) -> torch.Tensor:
        return self.encode(prompts)[0]

    def condition(
        self, prompts: list[str], time_ids: torch.Tensor, drop=None
    ) -> dict[str, torch.Tensor]:
        """The SDXL U-Net's condition: {"context": (B, L, width), "y": (B, pooled + 6 x 256)},
        y being the pooled vector and the Fourier-embedded `time_ids` (B, 6): original (height,
        width), crop (top, left), target (height, width), in pixels. Where `drop` (B,) is true,
        context and pooled vector are zeros (how SDXL was trained unconditionally, and how it
        samples an empty negative prompt), the micro-conditioning kept."""
        context, pooled = self.encode(list(prompts))
        if drop is not None:
            keep = ~torch.as_tensor(drop, dtype=torch.bool, device=context.device)
            context = torch.where(keep[:, None, None], context, 0.0)
            pooled = torch.where(keep[:, None], pooled, 0.0)
        micro = micro_conditioning(time_ids.to(pooled.device)).to(pooled.dtype)
        return {"context": context, "y": torch.cat([pooled, micro], dim=1)}
