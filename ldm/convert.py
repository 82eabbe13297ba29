"""Convert between our files, Stable Diffusion single files and diffusers folders.

    python -m ldm.convert SRC DST.safetensors            # -> one SD single file
    python -m ldm.convert SRC DST_FOLDER --to diffusers  # -> a diffusers pipeline folder

SRC is anything `ldm.formats.load_model` reads: our `model.safetensors`, an SD 1.x/2.x
`.safetensors`/`.ckpt` (`--ema` takes its EMA U-Net) or a diffusers folder. The single file has
the original layout (SD 1 text encoder in CLIP names), the architecture, prediction type and our
config in its metadata, and, for v-prediction models, the inference YAML beside it
(`DST.yaml`, like SD 2's v2-inference-v.yaml) that A1111 and older loaders look for.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

from ldm import checkpoint, diffusers_io
from ldm.checkpoint import CheckpointError
from ldm.formats import Loaded, load_model

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def architecture_name(config: dict) -> str:
    """The modelspec architecture of a model config ("stable-diffusion-v1", ...)."""
    unet, pred = config["unet"], config["diffusion"]["prediction"]
    if unet.get("use_linear_in_transformer") and unet.get("context_dim") == 1024:
        return "stable-diffusion-v2-768-v" if pred == "v" else "stable-diffusion-v2-512"
    if not unet.get("use_linear_in_transformer") and unet.get("context_dim") == 768:
        return "stable-diffusion-v1"
    return "ldm-custom"


def sd_metadata(config: dict) -> dict:
    pred = config["diffusion"]["prediction"]
    return {checkpoint.CONFIG_KEY: config, "format": "sd",
            "modelspec.architecture": architecture_name(config),
            "modelspec.prediction_type": "v" if pred == "v" else "epsilon"}


def inference_yaml(config: dict) -> dict:
    """The original LDM inference config of a model (what v2-inference-v.yaml says for SD 2)."""
    u, v, t = config["unet"], config["vae"], config["text_encoder"]
    sched = config["diffusion"]["schedule"]
    heads = {"num_head_channels": u["num_head_channels"]} if u.get("num_head_channels", -1) != -1 \
        else {"num_heads": u["num_heads"]}
    open_clip_tower = t.get("layer") == "penultimate" or not t.get("pad_with_eot")
    cond = ({"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
             "params": {"freeze": True, "layer": t.get("layer", "last")}} if open_clip_tower
            else {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"})
    params = {
        "parameterization": "v" if config["diffusion"]["prediction"] == "v" else "eps",
        "linear_start": sched.get("beta_start", 0.00085), "linear_end": sched.get("beta_end", 0.012),
        "num_timesteps_cond": 1, "log_every_t": 200, "timesteps": sched.get("num_steps", 1000),
        "first_stage_key": "jpg", "cond_stage_key": "txt",
        "image_size": config.get("image_size", 512) // 8, "channels": u["in_channels"],
        "cond_stage_trainable": False, "conditioning_key": "crossattn", "monitor": "val/loss_simple_ema",
        "scale_factor": v.get("scale_factor", 0.18215), "use_ema": False,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "use_checkpoint": True, "image_size": 32, "in_channels": u["in_channels"],
            "out_channels": u["out_channels"], "model_channels": u["model_channels"],
            "attention_resolutions": list(u["attention_resolutions"]),
            "num_res_blocks": u["num_res_blocks"], "channel_mult": list(u["channel_mult"]), **heads,
            "use_spatial_transformer": True, "use_linear_in_transformer": bool(u.get("use_linear_in_transformer")),
            "transformer_depth": u.get("transformer_depth", 1), "context_dim": u["context_dim"],
            "legacy": False}},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
            "embed_dim": v.get("embed_dim", 4), "monitor": "val/rec_loss",
            "ddconfig": {"double_z": True, "z_channels": v.get("z_channels", 4), "resolution": 256,
                         "in_channels": 3, "out_ch": 3, "ch": v.get("ch", 128),
                         "ch_mult": list(v.get("ch_mult", [1, 2, 4, 4])),
                         "num_res_blocks": v.get("num_res_blocks", 2), "attn_resolutions": [],
                         "dropout": 0.0},
            "lossconfig": {"target": "torch.nn.Identity"}}},
        "cond_stage_config": cond}
    return {"model": {"base_learning_rate": 1.0e-4, "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                      "params": params}}


def save_sd(path: str | Path, model: Loaded, dtype: torch.dtype | None = None,
            write_yaml: bool | None = None) -> Path:
    """One SD single file (+ `NAME.yaml` for v-prediction models unless `write_yaml` is False)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path.name}: SD single files are written as .safetensors")
    checkpoint.save(path, model.parts(), sd_metadata(model.config), dtype=dtype)
    if write_yaml or (write_yaml is None and model.prediction == "v"):
        path.with_suffix(".yaml").write_text(yaml.safe_dump(inference_yaml(model.config), sort_keys=False))
    return path


def save_diffusers(folder: str | Path, model: Loaded, dtype: torch.dtype | None = None) -> Path:
    """A diffusers pipeline folder (`from_pretrained` loads it offline)."""
    parts = model.parts()
    if dtype is not None:
        parts = {k: v.to(dtype) for k, v in parts.items()}
    return diffusers_io.write_folder(Path(folder), parts, model.config)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ldm.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="our file, an SD .safetensors/.ckpt, or a diffusers folder")
    ap.add_argument("dst", help="a .safetensors file (--to sd) or a folder (--to diffusers)")
    ap.add_argument("--to", choices=["sd", "diffusers"], default=None,
                    help="output format (default: sd for a .safetensors DST, else diffusers)")
    ap.add_argument("--ema", action="store_true", help="use the EMA U-Net of an LDM checkpoint")
    ap.add_argument("--prediction", choices=["eps", "v"], default=None,
                    help="override the prediction type (SD 2 768-v files cannot be told from keys)")
    ap.add_argument("--vae", default=None, help="a separate VAE file to use instead")
    ap.add_argument("--text-encoder", default=None, help="an open_clip text encoder file to use instead")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: keep)")
    args = ap.parse_args(argv)
    to = args.to or ("sd" if args.dst.endswith(".safetensors") else "diffusers")
    try:
        model = load_model(args.src, prediction=args.prediction, use_ema=args.ema, vae=args.vae,
                           text_encoder=args.text_encoder)
        dtype = DTYPES.get(args.dtype)
        out = save_sd(args.dst, model, dtype) if to == "sd" else save_diffusers(args.dst, model, dtype)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({to}, {model.config['diffusion']['prediction']}-prediction, "
          f"{architecture_name(model.config)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
