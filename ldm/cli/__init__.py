"""The console scripts `ldm-train` and `ldm-sample`: `train.py` and `sample.py` as commands of
the installed package, one module each because Hydra names a job after the module of its main
(`train.log`, `sample.log` in the run folder, as with `python train.py`). They read the
repository's `configs/`, so the package is installed editable (`pip install -e .`)."""

from ldm.config import ROOT

CONFIGS = str(ROOT / "configs")
