"""Image transforms for training: resize to cover the target (the shorter side for a square),
crop, optional flip, scale to [-1, 1]. Images from files are opened and checked first by
`ldm.data.images.open_image`."""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image


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
        return self.apply(image, target)[0]

    def apply(
        self, image: Image.Image, target: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, tuple[int, int], int]:
        """(the tensor, the crop's (top, left) in the resized image's pixels, that image's
        width): with the original and the target size, the crop is SDXL's micro-conditioning
        of the sample. A flipped sample's left is the crop's left in the flipped resized image
        (`mirrored_left`), which is the crop the flipped pixels actually show."""
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
            left = mirrored_left(left, tw, w)
        arr = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # (H, W, 3)
        return arr.permute(2, 0, 1).float().div_(127.5).sub_(1.0), (top, left), w


def mirrored_left(left: int, crop_width: int, width: int) -> int:
    """The left edge of a crop once the image it was cut from is mirrored."""
    return width - left - crop_width


def time_ids(
    original: tuple[int, int], crop: tuple[int, int], target: tuple[int, int]
) -> torch.Tensor:
    """SDXL's six micro-conditioning numbers (original height, width, crop top, left, target
    height, width) of one sample; every size given as (height, width)."""
    return torch.tensor([*original, *crop, *target], dtype=torch.float32)


def original_size(meta: dict | None, image: Image.Image) -> tuple[int, int]:
    """(height, width) of the image before any resize: img2dataset's `original_height` /
    `original_width` where the shard's metadata has them (its images may be resized already),
    else the image's own size (read before any reduced-scale decoding)."""
    h, w = (meta or {}).get("original_height"), (meta or {}).get("original_width")
    if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
        return h, w
    return image.size[1], image.size[0]
