"""`ldm-sample ckpt=FILE prompt="a red circle" [key=value]`, or `python sample.py ...`."""

import hydra
from omegaconf import DictConfig

from ldm.checkpoints import CheckpointError
from ldm.cli import CONFIGS
from ldm.config import exit_on, register_resolvers
from ldm.sampling import sample_from_config

register_resolvers()


@hydra.main(version_base="1.3", config_path=CONFIGS, config_name="sample")
@exit_on(CheckpointError, FileNotFoundError, ValueError)
def main(cfg: DictConfig) -> None:
    sample_from_config(cfg)


if __name__ == "__main__":
    main()
