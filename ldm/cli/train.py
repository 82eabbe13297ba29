"""`ldm-train [experiment=NAME] [key=value]`, or `python train.py ...`."""

import hydra
from omegaconf import DictConfig

from ldm.cli import CONFIGS
from ldm.config import exit_on, register_resolvers
from ldm.training.run import ERRORS, train

register_resolvers()


@hydra.main(version_base="1.3", config_path=CONFIGS, config_name="train")
@exit_on(*ERRORS)
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
