"""Image bytes from untrusted files (shards, folders) opened so that no pixel is made before the
header's claims are checked: a 142-byte PNG can claim 1 x 32000 pixels, which the transform's
resize-to-cover would make 64 x 2 048 000 at 64 px (393 MiB), 31 GiB at 512 px. PIL only, no
torch: the folder tool uses it too."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

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
