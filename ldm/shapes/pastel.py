"""The pastel style of the shapes set, for fine-tuning experiments.

A pastel image is a shapes image with every RGB channel c of both colours made
round((c + 255) / 2); its caption is the usual one followed by `, pastel style`. The map is
affine, so applying it to a rendered image gives exactly the image rendered with the pastel
colours (edges stay linear blends of the two), up to rounding. `write_style_folder` renders a
folder of PNGs with `.txt` captions: what a user's style folder looks like, ready for
`data/folder/prepare.py`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from ldm.shapes.render import PALETTE, caption, parse_caption, render_sample, sample_rng

SUFFIX = ", pastel style"
STYLE_SPLIT = 7  # the generator stream of style samples, apart from train/val/prompts


def pastel_rgb(rgb) -> tuple[int, ...]:
    """round((c + 255) / 2) per channel (halves round up: the dataset's rule)."""
    return tuple(int(np.floor((c + 255) / 2 + 0.5)) for c in rgb)


PASTEL = {name: pastel_rgb(rgb) for name, rgb in PALETTE.items()}


def pastel_image(image: Image.Image) -> Image.Image:
    array = np.asarray(image.convert("RGB"), dtype=np.float64)
    return Image.fromarray(np.floor((array + 255) / 2 + 0.5).astype(np.uint8))


def split_style(prompt: str) -> tuple[str, bool]:
    """(the plain caption, whether it asks for the pastel style)."""
    prompt = prompt.strip()
    if prompt.endswith(SUFFIX):
        return prompt[: -len(SUFFIX)], True
    return prompt, False


def styled(prompt: str) -> str:
    return prompt + SUFFIX


def parse_styled(prompt: str) -> tuple[str, str, str, bool]:
    """(shape colour, shape, background, pastel) of a caption with or without the style."""
    plain, pastel = split_style(prompt)
    return (*parse_caption(plain), pastel)


def write_style_folder(
    out_dir: str | os.PathLike, n: int = 200, seed: int = 0, size: int = 64
) -> list[str]:
    """Render `n` pastel samples into `out_dir` as NNNNN.png + NNNNN.txt; returns the captions.
    Deterministic for `seed`; drawn apart from the training, validation and prompt streams."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    captions = []
    for i in range(n):
        image, meta = render_sample(sample_rng(seed, STYLE_SPLIT, i), size)
        text = styled(caption(meta["shape_colour"], meta["shape"], meta["background"]))
        pastel_image(image).save(out / f"{i:05d}.png")
        (out / f"{i:05d}.txt").write_text(text + "\n")
        captions.append(text)
    return captions
