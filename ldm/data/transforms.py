"""Image transforms for training: resize the shorter side, crop, optional flip, scale to [-1, 1]."""
from __future__ import annotations

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
    """PIL image -> (3, size, size) float tensor in [-1, 1]."""

    def __init__(self, size: int = 64, random_crop: bool = False, flip: bool = False) -> None:
        self.size, self.random_crop, self.flip = size, random_crop, flip

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = to_rgb(image)
        w, h = image.size
        scale = self.size / min(w, h)
        if scale != 1:
            image = image.resize((max(self.size, round(w * scale)), max(self.size, round(h * scale))),
                                 Image.BICUBIC, reducing_gap=3.0)
        w, h = image.size
        if self.random_crop:
            left, top = random.randint(0, w - self.size), random.randint(0, h - self.size)
        else:
            left, top = (w - self.size) // 2, (h - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        if self.flip and random.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        arr = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # (H, W, 3)
        return arr.permute(2, 0, 1).float().div_(127.5).sub_(1.0)
