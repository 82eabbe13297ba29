"""The pastel judge (ldm.shapes.pastel_judge) on rendered images, plain and pastel, with noise."""

import numpy as np
import pytest

from ldm.shapes.pastel import (
    PASTEL,
    parse_styled,
    pastel_image,
    pastel_rgb,
    styled,
    write_style_folder,
)
from ldm.shapes.pastel_judge import EITHER, judge_style, main, score_style
from ldm.shapes.render import PALETTE, caption, render_sample, sample_rng


def rendered(n: int, sigma: float, seed: int = 11):
    """(plain images, plain prompts, pastel images, pastel prompts) with Gaussian noise."""
    rng = np.random.default_rng(seed)
    out = ([], [], [], [])
    for i in range(n):
        image, meta = render_sample(sample_rng(seed, "val", i))
        text = caption(meta["shape_colour"], meta["shape"], meta["background"])
        for k, (im, prompt) in enumerate(((image, text), (pastel_image(image), styled(text)))):
            noisy = np.asarray(im, dtype=float) + rng.normal(0, sigma, (64, 64, 3))
            out[2 * k].append(np.clip(noisy, 0, 255).astype(np.uint8))
            out[2 * k + 1].append(prompt)
    return out


def test_pastel_colours_follow_the_rule():
    assert pastel_rgb((220, 40, 40)) == (238, 148, 148) and pastel_rgb((245, 245, 245)) == (
        250,
        250,
        250,
    )
    assert PASTEL["black"] == (138, 138, 138) and set(PASTEL) == set(PALETTE)
    assert parse_styled("a red circle on a blue background, pastel style") == (
        "red",
        "circle",
        "blue",
        True,
    )
    assert parse_styled("a red circle on a blue background") == ("red", "circle", "blue", False)


@pytest.mark.parametrize("sigma", [0.0, 8.0])
def test_plain_and_pastel_renders_are_judged_right(sigma):
    plain, plain_prompts, pastel, pastel_prompts = rendered(300, sigma)
    a, b = score_style(plain, plain_prompts), score_style(pastel, pastel_prompts)
    for result in (a, b):
        keys = ("background", "shape_colour", "shape", "style", "colours", "style_and_colours")
        assert min(result[k] for k in keys) >= 0.99
    assert a["plain"] >= 0.99 and a["pastel"] == 0.0  # a plain image is never both-pastel
    assert b["pastel"] >= 0.99 and b["plain"] == 0.0
    # The style is judged against what the prompt asks: pastel images fail plain prompts.
    wrong_style = score_style(pastel, plain_prompts)
    assert wrong_style["style"] == 0.0 and wrong_style["style_and_colours"] == 0.0
    assert wrong_style["colours"] >= 0.99  # the hues are read whatever the tone


def test_white_reads_as_either_tone():
    image, meta = render_sample(sample_rng(3, "val", 0))
    verdict = judge_style(np.asarray(image))
    tones = {"background": verdict["background_pastel"], "shape_colour": verdict["shape_pastel"]}
    for attribute, tone in tones.items():
        assert tone == (EITHER if meta[attribute] == "white" else False)


def test_style_folder_and_command_line(tmp_path, capsys):
    captions = write_style_folder(tmp_path, n=12, seed=1)
    assert len(captions) == 12 and all(c.endswith(", pastel style") for c in captions)
    assert sorted(p.name for p in tmp_path.glob("*.txt"))[0] == "00000.txt"
    assert main([str(tmp_path), "--json", str(tmp_path / "r.json")]) == 0
    assert "pastel" in capsys.readouterr().out and (tmp_path / "r.json").is_file()
