"""The console scripts (`[project.scripts]`): each resolves to a callable, every command module
of the package has one, and `ldm-train` composes the repository's configs from any folder as
the `train` job, as `python train.py` does."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]


def scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_each_console_script_resolves_to_a_callable():
    declared = scripts()
    for name in ("ldm-train", "ldm-sample", "ldm-convert", "ldm-lora", "ldm-results"):
        assert name in declared
    for name, target in declared.items():
        module, _, attr = target.partition(":")
        assert name.startswith("ldm-") and callable(getattr(importlib.import_module(module), attr))


def command_modules() -> set[str]:
    """The package's modules that run as `python -m NAME`."""
    found = set()
    for path in (ROOT / "ldm").rglob("*.py"):
        if 'if __name__ == "__main__":' in path.read_text():
            found.add(".".join(path.relative_to(ROOT).with_suffix("").parts))
    return found


def test_every_command_module_has_a_console_script():
    targets = {target.partition(":")[0] for target in scripts().values()}
    assert command_modules() == targets


def test_ldm_train_reads_the_repository_configs_from_any_folder_as_the_train_job(tmp_path):
    """What the installed `ldm-train` script runs (`from ldm.cli.train import main`), from a
    folder outside the repository: the job is named `train` (its log `train.log`)."""
    script = "import sys; from ldm.cli.train import main; sys.argv[0] = 'ldm-train'; main()"
    result = subprocess.run(
        [sys.executable, "-c", script, "--cfg", "hydra", "experiment=shapes"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    job = result.stdout.split("\n  job:\n", 1)[1]
    assert job.startswith("    name: train\n")
    assert f"path: {ROOT / 'configs'}" in result.stdout
