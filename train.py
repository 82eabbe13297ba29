"""Train a model: `python train.py [experiment=NAME] [key=value]`, the same command as the
console script `ldm-train` (its main, `ldm.cli.train`, composes `configs/train.yaml` and calls
`ldm.training.run.train`)."""

from ldm.cli.train import main

if __name__ == "__main__":
    main()
