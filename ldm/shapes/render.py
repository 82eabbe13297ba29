"""The embedded "shapes" dataset: palette, captions and renderer.

Every image is one filled shape (circle, square or equilateral triangle) of one
palette colour on a solid background of a different palette colour, captioned
``a {shape colour} {shape} on a {background colour} background``.  The caption
space is small (8 backgrounds x 7 shape colours x 3 shapes = 168 captions), so
prompt adherence of a generator can be measured exactly by image analysis
(see ``ldm.shapes.judge``).

Geometry, in continuous pixel coordinates with (0, 0) the top-left corner of
the image and pixel (i, j) covering [i, i+1] x [j, j+1]:

* ``centre`` is the (x, y) centre of the shape's circumscribed circle (for a
  regular polygon also its centroid).
* ``size_px`` is the diameter of the circumscribed circle: the circle's
  diameter, the square's diagonal, the triangle's side times 2/sqrt(3).  No
  part of the shape is farther than ``size_px / 2`` from the centre, whatever
  the rotation.  Samples draw it uniformly from 35-70% of the image side.
* ``angle`` is the rotation in degrees, counter-clockwise as displayed; at 0
  the square is axis-aligned and the triangle points up.

Samples keep the circumscribed circle at least ``EDGE_MARGIN_PX`` from every
edge, so the shape is fully inside and the outermost ring of pixels is pure
background.  Shapes are drawn at ``SUPERSAMPLE`` times the resolution and box
filtered, so interior and background pixels have the exact palette colour and
edge pixels are linear blends of the two.

Rendering is deterministic: each sample draws from its own generator seeded
with ``[seed, split_id, index]``, so the result does not depend on the order
or the number of processes used to render.

Its WebDataset shards are written by ``ldm.shapes.dataset``; a change to what is rendered
bumps its ``FORMAT_VERSION``.
"""

from __future__ import annotations

import math
import re

import numpy as np
from PIL import Image, ImageDraw

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 50),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "orange": (245, 140, 30),
    "purple": (140, 60, 190),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZE_RANGE: tuple[float, float] = (0.35, 0.70)
SPLITS: dict[str, int] = {"train": 0, "val": 1}
SUPERSAMPLE = 8
# One pixel keeps the outer ring pure background; the extra quarter pixel
# absorbs the rasteriser's rounding at the supersampled resolution.
EDGE_MARGIN_PX = 1.25
# Colours drawn from the whole RGB cube ("any") keep at least this distance, so the shape shows.
MIN_RGB_CONTRAST = 60.0

_N_SIDES = {"square": 4, "triangle": 3}
# Polar angle of vertex 0 at rotation 0: square axis-aligned, triangle pointing up.
_VERTEX_OFFSET_DEG = {"square": 45.0, "triangle": 90.0}
_PROMPT_STREAM = 2  # split id reserved for random_prompts()


# --------------------------------------------------------------------------
# Captions


def caption(shape_colour: str, shape: str, background: str) -> str:
    """The caption of an image: ``a {shape_colour} {shape} on a {background} background``."""
    return f"a {shape_colour} {shape} on a {background} background"


_CAPTION_RE = re.compile(r"a (\S+) (\S+) on a (\S+) background")


def parse_caption(text: str) -> tuple[str, str, str]:
    """Inverse of :func:`caption`: ``(shape_colour, shape, background)``.

    Raises ValueError for any text outside the caption space (unknown colour
    or shape, shape colour equal to the background, other wording).
    """
    match = _CAPTION_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"not a shapes caption: {text!r}; expected "
            "'a <colour> <shape> on a <colour> background'"
        )
    shape_colour, shape, background = match.groups()
    for colour in (shape_colour, background):
        if colour not in PALETTE:
            raise ValueError(
                f"unknown colour {colour!r} in caption {text!r}; known: {', '.join(PALETTE)}"
            )
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r} in caption {text!r}; known: {', '.join(SHAPES)}")
    if shape_colour == background:
        raise ValueError(f"shape colour equals background colour in caption {text!r}")
    return shape_colour, shape, background


def caption_space() -> list[str]:
    """All 168 captions, in palette x palette x shape order."""
    return [
        caption(colour, shape, background)
        for background in PALETTE
        for colour in PALETTE
        if colour != background
        for shape in SHAPES
    ]


def random_prompts(n: int, seed: int) -> list[str]:
    """``n`` captions drawn uniformly (with replacement) from the caption space."""
    space = caption_space()
    rng = np.random.default_rng([seed, _PROMPT_STREAM])
    return [space[i] for i in rng.integers(len(space), size=n)]


# --------------------------------------------------------------------------
# Rendering


def shape_vertices(
    shape: str, centre: tuple[float, float], size_px: float, angle: float
) -> list[tuple[float, float]]:
    """Vertices (x, y) of a square or triangle in continuous pixel coordinates."""
    n = _N_SIDES[shape]
    radius = size_px / 2
    cx, cy = centre
    vertices = []
    for k in range(n):
        phi = math.radians(_VERTEX_OFFSET_DEG[shape] + angle + 360.0 * k / n)
        # The image y axis points down, so counter-clockwise subtracts from y.
        vertices.append((cx + radius * math.cos(phi), cy - radius * math.sin(phi)))
    return vertices


def _rgb(colour: str | tuple[int, int, int]) -> tuple[int, int, int]:
    """A palette name's RGB, or an RGB triple as it is."""
    return PALETTE[colour] if isinstance(colour, str) else tuple(int(c) for c in colour)


def _check_names(shape: str, shape_colour, background) -> None:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    for colour in (shape_colour, background):
        if isinstance(colour, str) and colour not in PALETTE:
            raise ValueError(f"unknown colour {colour!r}; known: {', '.join(PALETTE)}")


def render(
    shape: str,
    shape_colour: str,
    background: str,
    centre: tuple[float, float],
    size_px: float,
    angle: float,
    size: int = 64,
) -> Image.Image:
    """Render one image with explicit parameters (see the module docstring).

    Unlike :func:`render_sample` this does not enforce the dataset's rules
    (distinct colours, size range, shape inside the image).
    """
    _check_names(shape, shape_colour, background)
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), _rgb(background))
    draw = ImageDraw.Draw(image)
    # PIL puts pixel centres on integer coordinates; ours are at i + 0.5.
    cx, cy = centre[0] * SUPERSAMPLE - 0.5, centre[1] * SUPERSAMPLE - 0.5
    fill = _rgb(shape_colour)
    if shape == "circle":
        r = size_px * SUPERSAMPLE / 2
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        points = shape_vertices(shape, (cx, cy), size_px * SUPERSAMPLE, angle)
        draw.polygon(points, fill=fill)
    return image.resize((size, size), Image.Resampling.BOX)


def sample_rng(seed: int, split: str | int, index: int) -> np.random.Generator:
    """The generator for one sample; independent of every other sample's."""
    split_id = SPLITS[split] if isinstance(split, str) else int(split)
    return np.random.default_rng([seed, split_id, index])


def sample_params(rng: np.random.Generator, size: int = 64, colours: str = "palette") -> dict:
    """Draw a sample's parameters: the ``meta`` dict of :func:`render_sample`.

    ``colours="any"`` draws both colours uniformly from the RGB cube (at least
    ``MIN_RGB_CONTRAST`` apart) instead of from the palette: the first stage's training
    data, so that it represents colours the captions never name (a style's)."""
    if colours == "any":
        background, shape_colour = _any_colour_pair(rng)
    elif colours == "palette":
        names = list(PALETTE)
        background = names.pop(int(rng.integers(len(names))))
        shape_colour = names[int(rng.integers(len(names)))]
    else:
        raise ValueError(f"colours must be 'palette' or 'any', got {colours!r}")
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    if SIZE_RANGE[1] * size + 2 * EDGE_MARGIN_PX > size:
        raise ValueError(f"image size {size} is too small for the shapes dataset")
    size_px = float(rng.uniform(*SIZE_RANGE)) * size
    low = size_px / 2 + EDGE_MARGIN_PX
    centre = (float(rng.uniform(low, size - low)), float(rng.uniform(low, size - low)))
    # Rotations beyond one symmetry period would give the same image.
    angle = float(rng.uniform(0.0, 360.0 / _N_SIDES[shape])) if shape in _N_SIDES else 0.0
    return {
        "shape": shape,
        "shape_colour": shape_colour,
        "background": background,
        "centre": centre,
        "size_px": size_px,
        "angle": angle,
    }


def _any_colour_pair(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    background = tuple(int(c) for c in rng.integers(0, 256, 3))
    while True:
        shape = tuple(int(c) for c in rng.integers(0, 256, 3))
        if np.linalg.norm(np.subtract(shape, background)) >= MIN_RGB_CONTRAST:
            return background, shape


def render_sample(
    rng: np.random.Generator, size: int = 64, colours: str = "palette"
) -> tuple[Image.Image, dict]:
    """Draw random parameters from ``rng`` and render them: ``(image, meta)``.

    ``meta`` has shape, shape_colour, background, centre (x, y), size_px and
    angle; ``caption(meta["shape_colour"], meta["shape"], meta["background"])``
    is the image's caption.
    """
    meta = sample_params(rng, size, colours)
    return render(size=size, **meta), meta
