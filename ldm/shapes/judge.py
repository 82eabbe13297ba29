"""Prompt adherence on the shapes dataset, judged by image analysis.

``judge`` reads back the three attributes of a caption from an image:

* background: the palette colour nearest to the median of the border pixels;
* shape colour: the palette colour (other than the background) nearest to
  the median of the interior of the main foreground blob, i.e. the largest
  connected region of pixels far from the background colour;
* shape: each pixel's coverage is estimated by projecting its colour on the
  line from the background to the shape colour, and the coverage map is
  compared (soft intersection over union) with an ideal circle, square and
  triangle of the same area and centroid, squares and triangles over all
  rotations.  The best fit wins, unless even that one is poor (noise, no
  shape, several blobs), which gives "none".

Comparing whole templates rather than a single feature such as corners or
the largest radius keeps the judgement stable on blurry, noisy or slightly
misshapen generated images.  Only numpy is needed.

Command line::

    python -m ldm.shapes.judge DIR [--json out.json]

scores every PNG in DIR against its prompt, read from the PNG text chunk
``prompt`` or else from a sidecar ``.txt`` file of the same name.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ldm.config import exit_on
from ldm.shapes.render import PALETTE, SHAPES, parse_caption

ATTRIBUTES: tuple[str, ...] = ("background", "shape_colour", "shape")
NONE = "none"

_NAMES = list(PALETTE)
_COLOURS = np.array(list(PALETTE.values()), dtype=np.float64)
# Below this RGB distance from the background a pixel is never foreground,
# whatever the colour pair, so that noise in flat regions is ignored.
_MIN_CONTRAST = 30.0
# Foreground smaller than this fraction of the image is treated as no shape.
_MIN_AREA_FRACTION = 0.002
# Soft IoU below which no template explains the foreground.
_MIN_FIT = 0.5
_ANGLE_OFFSETS_DEG = np.array([-6.0, -3.0, 0.0, 3.0, 6.0])
_SIDES = {"square": 4, "triangle": 3}
# Larger images are box-filtered down to about this side before analysis.
_ANALYSIS_SIZE = 64


# --------------------------------------------------------------------------
# Image helpers


def _as_rgb_array(image: np.ndarray | Image.Image) -> np.ndarray:
    """(H, W, 3) float64 in [0, 255]; float inputs are taken to be in [0, 1]."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    is_float = np.issubdtype(array.dtype, np.floating)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) image, got shape {array.shape}")
    array = array[..., :3].astype(np.float64)
    if is_float:
        array = np.clip(array * 255.0, 0.0, 255.0)
    return _box_downsample(array)


def _box_downsample(image: np.ndarray) -> np.ndarray:
    """Shrink large images by an integer factor to about ``_ANALYSIS_SIZE``.

    Box filtering keeps edges linear blends of the two colours, and the
    analysis needs no more resolution, so large images cost no more to judge.
    """
    factor = min(image.shape[:2]) // _ANALYSIS_SIZE
    if factor < 2:
        return image
    h, w = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    blocks = image[:h, :w].reshape(h // factor, factor, w // factor, factor, 3)
    return blocks.mean(axis=(1, 3))


def _nearest_colour(rgb: np.ndarray, exclude: str | None = None) -> str:
    distances = np.linalg.norm(_COLOURS - rgb, axis=1)
    if exclude is not None:
        distances[_NAMES.index(exclude)] = np.inf
    return _NAMES[int(np.argmin(distances))]


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 binary dilation."""
    h, w = mask.shape
    padded = np.pad(mask, 1)
    out = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            out |= padded[dy : dy + h, dx : dx + w]
    return out


def _erode(mask: np.ndarray) -> np.ndarray:
    """3x3 binary erosion (pixels outside the image count as set)."""
    return ~_dilate(~mask)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of ``mask`` (empty if ``mask`` is)."""
    if not mask.any():
        return mask
    h, w = mask.shape
    sentinel = h * w
    # Each pixel carries the index of a pixel of its component; minimising over
    # neighbours and then following those pointers converges to one label per
    # component in a few dozen vectorised steps.
    labels = np.where(mask, np.arange(h * w).reshape(h, w), sentinel)
    while True:
        new = labels.copy()
        np.minimum(new[1:], labels[:-1], out=new[1:])
        np.minimum(new[:-1], labels[1:], out=new[:-1])
        np.minimum(new[:, 1:], labels[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], labels[:, 1:], out=new[:, :-1])
        new[~mask] = sentinel
        lookup = np.append(new.ravel(), sentinel)
        new = lookup[new]
        if np.array_equal(new, labels):
            break
        labels = new
    counts = np.bincount(labels[mask])
    return labels == int(np.argmax(counts))


def _main_blob(mask: np.ndarray) -> np.ndarray:
    """Largest component after a 3x3 opening, which strips speckle noise."""
    opened = _dilate(_erode(mask))
    return _largest_component(opened if opened.any() else mask)


# --------------------------------------------------------------------------
# Colours


def _background(image: np.ndarray) -> np.ndarray:
    """Median colour of a thin border ring; the shape never covers most of it."""
    width = max(1, min(image.shape[:2]) // 32)
    border = np.concatenate(
        [
            image[:width].reshape(-1, 3),
            image[-width:].reshape(-1, 3),
            image[:, :width].reshape(-1, 3),
            image[:, -width:].reshape(-1, 3),
        ]
    )
    return np.median(border, axis=0)


def _foreground_colour(
    image: np.ndarray, background_rgb: np.ndarray, colours: np.ndarray = _COLOURS
) -> np.ndarray | None:
    """Median colour of the main blob's interior, or None without foreground; `colours` are
    the colours a shape may have (the palette)."""
    distance = np.linalg.norm(image - background_rgb, axis=2)
    # Half way to the nearest other palette colour separates even close pairs.
    palette_distance = np.linalg.norm(colours - background_rgb, axis=1)
    nearest_other = np.sort(palette_distance)[1]
    blob = _main_blob(distance > max(_MIN_CONTRAST, nearest_other / 2))
    if not blob.any():
        return None
    interior = _erode(blob)
    if interior.sum() < 4:
        # Too small to erode: keep the half of the blob farthest from the
        # background, which excludes most anti-aliased edge pixels.
        interior = blob & (distance >= np.median(distance[blob]))
    return np.median(image[interior], axis=0)


def _coverage(image: np.ndarray, background_rgb: np.ndarray, shape_rgb: np.ndarray) -> np.ndarray:
    """Per-pixel shape coverage in [0, 1], restricted to around the main blob.

    Anti-aliased and blurred edges are linear blends of the two colours, so
    projecting onto the background-to-shape line recovers the coverage.
    """
    axis = shape_rgb - background_rgb
    norm = float(axis @ axis)
    if norm < _MIN_CONTRAST**2:
        return np.zeros(image.shape[:2])
    coverage = np.clip((image - background_rgb) @ axis / norm, 0.0, 1.0)
    region = _main_blob(coverage > 0.5)
    for _ in range(2):
        region = _dilate(region)
    return coverage * region


# --------------------------------------------------------------------------
# Shape


def _orientation(coverage: np.ndarray, centre: np.ndarray, sides: int) -> float:
    """Rotation (radians) of an n-gon's edge normals, from its n-th angular moment.

    An n-gon's mass reaches farthest towards its vertices, so the phase of
    sum(w r^2 exp(i n phi)) is n times a vertex direction; the edge normals lie
    half a period away.
    """
    ys, xs = np.nonzero(coverage)
    z = (xs + 0.5 - centre[0]) + 1j * (ys + 0.5 - centre[1])
    moment = (coverage[ys, xs] * np.abs(z) ** 2 * (z / np.maximum(np.abs(z), 1e-9)) ** sides).sum()
    return float(np.angle(moment)) / sides - np.pi / sides


def _template_fit(coverage: np.ndarray, shape: str, area: float, centre: np.ndarray) -> float:
    """Best soft IoU of ``coverage`` with the shape of that area and centroid."""
    h, w = coverage.shape
    sides = _SIDES.get(shape)
    # Apothem for polygons (area = n a^2 tan(pi/n)), radius for the circle.
    if sides is None:
        inner = np.sqrt(area / np.pi)
    else:
        inner = np.sqrt(area / (sides * np.tan(np.pi / sides)))
    outer = inner if sides is None else inner / np.cos(np.pi / sides)
    x0, y0 = (np.floor(centre - outer - 2).astype(int)).clip(0)
    x1, y1 = np.ceil(centre + outer + 2).astype(int)
    window = coverage[y0 : min(y1, h), x0 : min(x1, w)]
    ys, xs = np.mgrid[y0 : y0 + window.shape[0], x0 : x0 + window.shape[1]]
    px = (xs + 0.5 - centre[0]).ravel()
    py = (ys + 0.5 - centre[1]).ravel()
    if sides is None:
        signed = np.hypot(px, py)[:, None]
    else:
        # Search a few angles around the moment estimate, which noise can bias.
        angles = _orientation(coverage, centre, sides) + np.deg2rad(_ANGLE_OFFSETS_DEG)
        signed = np.full((px.size, angles.size), -np.inf)
        for k in range(sides):
            normal = angles + 2 * np.pi * k / sides
            projection = np.outer(px, np.cos(normal)) + np.outer(py, np.sin(normal))
            np.maximum(signed, projection, out=signed)
    # A one-pixel linear ramp approximates the area of a pixel the edge crosses.
    template = np.clip(inner + 0.5 - signed, 0.0, 1.0)
    soft = window.reshape(-1, 1)
    outside = coverage.sum() - window.sum()
    iou = np.minimum(soft, template).sum(0) / (np.maximum(soft, template).sum(0) + outside)
    return float(iou.max())


def shape_fits(coverage: np.ndarray) -> dict[str, float]:
    """Soft IoU of a coverage map with each shape (all zero without foreground)."""
    area = float(coverage.sum())
    if area < _MIN_AREA_FRACTION * coverage.size:
        return {shape: 0.0 for shape in SHAPES}
    ys, xs = np.mgrid[: coverage.shape[0], : coverage.shape[1]]
    centre = np.array([(coverage * (xs + 0.5)).sum(), (coverage * (ys + 0.5)).sum()]) / area
    return {shape: _template_fit(coverage, shape, area, centre) for shape in SHAPES}


def _shape(coverage: np.ndarray) -> str:
    fits = shape_fits(coverage)
    best = max(fits, key=fits.get)
    return best if fits[best] >= _MIN_FIT else NONE


# --------------------------------------------------------------------------
# Public API


def judge(image: np.ndarray | Image.Image) -> dict[str, str]:
    """Read ``background``, ``shape_colour`` and ``shape`` back from an image.

    ``image`` is a PIL image or an (H, W, 3) array, uint8 or float in [0, 1].
    Attributes that cannot be read are ``"none"``.
    """
    array = _as_rgb_array(image)
    background_rgb = _background(array)
    background = _nearest_colour(background_rgb)
    shape_rgb = _foreground_colour(array, background_rgb)
    if shape_rgb is None:
        return {"background": background, "shape_colour": NONE, "shape": NONE}
    return {
        "background": background,
        "shape_colour": _nearest_colour(shape_rgb, exclude=background),
        "shape": _shape(_coverage(array, background_rgb, shape_rgb)),
    }


def score(
    images: Iterable[np.ndarray | Image.Image], prompts: Sequence[str]
) -> dict[str, float | int]:
    """Accuracy of each attribute, and of all three at once, over the images.

    Returns ``{"background", "shape_colour", "shape", "all"}`` as fractions in
    [0, 1] plus ``"n"``.  Raises ValueError for prompts outside the caption
    space or a count mismatch.
    """
    expected = [parse_caption(prompt) for prompt in prompts]
    correct = {name: 0 for name in (*ATTRIBUTES, "all")}
    n = 0
    for image, (shape_colour, shape, background) in zip(images, expected, strict=True):
        verdict = judge(image)
        hits = {
            "background": verdict["background"] == background,
            "shape_colour": verdict["shape_colour"] == shape_colour,
            "shape": verdict["shape"] == shape,
        }
        hits["all"] = all(hits.values())
        for name, hit in hits.items():
            correct[name] += int(hit)
        n += 1
    if n == 0:
        raise ValueError("no images to score")
    return {**{name: count / n for name, count in correct.items()}, "n": n}


# --------------------------------------------------------------------------
# Command line


def _prompt_of(path: Path, image: Image.Image) -> str | None:
    prompt = getattr(image, "text", {}).get("prompt")
    sidecar = path.with_suffix(".txt")
    if prompt is None and sidecar.is_file():
        prompt = sidecar.read_text().strip()
    return prompt


def _load_dir(directory: Path) -> tuple[list[np.ndarray], list[str], list[str]]:
    """Images with their prompts, and the names of PNGs without one (e.g. sample.py's grid)."""
    paths = sorted(p for p in directory.iterdir() if p.suffix.lower() == ".png")
    if not paths:
        raise ValueError(f"no PNG images in {directory}")
    images, prompts, skipped = [], [], []
    for path in paths:
        with Image.open(path) as image:
            prompt = _prompt_of(path, image)
            if prompt is None:
                skipped.append(path.name)
                continue
            prompts.append(prompt)
            images.append(np.asarray(image.convert("RGB")))
    if not images:
        raise ValueError(
            f"no PNG in {directory} has a 'prompt' text chunk or a .txt sidecar "
            f"(checked: {', '.join(skipped[:5])})"
        )
    return images, prompts, skipped


def format_table(result: dict[str, float | int]) -> str:
    """A small text table of the accuracies (every key but `n` is a fraction)."""
    lines = [f"{'attribute':<14}accuracy"]
    lines += [f"{name:<14}{100 * value:7.1f}%" for name, value in result.items() if name != "n"]
    lines.append(f"{'n':<14}{result['n']:8d}")
    return "\n".join(lines)


def run_cli(argv: list[str] | None, description: str, score_fn) -> int:
    """`python -m ...  DIR [--json out.json]`: score the PNGs of DIR against their prompts."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("directory", type=Path, help="directory of PNG images")
    parser.add_argument("--json", type=Path, default=None, help="also write the result as JSON")
    args = parser.parse_args(argv)
    if not args.directory.is_dir():
        raise ValueError(f"not a directory: {args.directory}")
    images, prompts, skipped = _load_dir(args.directory)
    result = score_fn(images, prompts)
    if skipped:
        print(
            f"skipped {len(skipped)} PNG(s) without a prompt: {', '.join(skipped[:5])}",
            file=sys.stderr,
        )
    print(format_table(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


@exit_on(OSError, ValueError)
def main(argv: list[str] | None = None) -> int:
    return run_cli(argv, "Shapes prompt adherence of a directory of PNGs.", score)


if __name__ == "__main__":
    sys.exit(main())
