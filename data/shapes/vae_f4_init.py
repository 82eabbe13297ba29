"""The starting point of the 4x shapes first stage: the shipped 8x one without its lowest level.

    python data/shapes/vae_f4_init.py --out vae_f4_init.safetensors
    python train.py experiment=shapes_vae vae=shapes_f4 init=vae_f4_init.safetensors ...

The 8x VAE (`ch_mult=[1, 2, 2, 2]`) and the 4x one (`[1, 2, 2]`) share every level but the
8x8 one: drop the encoder's last downsampling and level, and the decoder's first level, and
the rest loads strictly. Its middle blocks then see 16x16 features of the same width and
adapt within minutes (data/shapes/VAE.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from ldm.models.autoencoder import AutoencoderKL

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "first_stage_model."
DROPPED = ("encoder.down.3.", "encoder.down.2.downsample.", "decoder.up.3.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=ROOT / "data/shapes/vae.safetensors")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    state = {
        k[len(PREFIX) :]: v.float()
        for k, v in load_file(args.src).items()
        if not any(d in k for d in DROPPED)
    }
    # The architecture of configs/vae/shapes_f4.yaml, with a neutral latent scale and shift: the
    # trained file records the measured ones (vae_metadata).
    config = OmegaConf.to_container(OmegaConf.load(ROOT / "configs/vae/shapes_f4.yaml").module)
    config.update(scale_factor=1.0, shift_factor=0.0)
    vae = AutoencoderKL(**{k: v for k, v in config.items() if k != "_target_"})
    vae.load_state_dict(state)  # strict: every 4x weight comes from the 8x file
    tensors = {PREFIX + k: v.contiguous() for k, v in vae.state_dict().items()}
    save_file(tensors, args.out, metadata={"ldm.vae": json.dumps(config)})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
