"""Convert between our files, Stable Diffusion single files and diffusers folders.

    python -m ldm.checkpoints.convert SRC DST.safetensors            # -> one SD single file
    python -m ldm.checkpoints.convert SRC DST_FOLDER --to diffusers  # -> a diffusers folder

(`ldm-convert` is the same command; an existing DST is replaced only with `--overwrite`.)
SRC is anything `load_model` reads: our `model.safetensors`, an SD 1.x/2.x
`.safetensors`/`.ckpt` (`--ema` takes its EMA U-Net) or a diffusers folder. The single file has
the original layout (SD 1 text encoder in CLIP names), the architecture, prediction type and our
config in its metadata, and, for v (and x0) prediction models, the inference YAML beside it
(`DST.yaml`, like SD 2's v2-inference-v.yaml) that A1111 and older loaders look for.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ldm.checkpoints.detect import architecture_name
from ldm.checkpoints.export import save_diffusers, save_sd
from ldm.checkpoints.files import CheckpointError, check_output
from ldm.checkpoints.load import load_model
from ldm.config import exit_on

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m ldm.checkpoints.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("src", help="our file, an SD .safetensors/.ckpt, or a diffusers folder")
    ap.add_argument("dst", help="a .safetensors file (--to sd) or a folder (--to diffusers)")
    ap.add_argument(
        "--to",
        choices=["sd", "diffusers"],
        default=None,
        help="output format (default: sd for a .safetensors DST, else diffusers)",
    )
    ap.add_argument("--ema", action="store_true", help="use the EMA U-Net of an LDM checkpoint")
    ap.add_argument(
        "--prediction",
        choices=["eps", "v", "x0"],
        default=None,
        help="override the prediction type (SD 2 768-v files cannot be told from keys)",
    )
    ap.add_argument("--vae", default=None, help="a separate VAE file to use instead")
    ap.add_argument(
        "--text-encoder", default=None, help="an open_clip text encoder file to use instead"
    )
    ap.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: keep)"
    )
    ap.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing DST (a folder is swapped in only once complete)",
    )
    return ap.parse_args(argv)


@exit_on(CheckpointError, ValueError)
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    to = args.to or ("sd" if args.dst.endswith(".safetensors") else "diffusers")
    check_output(args.dst, args.overwrite)  # before the long load
    model = load_model(
        args.src,
        prediction=args.prediction,
        use_ema=args.ema,
        vae=args.vae,
        text_encoder=args.text_encoder,
    )
    dtype = DTYPES.get(args.dtype)
    out = save_sd(args.dst, model, dtype) if to == "sd" else save_diffusers(args.dst, model, dtype)
    print(f"wrote {out} ({to}, {model.prediction}-prediction, {architecture_name(model.config)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
