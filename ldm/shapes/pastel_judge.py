"""Prompt adherence with the pastel style (`ldm.shapes.pastel`), judged by image analysis.

`judge_style` reads, besides the three attributes of `ldm.shapes.judge.judge`, whether
each colour is plain or pastel:

* the background's median colour is matched against the 8 plain and 8 pastel colours (on a
  white background, the shape's colour decides); a pastel image is mapped back to plain colours
  (2p - 255, the style's inverse) and judged as usual, so hues and shapes are read with the
  thresholds the plain judge was validated with;
* the shape's colour is matched the same way, from the median of the main blob's interior.

Plain white (245) and pastel white (250) are 8.7 RGB units apart, closer than a generated
image's noise: a white colour counts as either (pastel in a pastel prompt, plain in a plain
one). `score_style` reports hue adherence (pastel or not), shape adherence, and the fraction of
images whose two colours both read as pastel (`pastel`) or both as plain (`plain`).

    python -m ldm.shapes.pastel_judge DIR [--json out.json]
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image

from ldm.config import exit_on
from ldm.shapes.judge import (
    NONE,
    _as_rgb_array,
    _background,
    _foreground_colour,
    judge,
    run_cli,
)
from ldm.shapes.pastel import PASTEL, parse_styled
from ldm.shapes.render import PALETTE

EITHER = "either"  # white: plain and pastel cannot be told apart
_REFS = [(name, False, np.array(rgb, float)) for name, rgb in PALETTE.items()]
_REFS += [(name, True, np.array(rgb, float)) for name, rgb in PASTEL.items()]
_PASTEL_COLOURS = np.array(list(PASTEL.values()), dtype=np.float64)


def _tone(rgb: np.ndarray) -> str | bool:
    """True (pastel), False (plain) or EITHER for white, by the nearest of the 16 colours."""
    name, pastel, _ = min(_REFS, key=lambda r: float(np.linalg.norm(r[2] - rgb)))
    return EITHER if name == "white" else pastel


def judge_style(image: np.ndarray | Image.Image) -> dict[str, str | bool]:
    """`judge`'s attributes plus `background_pastel` and `shape_pastel` (True, False, EITHER,
    or None for a shape that is not there)."""
    array = _as_rgb_array(image)
    background_rgb = _background(array)
    tone = _tone(background_rgb)
    is_pastel = tone is True
    if tone == EITHER:  # a white background: the shape's colour tells the style
        shape_rgb = _foreground_colour(array, background_rgb, _PASTEL_COLOURS)
        is_pastel = shape_rgb is not None and _tone(shape_rgb) is True
    plain = np.clip(2 * array - 255, 0, 255) if is_pastel else array
    verdict = judge(np.round(plain).astype(np.uint8))  # judge reads uint8 (floats as [0, 1])
    shape_rgb = _foreground_colour(plain, _background(plain))
    shape_tone = None
    if shape_rgb is not None and verdict["shape_colour"] != NONE:
        shape_tone = _tone((shape_rgb + 255) / 2 if is_pastel else shape_rgb)
    return {**verdict, "background_pastel": tone, "shape_pastel": shape_tone}


def _reads_as(tone, pastel: bool) -> bool:
    return tone == EITHER or tone is pastel


def score_style(images: Iterable[np.ndarray | Image.Image], prompts: Sequence[str]) -> dict:
    """Accuracies over the images (each against its own prompt, with or without the style):
    `background`, `shape_colour`, `shape` (hues and shape, pastel or not), `pastel` / `plain`
    (both colours read as pastel / as plain), `style` (both read as the prompt asks),
    `colours` (both hues right), `style_and_colours` (both together: the image the prompt
    asked for, but for its shape), `n`."""
    names = ("background", "shape_colour", "shape", "pastel", "plain", "style", "colours")
    totals = dict.fromkeys((*names, "style_and_colours"), 0)
    n = 0
    for image, prompt in zip(images, prompts, strict=True):
        shape_colour, shape, background, asked = parse_styled(prompt)
        v = judge_style(image)
        tones = (v["background_pastel"], v["shape_pastel"])
        hits = {
            "background": v["background"] == background,
            "shape_colour": v["shape_colour"] == shape_colour,
            "shape": v["shape"] == shape,
            "pastel": all(_reads_as(t, True) for t in tones),
            "plain": all(_reads_as(t, False) for t in tones),
        }
        hits["style"] = hits["pastel"] if asked else hits["plain"]
        hits["colours"] = hits["background"] and hits["shape_colour"]
        hits["style_and_colours"] = hits["style"] and hits["colours"]
        for name, hit in hits.items():
            totals[name] += int(hit)
        n += 1
    if n == 0:
        raise ValueError("no images to score")
    return {**{k: v / n for k, v in totals.items()}, "n": n}


@exit_on(OSError, ValueError)
def main(argv: list[str] | None = None) -> int:
    return run_cli(argv, "Shapes adherence and pastel style of a directory of PNGs.", score_style)


if __name__ == "__main__":
    sys.exit(main())
