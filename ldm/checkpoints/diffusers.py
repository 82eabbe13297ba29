"""diffusers pipeline folders (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`,
`scheduler/`) read into and written from our modules, without importing diffusers.

The text encoder of such a folder is a transformers `CLIPTextModel`. SD 2 folders keep only 23 of
OpenCLIP ViT-H's 24 blocks (their output *is* the penultimate layer): read, it becomes our 24-block
penultimate-layer tower whose unused last block and projection are zeros (logged); written, the
last block is left out again, so a folder round trip is exact.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ldm.checkpoints import keymaps
from ldm.checkpoints.diffusers_configs import (
    DIFFUSERS_VERSION,
    diffusers_unet_config,
    diffusers_vae_config,
    diffusion_from_scheduler,
    hf_projection_text_config,
    hf_text_config,
    scheduler_config,
    sdxl_tower_config,
    text_config_from_hf,
    unet_config_from_diffusers,
    vae_config_from_diffusers,
)
from ldm.checkpoints.files import CheckpointError, read, save_state
from ldm.checkpoints.parts import check_model
from ldm.fileio import write_text

log = logging.getLogger(__name__)
WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return read(folder / name)[0]
    raise CheckpointError(f"{folder}: no weights file (one of {', '.join(WEIGHT_NAMES)})")


MAX_JSON_BYTES = 1 << 20  # a config.json is a few KB; a bigger one is not a config


def _json(path: Path) -> dict:
    """A folder's config file as a JSON object, or a `CheckpointError` naming the file."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: not a diffusers pipeline folder")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: {path.stat().st_size} bytes is too big for a config")
    try:
        value = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


def _translated(path: Path, translate, *args) -> dict:
    """`translate(config file, *args)`, its missing or mistyped entries named with the file."""
    try:
        return translate(_json(path), *args)
    except KeyError as e:
        raise CheckpointError(f"{path} has no {e.args[0]!r} entry") from None
    except (TypeError, ValueError, ZeroDivisionError, IndexError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def _text_state(folder: Path, cfg: dict, sd2: bool) -> dict[str, torch.Tensor]:
    tower = keymaps.hf_clip_to_open_clip(_weights(folder))
    if sd2:  # the block and projection a penultimate-layer output never uses: zeros
        n, width = cfg["num_hidden_layers"], cfg["hidden_size"]
        block = {
            k.replace(".0.", f".{n}.", 1): torch.zeros_like(v)
            for k, v in tower.items()
            if k.startswith("transformer.resblocks.0.")
        }
        tower.update(block)
        tower["text_projection"] = torch.zeros(width, width, dtype=tower["ln_final.weight"].dtype)
        log.warning(
            "%s: SD 2 CLIPTextModel (%d blocks): block %d and the projection, which the "
            "penultimate-layer output never uses, are set to zeros",
            folder,
            n,
            n,
        )
    return {"model." + k: v for k, v in tower.items()}


SDXL_TOWERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))


def _pads_with_eot(tokenizer: Path, default: bool) -> bool:
    """Whether a tokenizer folder pads with the end-of-text token (else with "!", id 0: zeros
    in open_clip's terms), from its special_tokens_map.json; `default` without one."""
    path = tokenizer / "special_tokens_map.json"
    if not path.is_file():
        return default
    pad = _json(path).get("pad_token", "<|endoftext|>" if default else "!")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    return pad == "<|endoftext|>"


def _text_encoder(folder: Path) -> tuple[dict, Callable[[], dict]]:
    """(config, a reader of the state) of a folder's text encoder: one CLIPTextModel (SD 1/2)
    or, with `text_encoder_2/`, SDXL's two towers as one `DualTextEncoder`."""
    if not (folder / "text_encoder_2").is_dir():
        text_hf = _json(folder / "text_encoder" / "config.json")
        sd2 = text_hf.get("hidden_act") != "quick_gelu"  # OpenCLIP towers use exact GELU
        config = _translated(folder / "text_encoder" / "config.json", text_config_from_hf, sd2)
        return config, lambda: _text_state(folder / "text_encoder", text_hf, sd2)
    towers = [
        _translated(
            folder / part / "config.json",
            sdxl_tower_config,
            _pads_with_eot(folder / tokenizer, default=i == 0),
            i == len(SDXL_TOWERS) - 1,  # the last tower's pooled vector is projected
        )
        for i, (part, tokenizer) in enumerate(SDXL_TOWERS)
    ]

    def state() -> dict[str, torch.Tensor]:
        return {
            f"embedders.{i}.model.{k}": v
            for i, (part, _) in enumerate(SDXL_TOWERS)
            for k, v in keymaps.hf_clip_to_open_clip(_weights(folder / part)).items()
        }

    return {"_target_": "ldm.models.text_encoder.DualTextEncoder", "embedders": towers}, state


def read_folder(folder: Path) -> tuple[dict, dict[str, dict]]:
    """(config, part states in our names) of a diffusers pipeline folder (SD 1/2 or SDXL)."""
    unet_cfg = _translated(folder / "unet" / "config.json", unet_config_from_diffusers)
    vae_cfg = _translated(folder / "vae" / "config.json", vae_config_from_diffusers)
    text_cfg, text_state = _text_encoder(folder)
    if text_cfg["_target_"].endswith("DualTextEncoder"):  # SDXL: upcast unless marked fp16-safe
        vae_cfg["fp16_safe"] = not _json(folder / "vae" / "config.json").get("force_upcast", True)
    scheduler = folder / "scheduler" / "scheduler_config.json"
    sample_size = _json(folder / "unet" / "config.json").get("sample_size") or 64
    if isinstance(sample_size, list):  # diffusers allows [height, width]
        sample_size = max(sample_size)
    config = {
        "unet": unet_cfg,
        "vae": vae_cfg,
        "text_encoder": text_cfg,
        "diffusion": (
            _translated(scheduler, diffusion_from_scheduler)
            if scheduler.parent.is_dir()
            else diffusion_from_scheduler({})
        ),
        "image_size": sample_size * 2 ** min(len(vae_cfg["ch_mult"]) - 1, 16),
    }
    check_model(config, str(folder))  # sizes bounded before any weights are read
    try:
        states = {
            "unet": keymaps.diffusers_unet_to_sd(_weights(folder / "unet"), unet_cfg),
            "vae": keymaps.diffusers_vae_to_sd(_weights(folder / "vae")),
            "text_encoder": text_state(),
        }
    except KeyError as e:
        raise CheckpointError(f"{folder}: {e.args[0]}") from None
    return config, states


# ------------------------------------------------------------------------------- writing


def write_tokenizer(folder: Path, encoder: nn.Module) -> None:
    """open_clip's BPE vocabulary as a transformers `CLIPTokenizer` (vocab.json + merges.txt)."""
    tok = encoder.tokenizer
    folder.mkdir(parents=True, exist_ok=True)
    vocab = dict(tok.encoder)
    # open_clip names the special tokens <start_of_text> / <end_of_text>; CLIP's files <|...|>
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>", tok.sot_token_id)
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>", tok.eot_token_id)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    pad = "<|endoftext|>" if encoder.pad_with_eot else "!"  # "!" has id 0: open_clip's zero padding
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad,
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                **special,
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": encoder.context_length,
                "do_lower_case": True,
            },
            indent=2,
        )
    )


def _save_part(folder: Path, config: dict, state: dict, weights: str) -> None:
    write_text(folder / "config.json", json.dumps(config, indent=2) + "\n")
    save_state(folder / weights, state)


def write_folder(folder: Path, parts: dict[str, nn.Module], config: dict) -> Path:
    """A diffusers `StableDiffusionPipeline` folder from our parts and model config."""
    unet, vae, text = parts["unet"], parts["vae"], parts["text_encoder"]
    ucfg = diffusers_unet_config(config["unet"])
    ucfg.update(
        _class_name="UNet2DConditionModel",
        _diffusers_version=DIFFUSERS_VERSION,
        sample_size=config.get("image_size", 512) // vae.downsample_factor,
    )
    _save_part(
        folder / "unet",
        ucfg,
        keymaps.sd_unet_to_diffusers(unet.state_dict(), config["unet"]),
        "diffusion_pytorch_model.safetensors",
    )
    vcfg = diffusers_vae_config(vae.config)
    vcfg.update(_class_name="AutoencoderKL", _diffusers_version=DIFFUSERS_VERSION)
    _save_part(
        folder / "vae",
        vcfg,
        keymaps.sd_vae_to_diffusers(vae.state_dict()),
        "diffusion_pytorch_model.safetensors",
    )
    towers = _write_text_encoder(folder, text)
    write_text(
        folder / "scheduler" / "scheduler_config.json",
        json.dumps(scheduler_config(config["diffusion"]), indent=2),
    )
    write_text(folder / "model_index.json", json.dumps(model_index(towers), indent=2))
    return folder


def _write_text_encoder(folder: Path, text: nn.Module) -> int:
    """The text tower(s) and tokenizer(s): `text_encoder/` (+ `text_encoder_2/` for SDXL's
    second tower, with its projection); returns the number of towers."""
    if not hasattr(text, "embedders"):  # SD 1/2: an SD 2 tower stops one block early
        layers = len(text.model.transformer.resblocks) - (1 if text.layer == "penultimate" else 0)
        _save_tower(folder / "text_encoder", text, layers, hf_text_config(text, layers))
        write_tokenizer(folder / "tokenizer", text)
        return 1
    if len(text.embedders) != len(SDXL_TOWERS):
        raise CheckpointError(f"a diffusers folder holds {len(SDXL_TOWERS)} towers, not more")
    first, last = text.embedders
    layers = len(first.model.transformer.resblocks)
    _save_tower(folder / "text_encoder", first, layers, hf_text_config(first, layers))
    _save_tower(folder / "text_encoder_2", last, None, hf_projection_text_config(last))
    for tower, (_, tokenizer) in zip(text.embedders, SDXL_TOWERS):
        write_tokenizer(folder / tokenizer, tower)
    return 2


def _save_tower(folder: Path, tower: nn.Module, layers: int | None, config: dict) -> None:
    """One tower in transformers names, its first `layers` blocks (all: None); a projected
    tower's `text_projection.weight`, a Linear's, is open_clip's matrix transposed."""
    own = {k.removeprefix("model."): v for k, v in tower.state_dict().items()}
    hf = keymaps.open_clip_to_hf_clip(own, layers)
    hf.pop("text_model.embeddings.position_ids")  # not a saved buffer in transformers
    if layers is None:
        hf["text_projection.weight"] = own["text_projection"].t().contiguous()
    _save_part(folder, config, hf, "model.safetensors")


def model_index(towers: int) -> dict:
    """`model_index.json` of a `StableDiffusionPipeline` folder, or with two text towers a
    `StableDiffusionXLPipeline` one (an empty negative prompt read as zeros, as SDXL does)."""
    if towers == 1:
        return {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": DIFFUSERS_VERSION,
            **_PIPELINE_PARTS,
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        }
    return {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        **_PIPELINE_PARTS,
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "force_zeros_for_empty_prompt": True,
    }


_PIPELINE_PARTS = {
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "scheduler": ["diffusers", "DDIMScheduler"],
}
