"""Low-rank adapters (LoRA, Hu et al., 2021) on a frozen model's Linear and Conv2d layers, and on
convolutions too (LoCon): W x + (alpha / rank) * up(down(x)), `up` zero-initialised so that a fresh
adapter changes nothing.

The adapted model is left as it is: its weights, its key names and its state dict do not change.
A `LoRANetwork` holds the adapters, keyed by the adapted layers' paths in the model, and applies
them with forward hooks (`attach`) or merges them into the weights (`merge`). The adapters may be
float32 while the frozen base is bf16/fp16: inputs are cast to the adapter's dtype and the delta
back to the layer's.

Open_clip's attention (`nn.MultiheadAttention`) computes its q/k/v and output projections from
its weight tensors, not through modules a hook could see; there the adapters' weight deltas are
added to those tensors for the attention's own forward (`attach` wraps the instance's forward).

Given adapter tensors ({"down", "up", "alpha"} each, a LoRA file's) are put into networks here
too (`networks_from`, each adapter placed on a layer by the caller, and checked to fit it before
anything is allocated), and taken back out of them (`adapter_tensors`); the names files give
adapters, and the files themselves, are `ldm.checkpoints.lora`'s.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

PROJECTIONS = ("q", "k", "v", "out")  # the adapted projections of an attention, in their order


class LoRAModule(nn.Module):
    """The low-rank delta of one Linear or Conv2d layer: scale * up(down(x)), scale = alpha / rank.

    For a k x k convolution, `down` is a k x k convolution with the layer's stride, padding and
    dilation into `rank` channels and `up` a 1x1 convolution (kohya's LoCon layout). Dropout
    applies to the input, rank dropout to the `rank` channels (rescaled), module dropout skips
    the whole adapter for a training step; all three only in training.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        rank: int,
        alpha: float,
        conv: dict | None = None,
        dropout: float = 0.0,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_rank_alpha(rank, alpha)
        if conv is not None:  # kernel_size, stride, padding, dilation of the adapted convolution
            self.lora_down = nn.Conv2d(in_dim, rank, bias=False, device=device, **conv)
            self.lora_up = nn.Conv2d(rank, out_dim, 1, bias=False, device=device)
        else:
            self.lora_down = nn.Linear(in_dim, rank, bias=False, device=device)
            self.lora_up = nn.Linear(rank, out_dim, bias=False, device=device)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)  # a fresh adapter adds exactly zero
        self.register_buffer("alpha", torch.tensor(float(alpha), device=device))  # kohya saves it
        self.rank, self.multiplier = rank, 1.0
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout

    @classmethod
    def of(cls, layer: nn.Module, rank: int, alpha: float, **dropouts) -> LoRAModule:
        """The adapter of a Linear or (ungrouped) Conv2d layer, on its device."""
        device = layer.weight.device
        if isinstance(layer, nn.Conv2d):
            if layer.groups != 1:
                raise ValueError("LoRA on grouped convolutions is not supported")
            conv = dict(
                kernel_size=layer.kernel_size,
                stride=layer.stride,
                padding=layer.padding,
                dilation=layer.dilation,
            )
            return cls(
                layer.in_channels, layer.out_channels, rank, alpha, conv, device=device, **dropouts
            )
        if isinstance(layer, nn.Linear):
            return cls(
                layer.in_features, layer.out_features, rank, alpha, device=device, **dropouts
            )
        raise TypeError(f"LoRA adapts Linear and Conv2d layers, not {type(layer).__name__}")

    @property
    def scale(self) -> float:
        """alpha / rank, times the multiplier a user sets at inference (`lora_scale`)."""
        return float(self.alpha) / self.rank * self.multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The delta to add to the layer's output for its input x."""
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return torch.zeros((), dtype=x.dtype, device=x.device)
        h = self.lora_down(F.dropout(x, self.dropout, self.training) if self.dropout else x)
        if self.training and self.rank_dropout:
            dim = 1 if h.ndim == 4 else -1  # conv: (B, r, H, W); linear: (..., r)
            shape = [1] * h.ndim
            shape[dim], shape[0] = self.rank, h.shape[0]
            keep = (torch.rand(shape, device=h.device) >= self.rank_dropout).to(h.dtype)
            h = h * keep / (1 - self.rank_dropout)
        return self.lora_up(h) * self.scale

    def weight_delta(self) -> torch.Tensor:
        """scale * up @ down, in the layer's weight layout ((out, in) or (out, in, k, k))."""
        up = self.lora_up.weight.flatten(1)  # (out, r)
        down = self.lora_down.weight  # (r, in) or (r, in, k, k)
        return (up @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) * self.scale


def check_rank_alpha(rank: int, alpha: float) -> None:
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not alpha or alpha <= 0:
        raise ValueError(f"LoRA alpha must be positive, got {alpha!r} (scale = alpha / rank)")


class _AttentionLoRA(nn.Module):
    """Adapters of one `nn.MultiheadAttention`: q, k, v (its packed input projection) and out."""

    def __init__(self, attn: nn.MultiheadAttention, rank: int | dict, alpha: float | dict) -> None:
        """`rank` and `alpha`: one for all four projections, or a dict by q / k / v / out."""
        super().__init__()
        if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
            raise ValueError("LoRA supports plain self-attention (open_clip's text blocks) only")
        d, device = attn.embed_dim, attn.in_proj_weight.device
        ranks = rank if isinstance(rank, dict) else dict.fromkeys(PROJECTIONS, rank)
        alphas = alpha if isinstance(alpha, dict) else dict.fromkeys(PROJECTIONS, alpha)
        for part in PROJECTIONS:
            setattr(self, part, LoRAModule(d, d, ranks[part], alphas[part], device=device))

    def is_zero(self) -> bool:
        """True for fresh adapters (every `up` zero): their attention is exactly the base's,
        which the substituted-weight path only matches to rounding (other kernels)."""
        return not any(m.lora_up.weight.any() for m in (self.q, self.k, self.v, self.out))

    @property
    def trains(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def deltas(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(delta of in_proj_weight (3d, d), delta of out_proj.weight (d, d))."""
        qkv = torch.cat([self.q.weight_delta(), self.k.weight_delta(), self.v.weight_delta()])
        return qkv, self.out.weight_delta()


def _lora_attention_forward(attn: nn.MultiheadAttention, lora: _AttentionLoRA):
    """A forward for `attn`: its own forward, run (through `functional_call`) with its weights
    plus the adapters' deltas, so that a zero delta gives exactly the unadapted result."""
    inside = []

    def forward(*args, **kwargs):
        # the class's own forward: inside the call below (weights swapped), or for fresh
        # adapters where nothing needs their gradient (a fresh adapter that trains must be in
        # the graph: its up weights' gradient is what moves it off zero)
        fresh = lora.is_zero() and not (torch.is_grad_enabled() and lora.trains)
        if inside or fresh:
            return type(attn).forward(attn, *args, **kwargs)
        d_in, d_out = lora.deltas()
        weights = {
            "in_proj_weight": attn.in_proj_weight + d_in.to(attn.in_proj_weight.dtype),
            "out_proj.weight": attn.out_proj.weight + d_out.to(attn.out_proj.weight.dtype),
        }
        inside.append(True)
        try:
            return torch.func.functional_call(attn, weights, args, kwargs)
        finally:
            inside.clear()

    return forward


class LoRANetwork(nn.Module):
    """Adapters for named layers of a model (paths as `model.named_modules()` gives them).

    `layers` maps each path to its Linear / Conv2d / MultiheadAttention, `adapters` each path to
    its `LoRAModule` (an `_AttentionLoRA` for attention). `create` makes fresh ones.
    """

    def __init__(self, layers: dict[str, nn.Module], adapters: dict[str, nn.Module]) -> None:
        super().__init__()
        if not layers:
            raise ValueError("no layer to adapt: the target patterns matched nothing")
        self.paths = list(layers)
        self.adapters = nn.ModuleDict({key_of(p): adapters[p] for p in self.paths})
        self._layers, self._handles = dict(layers), []

    @classmethod
    def create(
        cls,
        layers: dict[str, nn.Module],
        rank: int,
        alpha: float,
        conv_rank: int | None = None,
        conv_alpha: float | None = None,
        dropout: float = 0.0,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
    ) -> LoRANetwork:
        """Fresh adapters: Linear layers and 1x1 convolutions get rank `rank` and `alpha`, larger
        convolutions `conv_rank` and `conv_alpha` (LoCon), attention modules an adapter for each
        of q, k, v and out."""
        dropouts = dict(dropout=dropout, rank_dropout=rank_dropout, module_dropout=module_dropout)
        adapters = {}
        for path, layer in layers.items():
            if isinstance(layer, nn.MultiheadAttention):
                adapters[path] = _AttentionLoRA(layer, rank, alpha)
            elif isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1):
                if conv_rank is None:
                    raise ValueError(
                        f"{path} is a {layer.kernel_size} convolution but conv_rank is not set"
                    )
                c_alpha = conv_alpha if conv_alpha is not None else conv_rank
                adapters[path] = LoRAModule.of(layer, conv_rank, c_alpha, **dropouts)
            else:
                adapters[path] = LoRAModule.of(layer, rank, alpha, **dropouts)
        return cls(layers, adapters)

    def __getitem__(self, path: str) -> nn.Module:
        return self.adapters[key_of(path)]

    def items(self) -> Iterable[tuple[str, nn.Module]]:
        return ((p, self.adapters[key_of(p)]) for p in self.paths)

    def set_multiplier(self, multiplier: float) -> None:
        """Scale every adapter's delta (the `lora_scale` of sampling)."""
        for m in self.modules():
            if isinstance(m, LoRAModule):
                m.multiplier = multiplier

    # -- applying --------------------------------------------------------------------------
    def attach(self) -> LoRANetwork:
        """Apply the adapters to their layers' outputs from now on (until `detach`)."""
        if self._handles:
            return self
        for path, adapter in self.items():
            layer = self._layers[path]
            if isinstance(adapter, _AttentionLoRA):
                layer.forward = _lora_attention_forward(layer, adapter)
                self._handles.append(_Unpatch(layer))
            else:
                self._handles.append(layer.register_forward_hook(_add_delta(adapter)))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @torch.no_grad()
    def merge(self) -> None:
        """Add every adapter's weight delta into its layer (and stop applying it by hook)."""
        self.detach()
        for path, adapter in self.items():
            layer = self._layers[path]
            if isinstance(adapter, _AttentionLoRA):
                d_in, d_out = adapter.deltas()
                layer.in_proj_weight.add_(d_in.to(layer.in_proj_weight.dtype))
                layer.out_proj.weight.add_(d_out.to(layer.out_proj.weight.dtype))
            else:
                layer.weight.add_(adapter.weight_delta().to(layer.weight.dtype))


def key_of(path: str) -> str:
    """A module path as a ModuleDict key (which may not hold dots)."""
    return path.replace(".", "__")


def _add_delta(adapter: LoRAModule):
    def hook(layer, inputs, output):
        x = inputs[0]
        return output + adapter(x.to(adapter.lora_down.weight.dtype)).to(output.dtype)

    return hook


class _Unpatch:
    """Removes an instance-level forward, like a hook handle's `remove`."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)


def select_layers(
    model: nn.Module,
    include: list[str],
    exclude: Iterable[str] = (),
    kinds: tuple[type, ...] = (nn.Linear, nn.Conv2d),
) -> dict[str, nn.Module]:
    """Layers of `model` of the given kinds whose paths match one of the `include` regular
    expressions (searched anywhere in the path) and none of `exclude`, in model order."""
    inc = [re.compile(p) for p in include]
    exc = [re.compile(p) for p in exclude]
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, kinds)
        and any(p.search(name) for p in inc)
        and not any(p.search(name) for p in exc)
    }


def adapt(
    model: nn.Module,
    include: list[str],
    exclude: Iterable[str] = (),
    rank: int = 4,
    alpha: float = 1.0,
    conv_rank: int | None = None,
    conv_alpha: float | None = None,
    dropout: float = 0.0,
    rank_dropout: float = 0.0,
    module_dropout: float = 0.0,
) -> LoRANetwork:
    """Fresh adapters on the Linear and Conv2d layers of `model` that `include` selects (a
    LoRA preset: configs/lora_preset/*.yaml); k x k convolutions need `conv_rank`."""
    return LoRANetwork.create(
        select_layers(model, include, exclude),
        rank,
        alpha,
        conv_rank,
        conv_alpha,
        dropout,
        rank_dropout,
        module_dropout,
    )


def adapt_text_encoder(
    encoder: nn.Module, rank: int = 4, alpha: float = 1.0, dropout: float = 0.0
) -> LoRANetwork:
    """Fresh adapters on every attention (q, k, v, out) and MLP layer of the text tower's blocks
    that its output uses, as kohya's `lora_te_*` adapters of a CLIP text model; on both towers
    of an SDXL `DualTextEncoder` (paths under `embedders.N.`: kohya's `lora_te1_*` and
    `lora_te2_*`). A penultimate-layer tower's last block is left alone, as nothing reads it,
    except in the tower whose pooled vector conditions the U-Net (a DualTextEncoder's last)."""
    towers = getattr(encoder, "embedders", None)
    if towers is None:
        parts = [("", encoder, False)]
    else:
        parts = [(f"embedders.{i}.", t, i == len(towers) - 1) for i, t in enumerate(towers)]
    patterns = []
    for prefix, tower, pooled in parts:
        blocks = len(tower.model.transformer.resblocks)
        penultimate = getattr(tower, "layer", "last") == "penultimate" and not pooled
        used = "|".join(map(str, range(blocks - (1 if penultimate else 0))))
        patterns.append(
            rf"^{re.escape(prefix)}model\.transformer\.resblocks\.({used})\."
            r"(attn|mlp\.c_fc|mlp\.c_proj)$"
        )
    layers = select_layers(encoder, patterns, kinds=(nn.Linear, nn.MultiheadAttention))
    return LoRANetwork.create(layers, rank, alpha, dropout=dropout)


# --------------------------------------------------------------------------------------------
# given adapter tensors <-> networks

Tensors = dict[str, torch.Tensor]  # one adapter: {"down", "up", "alpha"}
# where a named adapter goes: (component, layer path, layer, attention projection or None)
Place = tuple[str, str, nn.Module, str | None]


def networks_from(
    adapters: Mapping[str, Tensors], places: Mapping[str, Place]
) -> dict[str, LoRANetwork]:
    """LoRA networks by component (those the adapters reach) holding the adapters' weights, each
    adapter on the layer (and projection) `places` gives its name. An adapter with no place, or
    whose shapes do not fit its layer, is a ValueError naming it: nothing is dropped."""
    unknown = sorted(n for n in adapters if n not in places)
    if unknown:
        raise ValueError(
            f"{len(unknown)} adapter(s) fit no layer of this model "
            f"(a LoRA for another architecture?): {', '.join(unknown[:5])}"
        )
    grouped: dict[str, dict[str, dict]] = {}
    for name, tensors in adapters.items():
        component, path, _, _ = places[name]
        grouped.setdefault(component, {}).setdefault(path, {})[name] = tensors
    networks = {}
    for component, by_path in grouped.items():
        layers = {p: places[next(iter(named))][2] for p, named in by_path.items()}
        modules = {p: _module_for(layers[p], named, places) for p, named in by_path.items()}
        networks[component] = LoRANetwork(layers, modules)
    return networks


def _module_for(layer: nn.Module, named: dict[str, Tensors], places: Mapping[str, Place]):
    """The adapter module of one layer holding the given tensors; they are checked against the
    layer first, so that nothing is allocated for a shape the layer cannot take."""
    for name, tensors in named.items():
        _check_fit(layer, tensors, name)
    if isinstance(layer, nn.MultiheadAttention):
        parts: dict[str, Tensors | None] = dict.fromkeys(PROJECTIONS)
        for name, tensors in named.items():
            parts[places[name][3]] = tensors
        present = next(p for p in parts.values() if p is not None)
        rank = {k: (p or present)["down"].shape[0] for k, p in parts.items()}
        alpha = {k: float((p or present)["alpha"]) for k, p in parts.items()}
        module = _AttentionLoRA(layer, rank, alpha)
        for part, tensors in parts.items():
            sub = getattr(module, part)
            if tensors is None:  # a projection the file leaves alone: a zero adapter
                nn.init.zeros_(sub.lora_up.weight)
            else:
                _load(sub, tensors)
        return module
    if len(named) > 1:  # e.g. one layer named by its SD and by its diffusers path
        raise ValueError(f"{' and '.join(sorted(named))} are adapters of one layer")
    ((name, tensors),) = named.items()
    rank = tensors["down"].shape[0]
    module = LoRAModule.of(layer, rank, float(tensors["alpha"]))
    _load(module, tensors)
    return module


def adapter_shapes(layer: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The (down, up) weight shapes of a rank-`rank` adapter of `layer` (LoRAModule's)."""
    if isinstance(layer, nn.MultiheadAttention):
        return (rank, layer.embed_dim), (layer.embed_dim, rank)
    if isinstance(layer, nn.Conv2d):
        return (rank, layer.in_channels, *layer.kernel_size), (layer.out_channels, rank, 1, 1)
    return (rank, layer.in_features), (layer.out_features, rank)


def _check_fit(layer: nn.Module, tensors: Tensors, name: str) -> None:
    """Given tensors fit the adapter of `layer` at their rank: the same leading two sizes and as
    many elements (a 1x1 convolution's may come as a matrix)."""
    shapes = adapter_shapes(layer, tensors["down"].shape[0])
    for part, shape in zip(("down", "up"), shapes):
        t = tensors[part]
        if t.numel() != math.prod(shape) or t.shape[:2] != shape[:2]:
            raise ValueError(
                f"{name}.{part} has shape {tuple(t.shape)} but the "
                f"layer needs {shape}: a LoRA for another model"
            )


def _load(module: LoRAModule, tensors: Tensors) -> None:
    with torch.no_grad():
        for part, param in (("down", module.lora_down.weight), ("up", module.lora_up.weight)):
            param.copy_(tensors[part].reshape(param.shape))
    module.alpha.fill_(float(tensors["alpha"]))


def adapter_tensors(network: LoRANetwork) -> Iterator[tuple[str, str | None, Tensors]]:
    """(layer path, attention projection or None, tensors) of every adapter of a network, in its
    order (an attention's projections in PROJECTIONS order)."""
    for path, adapter in network.items():
        if isinstance(adapter, _AttentionLoRA):
            for part in PROJECTIONS:
                yield path, part, _tensors(getattr(adapter, part))
        else:
            yield path, None, _tensors(adapter)


def _tensors(m: LoRAModule) -> Tensors:
    return {
        "down": m.lora_down.weight.detach(),
        "up": m.lora_up.weight.detach(),
        "alpha": m.alpha.detach().clone(),
    }
