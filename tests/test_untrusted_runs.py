"""The command lines on crafted and broken files, and on folders that already hold something:
one `error:` line, no traceback, no code of the file's run (no marker file), nothing of the
user's removed or replaced."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_entrypoints import run, tiny_train_overrides

from ldm.checkpoints import CONFIG_KEY
from ldm.training.checkpointing import Checkpoints


class RunsCode:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def crafted_ckpt(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": RunsCode(f"touch {marker}")}, path)
    return path


def crafted_safetensors(path: Path, marker: Path) -> Path:
    part = {"_target_": "subprocess.run", "args": ["touch", str(marker)]}
    config = {"unet": part, "vae": part, "text_encoder": part, "diffusion": {}}
    save_file(
        {"model.diffusion_model.w": torch.zeros(1)}, str(path), {CONFIG_KEY: json.dumps(config)}
    )
    return path


def refused(result, *words: str) -> None:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode != 0 and len(errors) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and all(w in errors[0] for w in words), errors


def snapshot(folder: Path) -> dict:
    """Every file of `folder` but what Hydra writes into a run folder at each start."""
    files = (p for p in folder.rglob("*") if p.is_file())
    return {
        p.relative_to(folder): p.read_bytes()
        for p in files
        if p.relative_to(folder).parts[0] not in (".hydra", "train.log")
    }


def train_args(tmp: Path, run_dir: Path, *extra: str) -> list[str]:
    args = [o for o in tiny_train_overrides(tmp) if not o.startswith("hydra.run.dir=")]
    return [*args, f"hydra.run.dir={run_dir}", *extra]


# The library refuses these files in process (tests/checkpoints/test_untrusted.py); here each
# command line is shown to turn that into one line. The default run keeps one of sample.py and
# one of train.py (which reads through the same `read_checkpoint` as resume=FILE); -m slow all.
SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "entry",
    [
        "sample ckpt",
        pytest.param("sample ckpt pickle", marks=SLOW),
        pytest.param("convert", marks=SLOW),
        pytest.param("train init", marks=SLOW),
        pytest.param("train resume", marks=SLOW),
        "train auto",
    ],
)
def test_a_crafted_file_runs_nothing_through_any_entry_point(tmp_path, entry):
    marker = tmp_path / "ran"
    st = crafted_safetensors(tmp_path / "crafted.safetensors", marker)
    ck = crafted_ckpt(tmp_path / "crafted.ckpt", marker)
    run_dir = tmp_path / "run"
    if entry == "train auto":  # a stranger's file left where resume=auto looks
        (run_dir / "checkpoints").mkdir(parents=True)
        (run_dir / "notes.txt").write_text("mine")
        (run_dir / "checkpoints" / "last.ckpt").write_bytes(ck.read_bytes())
    before = snapshot(run_dir) if run_dir.exists() else {}
    command = {
        "sample ckpt": (
            "sample.py",
            "prompt=a red circle",
            f"ckpt={st}",
            f"out_dir={tmp_path / 'out'}",
        ),
        "sample ckpt pickle": (
            "sample.py",
            "prompt=a red circle",
            f"ckpt={ck}",
            f"out_dir={tmp_path / 'out'}",
        ),
        "convert": ("-m", "ldm.checkpoints.convert", str(st), str(tmp_path / "out.safetensors")),
        "train init": ("train.py", *train_args(tmp_path, run_dir, f"init={ck}")),
        "train resume": ("train.py", *train_args(tmp_path, run_dir, f"resume={ck}")),
        "train auto": ("train.py", *train_args(tmp_path, run_dir, "resume=auto")),
    }[entry]
    result = run(*command, cwd=tmp_path)
    refused(result, "crafted" if entry != "train auto" else "ckpt")
    assert not marker.exists()
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.safetensors").exists()
    assert (snapshot(run_dir) if run_dir.exists() else {}) == before


def test_a_failed_run_in_an_existing_folder_leaves_every_file_of_it(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes")
    (folder / "old").mkdir()
    (folder / "old" / "model.safetensors").write_bytes(b"old weights")
    before = snapshot(folder)
    result = run(
        "train.py", *train_args(tmp_path, folder, "init=missing.safetensors"), cwd=tmp_path
    )
    refused(result, "missing.safetensors")
    assert snapshot(folder) == before


def test_a_folder_that_holds_a_run_is_refused_unless_resumed(tmp_path):
    folder = tmp_path / "done"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"finished weights")
    (folder / "checkpoints" / "epoch=0-step=4.ckpt").write_bytes(b"a checkpoint")
    before = snapshot(folder)
    result = run("train.py", *train_args(tmp_path, folder), cwd=tmp_path)
    refused(result, "already holds a run", "resume=auto")
    assert snapshot(folder) == before


def test_pruning_counts_only_the_names_the_callback_writes(tmp_path):
    callback = Checkpoints(dirpath=str(tmp_path))
    named = Checkpoints(dirpath=str(tmp_path), filename="s{step:06d}")
    names = ["epoch=0-step=2.ckpt", "epoch=3-step=10-v1.ckpt", "best.ckpt", "sstep=000010.ckpt"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert [n for n in names if callback.wrote(tmp_path / n)] == names[:2]
    assert [n for n in names if named.wrote(tmp_path / n)] == names[3:]
