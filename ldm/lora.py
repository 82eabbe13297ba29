"""LoRA files from the command line: merge them into a model, or convert their layout.

    python -m ldm.lora merge BASE LORA [LORA ...] OUT.safetensors [--scale S [S ...]]
    python -m ldm.lora convert IN.safetensors OUT.safetensors --to kohya|peft

An existing OUT is never replaced without `--overwrite`. LoRA files are read (and checked:
`ldm.checkpoints.lora`) before BASE is loaded, so a bad one is refused at once.

`merge` loads BASE (anything `ldm.checkpoints.load_model` reads: an SD single file, a diffusers
folder, a file of ours), adds each LoRA's weight deltas at its scale (one scale for all, or one
per LoRA; default 1) and writes an SD single file. `convert` rewrites a LoRA file between the
kohya layout (A1111, ComfyUI) and the diffusers / PEFT layout, tensors unchanged (an SDXL
LoRA keeps kohya's SDXL names, lora_te1_ / lora_te2_; one whose U-Net adapters have SD-layout
names, as kohya's SDXL networks write them, stays in the kohya layout: diffusers' names for them
need the model).
"""

from __future__ import annotations

import argparse
import sys

from ldm.checkpoints import CheckpointError, load_model
from ldm.checkpoints.export import save_sd
from ldm.checkpoints.files import check_output
from ldm.checkpoints.lora import is_sdxl_lora, pair_scales, read_lora, read_loras, save_lora
from ldm.checkpoints.lora_networks import merge_loras
from ldm.config import exit_on, fail


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m ldm.lora",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="merge LoRA files into a model -> SD single file")
    merge.add_argument("base", help="the model: SD .safetensors/.ckpt, diffusers folder, ours")
    merge.add_argument("files", nargs="+", help="LORA [LORA ...] OUT.safetensors")
    merge.add_argument(
        "--scale",
        type=float,
        nargs="+",
        default=[1.0],
        help="one scale, or one per LoRA (default 1)",
    )
    convert = sub.add_parser("convert", help="rewrite a LoRA file in the kohya or PEFT layout")
    convert.add_argument("src")
    convert.add_argument("dst")
    convert.add_argument("--to", choices=["kohya", "peft"], required=True)
    for command in (merge, convert):
        command.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return ap.parse_args(argv)


@exit_on(CheckpointError, ValueError, FileNotFoundError)
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "convert":
        check_output(args.dst, args.overwrite)
        adapters, meta = read_lora(args.src)
        keep = {k: v for k, v in meta.items() if k != "lora_adapter_metadata"}
        save_lora(args.dst, adapters, args.to, keep, sdxl=is_sdxl_lora(adapters, meta))
        print(f"wrote {args.dst} ({args.to} layout, {len(adapters)} adapters)")
        return 0
    *loras, out = args.files
    if not loras:
        fail("merge needs at least one LoRA file and the output file")
    pairs = pair_scales(loras, args.scale)
    check_output(out, args.overwrite)
    adapters = read_loras(pairs)
    model = load_model(args.base)
    merge_loras(model, adapters)
    save_sd(out, model)
    print(f"wrote {out}: {args.base} with " + ", ".join(f"{p} x{s:g}" for p, s in pairs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
