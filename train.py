"""Train a model from a composed Hydra config: `python train.py [experiment=NAME] [key=value]`
(or `ldm-train ...`, the same command). The run itself is `ldm.training.run.train`."""

import hydra
from omegaconf import DictConfig

from ldm.config import exit_on, register_resolvers
from ldm.training.run import ERRORS, train

register_resolvers()


# Hydra names the job after this file: the run folder's log is `train.log` (see run.is_new).
@hydra.main(version_base="1.3", config_path="configs", config_name="train")
@exit_on(*ERRORS)
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
