"""Images from a checkpoint: `python sample.py ckpt=FILE prompt="a red circle" n=8`.

Writes one PNG per image (prompt, seed, sampler, steps and guidance scale in its text metadata)
and a grid of them all into `out_dir`, never overwriting a file; see `ldm.sampling` for the file
names and how `prompt=` is read, and `configs/sample.yaml` for every option.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ldm.checkpoints import CheckpointError
from ldm.config import exit_on, register_resolvers
from ldm.sampling import sample_from_config

register_resolvers()


@hydra.main(version_base="1.3", config_path="configs", config_name="sample")
@exit_on(CheckpointError, FileNotFoundError, ValueError)
def main(cfg: DictConfig) -> None:
    sample_from_config(cfg)


if __name__ == "__main__":
    main()
