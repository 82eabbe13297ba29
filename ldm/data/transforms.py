"""Image transforms for training: resize to cover the target (the shorter side for a square),
crop, optional flip, scale to [-1, 1]; and the header check every image read from untrusted
files passes before any pixel is made (`open_image`)."""

from __future__ import annotations

import io
import math
import random
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

# 2**26 = 67 Mpx (8192 x 8192): above any photo a training set holds (a 48 Mpx phone photo, an
# 8K frame's 33 Mpx), below PIL's own bomb limit (Image.MAX_IMAGE_PIXELS, 89 Mpx, where PIL only
# warns; it raises at twice that). Decoded, such an image is at most 256 MiB (RGBA).
MAX_PIXELS = 2**26
# The transform resizes an image to cover the target before cropping, so an r:1 image becomes
# size x r*size pixels: a 1 x 32000 strip at 64 px would be 64 x 2 048 000 (393 MiB). At 10:1
# a 512 px target is 512 x 5120 (7.5 MiB); wide panoramas (2:1 to 8:1) pass, banner strips
# and pathological shapes do not.
MAX_ASPECT = 10.0


class ImageRejected(ValueError):
    """An image refused from its header alone; `reason` is one of the filters' REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class ImageLimits:
    """What an image's header may claim: pixels (width x height) and aspect ratio (long side /
    short side). PIL's Image.MAX_IMAGE_PIXELS still applies above `max_pixels`."""

    max_pixels: int = MAX_PIXELS
    max_aspect: float = MAX_ASPECT

    def rejection(self, width: int, height: int) -> str | None:
        if width * height > self.max_pixels:
            return "too_many_pixels"
        if max(width, height) > self.max_aspect * max(1, min(width, height)):
            return "bad_aspect"
        return None


def open_image(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """The image in `data`, opened lazily (its header read, nothing decoded) and checked: an
    `ImageRejected` for too many pixels or too extreme a shape (PIL's decompression-bomb warning
    or error counts as too many pixels), else any PIL error for what is not an image."""
    with warnings.catch_warnings():
        # the warning is PIL's limit passed: an error here, so it is counted, not printed
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageRejected("too_many_pixels", str(e)) from None
    reason = limits.rejection(*image.size)
    if reason is not None:
        image.close()
        raise ImageRejected(reason, f"{image.size[0]} x {image.size[1]} pixels")
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (P, L, LA, RGBA, CMYK, I;16 ...) -> RGB; transparency composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode.startswith("I;16") or image.mode == "I":
        arr = np.asarray(image, dtype=np.float32)
        return Image.fromarray((arr / max(arr.max(), 1) * 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


class ImageTransform:
    """PIL image -> (3, H, W) float tensor in [-1, 1]: (size, size), or a bucket's (W, H)."""

    def __init__(
        self, size: int = 64, random_crop: bool = False, flip: bool = False, draft: bool = True
    ) -> None:
        self.size, self.random_crop, self.flip, self.draft = size, random_crop, flip, draft

    def __call__(self, image: Image.Image, target: tuple[int, int] | None = None) -> torch.Tensor:
        tw, th = target or (self.size, self.size)
        w, h = image.size
        scale = max(tw / w, th / h)  # cover the target, then crop the overhang
        if self.draft and image.format == "JPEG" and scale < 0.5:
            # decode at 1/2, 1/4 or 1/8 scale in the DCT (never below the cover size): most of a
            # large JPEG's decoding time is saved, and bicubic finishes the resize
            image.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
            w, h = image.size
            scale = max(tw / w, th / h)
        image = to_rgb(image)
        if scale != 1:
            image = image.resize(
                (max(tw, round(w * scale)), max(th, round(h * scale))),
                Image.BICUBIC,
                reducing_gap=3.0,
            )
        w, h = image.size
        if self.random_crop:
            left, top = random.randint(0, w - tw), random.randint(0, h - th)
        else:
            left, top = (w - tw) // 2, (h - th) // 2
        image = image.crop((left, top, left + tw, top + th))
        if self.flip and random.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        arr = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # (H, W, 3)
        return arr.permute(2, 0, 1).float().div_(127.5).sub_(1.0)
