"""Weights on disk: reading any Stable Diffusion 1.x/2.x checkpoint into our modules and writing
ours for the tools people use.

    files.py             safetensors / weights-only torch files in (a pickle runs nothing),
                         atomic safetensors out
    layout.py            the SD single-file layout: prefixes, parts, EMA keys, strict loading
    keymaps.py           key renames only: diffusers <-> SD (U-Net, VAE), HF CLIP <-> open_clip
    diffusers_configs.py config translations: diffusers / transformers config.json <-> ours
    detect.py            an SD file's architecture and prediction type from its keys, shapes, name
    diffusers.py         diffusers pipeline folders, read (configs checked) and written
    parts.py             the allow-list: the only classes a file's config may have built, and
                         the checks (known arguments, plain types, bounded sizes) it passes first
    load.py              load_model(path or folder) -> our modules; load_weights into existing ones
    export.py            SD single files (+ inference YAML), diffusers folders, a run's weights
                         (what its choice of what trains says it writes)
    lora.py              LoRA files: the kohya and diffusers / PEFT layouts, read and written,
                         their key names and metadata (a new layout is added here)
    lora_networks.py     LoRA files and our models: each layer's canonical name, a file's
                         adapters built and merged into a loaded model, a run's networks written
    embeddings.py        A1111 textual-inversion files
    convert.py           `ldm-convert SRC DST` (or `python -m ldm.checkpoints.convert`)
"""

from ldm.checkpoints.files import CONFIG_KEY, CheckpointError, read, read_config, save_state
from ldm.checkpoints.layout import pretrained, save
from ldm.checkpoints.load import Loaded, load_model, load_weights

__all__ = [
    "CONFIG_KEY",
    "CheckpointError",
    "Loaded",
    "load_model",
    "load_weights",
    "pretrained",
    "read",
    "read_config",
    "save",
    "save_state",
]
