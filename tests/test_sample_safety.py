"""sample.py with untrusted or unlucky input: it never overwrites an image, a prompt of any length
or character is a prompt, and a hostile embedding or LoRA file is one `error:` line that runs
nothing. sample.py runs as a user runs it, on a tiny SD-structured file, sampling 64 x 64."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import subprocess_env
from ldm import sampling
from ldm.checkpoints import layout
from ldm.pipeline import read_prompts
from sd_fixtures import sd_parts

ROOT = Path(__file__).resolve().parent.parent

LONG_PROMPT = " ".join(["a red circle on a blue background"] * 30)[:1000]
PROMPT_336 = ("a cat/dog on a mat/rug, " * 14)[:335] + "."


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """sample.py (or `-m module ...`) as a user runs it."""
    command = list(args) if args[0] == "-m" else [str(ROOT / "sample.py"), *args]
    return subprocess.run(
        [sys.executable, *command],
        cwd=cwd,
        env=subprocess_env(cwd),
        capture_output=True,
        text=True,
        timeout=300,
    )


def one_error_line(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert "\n" not in lines[0] and all(w in lines[0] for w in words), result.stderr


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return layout.save(tmp_path_factory.mktemp("tiny") / "m.safetensors", sd_parts("sd1"))


def sample_args(ckpt: Path, out: Path, *extra: str) -> list[str]:
    return [f"ckpt={ckpt}", "n=2", "steps=1", "height=64", "width=64", f"out_dir={out}", *extra]


class Evil:
    """A pickle that runs a shell command when loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# --------------------------------------------------------------------------------------------
# outputs: nothing overwritten


def test_a_second_run_into_the_same_folder_keeps_the_first_images(ckpt, tmp_path):
    out = tmp_path / "out"
    first = run(*sample_args(ckpt, out, "prompt=a red circle"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    names = ["000000.png", "000001.png", "grid.png"]
    assert sorted(p.name for p in out.iterdir()) == names
    before = {n: (out / n).read_bytes() for n in names}
    second = run(*sample_args(ckpt, out, "prompt=a blue square"), cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "grid-1.png" in second.stdout
    added = ["000000-1.png", "000001-1.png", "grid-1.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names + added)
    assert {n: (out / n).read_bytes() for n in names} == before
    assert Image.open(out / "000000-1.png").text["prompt"] == "a blue square"


def test_a_run_takes_the_first_suffix_free_for_all_its_files(tmp_path):
    (tmp_path / "000001.png").write_bytes(b"mine")
    assert sampling.free_suffix(tmp_path, ["000000", "000001", "grid"]) == 1
    (tmp_path / "grid-1.png").write_bytes(b"mine too")
    assert sampling.free_suffix(tmp_path, ["000000", "000001", "grid"]) == 2
    assert sampling.free_suffix(tmp_path, ["000001", "grid"]) == 2
    assert sampling.free_suffix(tmp_path, ["000005", "grid"]) == 0  # none of its names taken


def test_save_new_moves_on_when_the_name_was_taken_meanwhile(tmp_path):
    (tmp_path / "grid.png").write_bytes(b"another run's")
    path = sampling.save_new(Image.new("RGB", (2, 2)), tmp_path, "grid", 0)
    assert path.name == "grid-1.png" and (tmp_path / "grid.png").read_bytes() == b"another run's"
    assert Image.open(path).size == (2, 2)


def test_an_out_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("keep me")
    with pytest.raises(ValueError, match="is a file"):
        sampling.output_dir(str(tmp_path / "out"))
    assert (tmp_path / "out").read_text() == "keep me"


# --------------------------------------------------------------------------------------------
# prompts


@pytest.mark.parametrize(
    "prompt",
    [
        LONG_PROMPT,
        PROMPT_336,
        "a\0b",
        "/",
        "a/b/c.txt d",
        "x" * 5000,
        "../" * 200,
        "notes.txt is a prompt",
    ],
)
def test_a_value_that_names_no_file_is_the_prompt_itself(prompt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert read_prompts(prompt) == [prompt]


def test_prompt_files_are_read_and_a_missing_one_is_reported(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("prompts.txt").write_text("a red circle\n\n  a blue square  \n")
    assert read_prompts("prompts.txt") == ["a red circle", "a blue square"]
    assert read_prompts(str(tmp_path / "prompts.txt")) == ["a red circle", "a blue square"]
    Path("list").write_text("a\0b\n")  # any existing file, whatever its name
    assert read_prompts("list") == ["a\0b"]
    with pytest.raises(FileNotFoundError, match="prompt file 'missing.txt' does not exist"):
        read_prompts("missing.txt")
    Path("binary.txt").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="not UTF-8 text"):
        read_prompts("binary.txt")
    Path("empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="holds no prompt"):
        read_prompts("empty.txt")


# read_prompts takes any of them in process (above); one sample.py run by default, -m slow all
@pytest.mark.parametrize(
    "which",
    [
        pytest.param("1000 characters", marks=pytest.mark.slow),
        "336 characters with /",
        pytest.param("a NUL byte", marks=pytest.mark.slow),
    ],
)
def test_long_and_odd_prompts_sample(which, ckpt, tmp_path):
    prompt = {"1000 characters": LONG_PROMPT, "336 characters with /": PROMPT_336}.get(which)
    if prompt is None:  # a NUL cannot be a command-line argument: it comes from a file
        (tmp_path / "p.txt").write_text("a red\0circle\n")
    value = f"prompt='{prompt}'" if prompt else "prompt=p.txt"  # quoted for Hydra: commas
    out = tmp_path / "out"
    result = run(*sample_args(ckpt, out, value, "n=1"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert Image.open(out / "000000.png").text["prompt"] == (prompt or "a red\0circle")


# --------------------------------------------------------------------------------------------
# hostile embedding and LoRA files


def hostile_files(tmp_path: Path, marker: Path) -> dict[str, Path]:
    """Files that must be refused without running anything."""
    files = {}
    files["random.pt"] = tmp_path / "random.pt"
    files["random.pt"].write_bytes(os.urandom(256))
    files["evil.pt"] = tmp_path / "evil.pt"
    torch.save({"emb_params": Evil(marker)}, files["evil.pt"])
    files["evil.ckpt"] = tmp_path / "evil.ckpt"
    with open(files["evil.ckpt"], "wb") as f:  # a raw (pre-zip) pickle
        pickle.dump({"x": Evil(marker)}, f)
    return files


# embedding files are refused in process in tests/checkpoints/test_embeddings.py
@pytest.mark.parametrize("kind", [pytest.param("embedding", marks=pytest.mark.slow), "lora"])
def test_a_pickle_that_runs_code_is_one_line_and_runs_nothing(kind, ckpt, tmp_path):
    marker = tmp_path / "pwned"
    files = hostile_files(tmp_path, marker)
    path = files["evil.pt"] if kind == "embedding" else files["evil.ckpt"]
    out = tmp_path / "out"
    result = run(*sample_args(ckpt, out, "prompt=x", f"{kind}={path}"), cwd=tmp_path)
    one_error_line(result, "error:", path.name)
    assert not marker.exists() and not out.exists()


@pytest.mark.slow  # in process: tests/checkpoints/test_embeddings.py
def test_a_garbage_embedding_and_an_empty_word_are_one_line(ckpt, tmp_path):
    from ldm.checkpoints.embeddings import save_embedding

    garbage = hostile_files(tmp_path, tmp_path / "pwned")["random.pt"]
    result = run(
        *sample_args(ckpt, tmp_path / "out", "prompt=x", f"embedding={garbage}"), cwd=tmp_path
    )
    one_error_line(result, "error:", "random.pt")
    empty = save_embedding(tmp_path / "empty.safetensors", torch.zeros(1, 64), "")
    result = run(
        *sample_args(ckpt, tmp_path / "out", "prompt=x", f"embedding={empty}"), cwd=tmp_path
    )
    one_error_line(result, "error:", "empty.safetensors", "word")
    assert not (tmp_path / "out").exists()


def lora_state(layout: str) -> dict[str, torch.Tensor]:
    """One adapter of the tiny SD 1 U-Net (a 32-channel 1x1 convolution), zero: no change."""
    name = "down_blocks.0.attentions.0.proj_in"
    if layout == "peft":
        return {
            f"unet.{name}.lora_A.weight": torch.zeros(2, 32),
            f"unet.{name}.lora_B.weight": torch.zeros(32, 2),
        }
    stem = "lora_unet_" + name.replace(".", "_")
    return {
        f"{stem}.lora_down.weight": torch.zeros(2, 32),
        f"{stem}.lora_up.weight": torch.zeros(32, 2),
        f"{stem}.alpha": torch.tensor(2.0),
    }


def lora_cli(capsys, *argv: str) -> tuple[int, str]:
    """`python -m ldm.lora ARGV` in this process (one subprocess run per test shows the same
    from the command line): (exit status, stderr)."""
    from ldm import lora

    capsys.readouterr()
    try:
        code = lora.main(list(argv))
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_lora_metadata_naming_code_runs_nothing(ckpt, tmp_path, capsys):
    """A LoRA whose config-like metadata names subprocess.run samples (metadata is data, never
    a target to instantiate), through sample.py and both ldm.lora commands."""
    from ldm.checkpoints.files import save_state

    marker = tmp_path / "pwned"
    call = {"_target_": "subprocess.run", "args": [["touch", str(marker)]]}
    peft = {"unet.r": 2, "unet.lora_alpha": 2, "unet._target_": "subprocess.run", "unet.x": call}
    meta = {
        "lora_adapter_metadata": json.dumps(peft),
        "ldm.config": json.dumps(call),
        "ss_network_args": json.dumps(call),
        "modelspec.architecture": "subprocess.run",
    }
    path = save_state(tmp_path / "style.safetensors", lora_state("peft"), meta)
    out = tmp_path / "out"
    result = run(*sample_args(ckpt, out, "prompt=x", f"lora={path}", "n=1"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    kohya = tmp_path / "kohya.safetensors"
    assert lora_cli(capsys, "convert", str(path), str(kohya), "--to", "kohya") == (0, "")
    merged = tmp_path / "merged.safetensors"
    assert lora_cli(capsys, "merge", str(ckpt), str(kohya), str(merged)) == (0, "")
    assert not marker.exists()


def test_bad_lora_files_are_one_line_through_every_command(ckpt, tmp_path, capsys):
    from ldm.checkpoints.files import save_state

    marker = tmp_path / "pwned"
    evil = hostile_files(tmp_path, marker)["evil.ckpt"]
    listed = save_state(
        tmp_path / "listed.safetensors", lora_state("peft"), {"lora_adapter_metadata": "[1]"}
    )
    out = tmp_path / "out"
    result = run(*sample_args(ckpt, out, "prompt=x", f"lora={listed}"), cwd=tmp_path)
    one_error_line(result, "error: listed.safetensors:", "lora_adapter_metadata")
    dst = tmp_path / "converted.safetensors"
    result = run("-m", "ldm.lora", "convert", str(evil), str(dst), "--to", "peft", cwd=tmp_path)
    one_error_line(result, "error: evil.ckpt is refused")
    for path in (evil, listed):
        for argv in (
            ["convert", str(path), str(dst), "--to", "peft"],
            ["merge", str(ckpt), str(path), str(dst)],
        ):
            code, err = lora_cli(capsys, *argv)
            assert code != 0 and err.startswith("error:") and err.count("\n") == 1, err
            assert path.name in err
        assert not dst.exists()
    assert not marker.exists() and not out.exists()


def test_ldm_lora_never_replaces_an_existing_output(tmp_path, capsys):
    from ldm.checkpoints.files import save_state

    src = save_state(tmp_path / "style.safetensors", lora_state("kohya"))
    dst = tmp_path / "mine.safetensors"
    dst.write_bytes(b"the user's only copy")
    for argv in (
        ["convert", str(src), str(dst), "--to", "peft"],
        ["merge", str(src), str(src), str(dst)],
    ):
        code, err = lora_cli(capsys, *argv)
        assert code != 0 and "mine.safetensors exists; pass --overwrite" in err
    assert dst.read_bytes() == b"the user's only copy"
    assert lora_cli(capsys, "convert", str(src), str(dst), "--to", "peft", "--overwrite")[0] == 0
    assert dst.read_bytes() != b"the user's only copy"
