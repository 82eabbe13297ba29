"""Tests for the shapes prompt-adherence evaluator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter
from PIL.PngImagePlugin import PngInfo

from ldm.shapes.judge import judge, main, score
from ldm.shapes.render import PALETTE, caption, random_prompts, render, render_sample, sample_rng

REPO_ROOT = Path(__file__).resolve().parents[2]


def _renders(n: int, size: int, seed: int = 11) -> tuple[list[Image.Image], list[str]]:
    images, prompts = [], []
    for index in range(n):
        image, meta = render_sample(sample_rng(seed, "val", index), size)
        images.append(image)
        prompts.append(caption(meta["shape_colour"], meta["shape"], meta["background"]))
    return images, prompts


@pytest.mark.parametrize("size, n", [(64, 1000), (32, 300), (128, 200)])
def test_renders_are_judged_correctly(size, n):
    images, prompts = _renders(n, size)
    result = score([np.asarray(image) for image in images], prompts)
    assert result["n"] == n
    for name in ("background", "shape_colour", "shape", "all"):
        assert result[name] >= 0.99, (name, result)


def test_blurred_noisy_renders_are_judged_correctly():
    # Generated images are softer and noisier than renders.
    images, prompts = _renders(200, 64, seed=12)
    rng = np.random.default_rng(0)
    degraded = []
    for image in images:
        blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(1.5)), dtype=np.float64)
        noisy = blurred + rng.normal(0, 15, blurred.shape)
        degraded.append(np.clip(noisy, 0, 255).astype(np.uint8))
    result = score(degraded, prompts)
    for name in ("background", "shape_colour", "shape"):
        assert result[name] >= 0.95, (name, result)


def test_uniform_noise_scores_near_chance():
    rng = np.random.default_rng(3)
    noise = rng.integers(0, 256, size=(300, 64, 64, 3), dtype=np.uint8)
    result = score(noise, random_prompts(300, seed=4))
    assert result["background"] < 0.3
    assert result["shape_colour"] < 0.3
    assert result["shape"] < 0.5


def test_image_without_shape_has_no_shape():
    blank = np.broadcast_to(np.array(PALETTE["green"], dtype=np.uint8), (64, 64, 3))
    assert judge(blank) == {"background": "green", "shape_colour": "none", "shape": "none"}


def test_judge_accepts_pil_uint8_and_float():
    image = render("triangle", "orange", "red", (30.0, 34.0), 36.0, 10.0)
    expected = {"background": "red", "shape_colour": "orange", "shape": "triangle"}
    assert judge(image) == expected
    assert judge(np.asarray(image)) == expected
    assert judge(np.asarray(image) / 255.0) == expected


def test_score_rejects_bad_input():
    images, prompts = _renders(2, 32)
    with pytest.raises(ValueError):
        score(images, prompts[:1])
    with pytest.raises(ValueError, match="not a shapes caption"):
        score(images[:1], ["a photo of a cat"])
    with pytest.raises(ValueError, match="no images"):
        score([], [])


def _write_pngs(directory: Path, n: int) -> None:
    images, prompts = _renders(n, 64, seed=13)
    for index, (image, prompt) in enumerate(zip(images, prompts)):
        path = directory / f"{index:03d}.png"
        if index % 2:
            info = PngInfo()
            info.add_text("prompt", prompt)
            image.save(path, pnginfo=info)
        else:
            image.save(path)
            path.with_suffix(".txt").write_text(prompt + "\n")


def test_cli_scores_a_directory(tmp_path, capsys):
    _write_pngs(tmp_path, 6)
    out = tmp_path / "result.json"
    assert main([str(tmp_path), "--json", str(out)]) == 0
    table = capsys.readouterr().out
    for name in ("background", "shape_colour", "shape", "all"):
        assert name in table
    result = json.loads(out.read_text())
    assert result == {"background": 1.0, "shape_colour": 1.0, "shape": 1.0, "all": 1.0, "n": 6}


def test_cli_skips_images_without_a_prompt_and_says_so(tmp_path, capsys):
    _write_pngs(tmp_path, 4)
    _renders(1, 64)[0][0].save(tmp_path / "grid.png")  # as sample.py writes beside its images
    out = tmp_path / "result.json"
    assert main([str(tmp_path), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["n"] == 4
    assert "skipped 1 PNG(s) without a prompt: grid.png" in capsys.readouterr().err


def test_cli_reports_missing_prompt(tmp_path, capsys):
    _renders(1, 64)[0][0].save(tmp_path / "lonely.png")
    with pytest.raises(SystemExit, match="1"):
        main([str(tmp_path)])
    assert "lonely.png" in capsys.readouterr().err


def test_cli_empty_directory_is_one_error_line(tmp_path):
    # The package may not be installed: make the checkout importable.
    paths = [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    process = subprocess.run(
        [sys.executable, "-m", "ldm.shapes.judge", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert process.returncode == 1
    assert process.stdout == ""
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1 and "no PNG images" in lines[0]
