"""Any Stable Diffusion 1.x / 2.x checkpoint into our modules: `load_model(path_or_folder)`.

Reads our own files, original single files (`.safetensors`, or `.ckpt` through
`torch.load(weights_only=True)` only) with or without EMA weights, diffusers folders, and a
separate VAE (SD or diffusers names) or open_clip text encoder file. The architecture comes from
the file's `ldm.config` metadata when we wrote it, else from its key names and shapes
(`ldm.detect`). Modules are built on the meta device and take the file's tensors as they are
(`assign=True`): memory-mapped, never copied, half precision staying half unless `dtype` says.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ldm import checkpoint, detect, keymaps
from ldm.checkpoint import CheckpointError

log = logging.getLogger(__name__)
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
PARTS = ("unet", "vae", "text_encoder")


@dataclass
class Loaded:
    """The parts of a text-to-image model. `unet(x, t, context)` with x (B, 4, h, w), t (B,),
    context (B, 77, D) = `text_encoder(prompts)`; `vae.encode(images)` / `vae.decode(latents)`."""
    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    schedule: object
    prediction: str
    config: dict = field(default_factory=dict)  # part configs, diffusion, image_size
    source: str = ""  # "ldm", "sd" or "diffusers"

    def parts(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}


def read_any(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (memory-mapped) and metadata of a `.safetensors` or weights-only torch file."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; pass ckpt=PATH to a "
                              f".safetensors or .ckpt file, or to a diffusers folder")
    if p.suffix in TORCH_SUFFIXES:
        return _read_torch(p), {}
    if p.suffix != ".safetensors":
        raise CheckpointError(f"{p.name}: expected .safetensors, {', '.join(TORCH_SUFFIXES)} or a folder")
    return checkpoint.read(p)  # memory-mapped by safetensors


def _read_torch(p: Path) -> dict[str, torch.Tensor]:
    try:  # weights_only: a pickle may run code; tensors and plain containers cannot
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (pre-zip) format cannot be memory-mapped
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{p.name} does not load with torch.load(weights_only=True) ({e}); "
                              f"only tensor files are read, never arbitrary pickles") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning / LDM training checkpoints
    if not isinstance(obj, dict):
        raise CheckpointError(f"{p.name} holds a {type(obj).__name__}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def build(config: dict) -> nn.Module:
    """`_target_(**kwargs)` for a flat part config, on the current default device."""
    module_name, _, cls = config["_target_"].rpartition(".")
    kwargs = {k: v for k, v in config.items() if k != "_target_"}
    return getattr(importlib.import_module(module_name), cls)(**kwargs)


def assign(config: dict, state: dict[str, torch.Tensor], what: str,
           dtype: torch.dtype | None = None) -> nn.Module:
    """A module built on the meta device that adopts `state`'s tensors without a copy."""
    with torch.device("meta"):
        module = build(config)
    checkpoint.check_fit(module, state, what)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
    tower = getattr(module, "model", None)
    if getattr(tower, "attn_mask", None) is not None and tower.attn_mask.is_meta:
        tower.attn_mask = tower.build_causal_mask()  # a non-persistent buffer: not in any file
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{what}: tensors not set by the file: {left[:8]}")
    return module


def _part_states(state: dict[str, torch.Tensor], use_ema: bool) -> dict[str, dict]:
    parts = {name: checkpoint.split(state, name) for name in PARTS}
    ema = [k for k in state if k.startswith("model_ema.") and k not in ("model_ema.decay", "model_ema.num_updates")]
    if use_ema:
        if not ema:
            raise CheckpointError("use_ema: the file holds no EMA weights (model_ema.*); load without it")
        missing = [k for k in parts["unet"] if keymaps.ldm_ema_key(k) not in state]
        if missing:
            raise CheckpointError(f"EMA weights missing for {len(missing)} U-Net keys: {missing[:8]}")
        parts["unet"] = {k: state[keymaps.ldm_ema_key(k)] for k in parts["unet"]}
    elif ema:
        log.info("the file also holds EMA weights (%d tensors); use_ema=True loads them", len(ema))
    return parts


def _extra_vae(path: str) -> tuple[dict, dict]:
    """A separate VAE file in SD names (with or without `first_stage_model.`) or diffusers'."""
    state, _ = read_any(path)
    if any(k.startswith(checkpoint.PREFIXES["vae"]) for k in state):
        state = checkpoint.split(state, "vae")
    elif any(".down_blocks." in k or ".mid_block." in k for k in state):
        state = keymaps.diffusers_vae_to_sd(state)
    state = {k: v for k, v in state.items() if not k.startswith(("loss.", "model_ema."))}
    return state, detect.vae_config(state)


def _extra_text(path: str, conventions: dict | None) -> tuple[dict, dict]:
    """An open_clip checkpoint (a whole CLIP model or its text tower): the text tower's keys."""
    state, _ = read_any(path)
    if any(k.startswith("cond_stage_model.") for k in state):
        tower = checkpoint.split(state, "text_encoder")
    else:
        keep = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
        tower = {"model." + k: v for k, v in state.items() if k.startswith(keep)}
    return tower, detect.text_config(tower, hf_names=False, conventions=conventions)


def load_model(path: str | os.PathLike, *, prediction: str | None = None, use_ema: bool = False,
               vae: str | None = None, text_encoder: str | None = None,
               dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               overrides: dict | None = None) -> Loaded:
    """Load our file, an SD single file or a diffusers folder into our modules.

    Args:
        prediction: "eps" or "v", overriding what the file says or its name suggests
            (SD 2 768-v and 512 models have the same keys; see `detect.prediction`).
        use_ema: take the U-Net from the file's `model_ema.*` weights.
        vae / text_encoder: a separate VAE file, or open_clip text encoder file, used instead.
        dtype: cast floating-point weights (default: keep the file's, e.g. fp16 stays fp16).
        overrides: per-part config entries that weights cannot tell, e.g.
            {"unet": {"norm_groups": 8}}.
    """
    if Path(path).is_dir():
        from ldm import diffusers_io  # only folders need it
        config, states = diffusers_io.read_folder(Path(path))
        source = "diffusers"
        if prediction is not None:
            config["diffusion"]["prediction"] = prediction
    else:
        state, meta = read_any(path)
        states = _part_states(state, use_ema)
        if checkpoint.CONFIG_KEY in meta:
            config, source = json.loads(meta[checkpoint.CONFIG_KEY]), "ldm"
            if prediction is not None:
                config["diffusion"]["prediction"] = prediction
        else:
            config, source = detect.sd_config(states, Path(path), meta, prediction), "sd"
    if vae is not None:
        states["vae"], config["vae"] = _extra_vae(vae)
    if text_encoder is not None:
        states["text_encoder"], config["text_encoder"] = _extra_text(text_encoder, config.get("text_encoder"))
    for name, entries in (overrides or {}).items():
        config[name] = {**config[name], **entries}
    parts = {}
    for name in PARTS:
        if not states.get(name) or not config.get(name):
            flag = {"unet": "", "vae": " (pass vae=FILE)", "text_encoder": " (pass text_encoder=FILE)"}[name]
            raise CheckpointError(f"{Path(path).name} holds no {name} weights{flag}")
        parts[name] = assign(config[name], states[name], name, dtype).to(device).eval()
    schedule = build(config["diffusion"]["schedule"])
    return Loaded(parts["unet"], parts["vae"], parts["text_encoder"], schedule,
                  config["diffusion"]["prediction"], config, source)


def load_weights(parts: dict[str, nn.Module], path: str | os.PathLike, use_ema: bool = False) -> None:
    """Copy a checkpoint's weights into existing modules (train.py's `init=`), strictly: each
    part must fit the file, else the error lists missing, unexpected and mis-shaped keys."""
    if Path(path).is_dir():
        from ldm import diffusers_io
        _, states = diffusers_io.read_folder(Path(path))
    else:
        states = _part_states(read_any(path)[0], use_ema)
    for name, module in parts.items():
        if not states.get(name):
            raise CheckpointError(f"{Path(path).name} holds no {name} weights")
        checkpoint.load_into(module, states[name], what=f"{name} ({Path(path).name})")
