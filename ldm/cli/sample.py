"""`ldm-sample ckpt=FILE prompt="a red circle" [key=value]`: the same command as
`python sample.py`."""

import hydra
from omegaconf import DictConfig

from ldm.checkpoints import CheckpointError
from ldm.cli import CONFIGS
from ldm.config import exit_on, register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path=CONFIGS, config_name="sample")
@exit_on(CheckpointError, FileNotFoundError, ValueError)
def main(cfg: DictConfig) -> None:
    from ldm.pipeline import sample_from_config  # the package's sampling, as sample.py calls it

    sample_from_config(cfg)


if __name__ == "__main__":
    main()
