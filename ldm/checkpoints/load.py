"""Any Stable Diffusion 1.x / 2.x / XL checkpoint into our modules: `load_model(path_or_folder)`.

Reads our own files, original single files (`.safetensors`, or `.ckpt` through
`torch.load(weights_only=True)` only) with or without EMA weights, diffusers folders, and a
separate VAE (SD or diffusers names) or open_clip text encoder file. The architecture comes from
the file's `ldm.config` metadata when we wrote it, else from its key names and shapes
(`detect`). Modules are built on the meta device and take the file's tensors as they are
(`assign=True`): memory-mapped, never copied, half precision staying half unless `dtype` says.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ldm.checkpoints import detect, keymaps
from ldm.checkpoints.diffusers import read_folder
from ldm.checkpoints.files import CONFIG_KEY, CheckpointError, parse_config, read
from ldm.checkpoints.layout import PARTS, PREFIXES, check_fit, load_into, part_states, split
from ldm.checkpoints.parts import build, check_model
from ldm.diffusion.prediction import Prediction

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    """The parts of a text-to-image model. `unet(x, t, context)` with x (B, 4, h, w), t (B,),
    context (B, 77, D) = `text_encoder(prompts)`; `vae.encode(images)` / `vae.decode(latents)`."""

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    schedule: object
    prediction: Prediction
    config: dict = field(default_factory=dict)  # part configs, diffusion, image_size
    source: str = ""  # "ldm", "sd" or "diffusers"

    def parts(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}


def assign(
    config: dict, state: dict[str, torch.Tensor], what: str, dtype: torch.dtype | None = None
) -> nn.Module:
    """A module built on the meta device that adopts `state`'s tensors without a copy."""
    with torch.device("meta"):
        module = build(config, what)
    check_fit(module, state, what)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
    for tower in module.modules():  # text towers (one, or SDXL's two)
        if getattr(tower, "attn_mask", None) is not None and tower.attn_mask.is_meta:
            tower.attn_mask = tower.build_causal_mask()  # non-persistent: not in any file
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{what}: tensors not set by the file: {left[:8]}")
    return module


def _named(path, read_part):
    """`read_part(path)`, its errors naming the file they are about (a key the architecture
    detection needs and the file lacks is a `KeyError` there)."""
    name = Path(path).name
    try:
        return read_part(path)
    except CheckpointError as e:
        raise (e if name in str(e) else CheckpointError(f"{name}: {e}")) from None
    except KeyError as e:
        raise CheckpointError(f"{name} lacks {e.args[0]!r}: not a complete checkpoint") from None
    except (IndexError, ValueError, TypeError) as e:
        raise CheckpointError(f"{name}: tensors of unexpected shapes ({e})") from None


def _extra_vae(path: str) -> tuple[dict, dict]:
    """A separate VAE file in SD names (with or without `first_stage_model.`) or diffusers'."""
    state, _ = read(path)
    if any(k.startswith(PREFIXES["vae"]) for k in state):
        state = split(state, "vae")
    elif any(".down_blocks." in k or ".mid_block." in k for k in state):
        state = keymaps.diffusers_vae_to_sd(state)
    state = {k: v for k, v in state.items() if not k.startswith(("loss.", "model_ema."))}
    return state, detect.vae_config(state)


def _extra_text(path: str, conventions: dict | None) -> tuple[dict, dict]:
    """An open_clip checkpoint (a whole CLIP model or its text tower): the text tower's keys."""
    state, _ = read(path)
    if any(k.startswith(PREFIXES["text_encoder"]) for k in state):
        tower = split(state, "text_encoder")
    else:
        keep = (
            "token_embedding.",
            "positional_embedding",
            "transformer.",
            "ln_final.",
            "text_projection",
        )
        tower = {"model." + k: v for k, v in state.items() if k.startswith(keep)}
    return tower, detect.text_config(tower, hf_names=False, conventions=conventions)


def load_model(
    path: str | os.PathLike,
    *,
    prediction: str | None = None,
    use_ema: bool = False,
    vae: str | None = None,
    text_encoder: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    overrides: dict | None = None,
) -> Loaded:
    """Load our file, an SD single file or a diffusers folder into our modules.

    Args:
        prediction: "eps", "v" or "x0" (or an outside name: epsilon, v_prediction, sample),
            overriding what the file says or its name suggests
            (SD 2 768-v and 512 models have the same keys; see `detect.prediction`).
        use_ema: take the U-Net from the file's `model_ema.*` weights.
        vae / text_encoder: a separate VAE file, or open_clip text encoder file, used instead.
        dtype: cast floating-point weights (default: keep the file's, e.g. fp16 stays fp16).
        overrides: per-part config entries that weights cannot tell, e.g.
            {"unet": {"norm_groups": 8}}.
    """
    if prediction is not None:
        prediction = detect.parse_prediction(prediction).value  # checked before anything is read
    if Path(path).is_dir():
        (config, states), source = read_folder(Path(path)), "diffusers"
    else:
        state, meta = read(path)
        meta = {**detect.markers(state), **meta}
        states = part_states(state, use_ema)
        if CONFIG_KEY in meta:
            config, source = parse_config(meta[CONFIG_KEY], Path(path).name), "ldm"
        else:
            detected = _named(path, lambda p: detect.sd_config(states, Path(p), meta, prediction))
            config, source = detected, "sd"
    config = check_model(config, Path(path).name)  # before anything is built from it
    if prediction is not None:
        config["diffusion"]["prediction"] = prediction
    if vae is not None:
        states["vae"], config["vae"] = _named(vae, _extra_vae)
    if text_encoder is not None:
        states["text_encoder"], config["text_encoder"] = _named(
            text_encoder, lambda p: _extra_text(p, config.get("text_encoder"))
        )
    for name, entries in (overrides or {}).items():
        config[name] = {**config[name], **entries}
    parts = {}
    for name in PARTS:
        if not states.get(name) or not config.get(name):
            flag = {
                "unet": "",
                "vae": " (pass vae=FILE)",
                "text_encoder": " (pass text_encoder=FILE)",
            }[name]
            raise CheckpointError(f"{Path(path).name} holds no {name} weights{flag}")
        what = f"{Path(path).name} ({name})"
        parts[name] = assign(config[name], states[name], what, dtype).to(device).eval()
    schedule = build(config["diffusion"]["schedule"], f"{Path(path).name} (schedule)")
    pred = detect.parse_prediction(config["diffusion"]["prediction"])
    try:
        pred.check_schedule(float(schedule.alphas_cumprod[-1]))
    except ValueError as e:
        raise CheckpointError(f"{Path(path).name}: {e}") from None
    return Loaded(
        parts["unet"], parts["vae"], parts["text_encoder"], schedule, pred, config, source
    )


def load_weights(
    parts: dict[str, nn.Module], path: str | os.PathLike, use_ema: bool = False
) -> None:
    """Copy a checkpoint's weights into existing modules (train.py's `init=`), strictly: each
    part must fit the file, else the error lists missing, unexpected and mis-shaped keys."""
    states = (
        read_folder(Path(path))[1] if Path(path).is_dir() else part_states(read(path)[0], use_ema)
    )
    for name, module in parts.items():
        if not states.get(name):
            raise CheckpointError(f"{Path(path).name} holds no {name} weights")
        load_into(module, states[name], what=f"{name} ({Path(path).name})")
