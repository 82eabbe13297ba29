"""Tiny parts shared by the tests: every model at its smallest, built from the library's classes."""

import functools
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from ldm.config import ROOT, register_resolvers
from ldm.diffusion.objective import DiffusionObjective
from ldm.diffusion.schedule import NoiseSchedule
from ldm.training.module import LatentDiffusion
from ldm.training.options import Captions, EMASettings, LRSchedule

# What decides which kind of CPU the code acts as (ldm/precision.py): a subprocess keeps them, so
# a suite run with LDM_CPU_BF16=1, or held to AVX2, runs its train.py / sample.py calls alike.
CPU_KIND_VARIABLES = ("LDM_CPU_BF16", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


def subprocess_env(home) -> dict[str, str]:
    """The environment of a train.py / sample.py subprocess: offline W&B, the repository on
    the path, one thread (tiny models; the suite runs in parallel), this CPU kind's switches."""
    root = Path(__file__).resolve().parent.parent
    kind = {k: os.environ[k] for k in CPU_KIND_VARIABLES if k in os.environ}
    return {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "PATH": "/usr/bin:/bin",
        "HOME": str(home),
        "PYTHONPATH": str(root),
        "OMP_NUM_THREADS": "1",
        **kind,
    }


if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # parallel workers share the cores
    torch.set_num_threads(max(1, os.cpu_count() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models on one thread: on a shared few-core machine, intra-op parallelism only adds
    synchronisation overhead (and stalls badly under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_overrides(shards: Path | None = None) -> list[str]:
    """The tests' tiny run, `python train.py debug=tiny` (configs/debug/tiny.yaml: the default
    run on the tiny parts, a trainable text encoder and 64 images encoded each step, 4 steps,
    every callback at its cheapest); with `shards`, its images are rendered there rather than
    in the run's folder, so that the runs that follow reuse them."""
    return ["debug=tiny", *([f"data.prepare.out_dir={shards}"] if shards else [])]


@functools.cache
def tiny_configs():
    """The tiny run's config (tiny_overrides), composed as train.py composes it."""
    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        return compose("train", overrides=tiny_overrides())


def tiny_parts():
    """(U-Net, VAE, text encoder) of the tiny configs, freshly initialised from seed 0."""
    cfg = tiny_configs()
    torch.manual_seed(0)
    text = instantiate(cfg.text_encoder)
    return instantiate(cfg.unet), instantiate(cfg.vae), text


def make_tiny_module(**options) -> LatentDiffusion:
    """The tiny parts as a training module (v-prediction, EMA 0.9), with these options."""
    unet, vae, text = tiny_parts()
    objective = DiffusionObjective(NoiseSchedule(zero_terminal_snr=True), prediction="v")
    defaults = {
        "optimizer": functools.partial(torch.optim.AdamW, lr=1e-3),
        "lr_schedule": LRSchedule(warmup_steps=2),
        "captions": Captions(dropout=0.1),
        "ema": EMASettings(decay=0.9),
    }
    return LatentDiffusion(unet, vae, text, objective, **{**defaults, **options})


@pytest.fixture
def tiny_module():
    return make_tiny_module()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.rand(4, 3, 64, 64, generator=g) * 2 - 1,
        "caption": ["a red circle on a blue background"] * 4,
    }


@pytest.fixture(scope="session")
def alone_run(tmp_path_factory, worker_id) -> Path:
    """The small deterministic training run of `tests/training/runs.py` (1 process, 16 steps)
    left alone: what a killed and resumed run, and a 2-process run, are compared with. Made
    once per test session: under pytest-xdist the first worker to need it makes it, under a
    lock, in the folder the workers share, and the others read it."""
    from filelock import FileLock

    from tests.training.runs import finish, overrides

    shared = tmp_path_factory.getbasetemp()
    shared = shared.parent if worker_id != "master" else shared  # gw0, gw1, ... share the parent
    home, done = shared / "alone", shared / "alone.done"
    with FileLock(str(shared / "alone.lock")):
        if not done.exists():
            home.mkdir(exist_ok=True)
            finish(overrides(home), home / "alone", home)
            done.touch()
    return home / "alone"
