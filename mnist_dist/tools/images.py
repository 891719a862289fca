"""Turn any image file (PNG/JPEG, any size, colour or grey) into a 28x28 MNIST-style digit.

The way MNIST itself was made: the digit's bounding box is scaled to fit a 20x20 box keeping its
aspect ratio (anti-aliased, so edges become grey levels), then placed in a 28x28 field so that its
centre of mass sits at the centre. White digit on a black background; a dark-on-light picture
(ink on paper) is detected from its border and inverted, or the polarity is forced.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from ..data.mnist import IMAGE_SIDE

POLARITIES = ("auto", "light-on-dark", "dark-on-light")
DIGIT_BOX = 20  # MNIST fits the digit into 20x20, then centres it by mass in 28x28
INK_THRESHOLD = 0.2  # fraction of the stretched intensity range that counts as ink for the bounding box
MAX_PIXELS = 64_000_000  # larger images are refused before decoding (a 64-megapixel photo decodes to 256 MB)


class ImageError(Exception):
    """This one file cannot be turned into a digit (unreadable, not an image, too large, blank)."""


def read_grey(path: str | os.PathLike) -> torch.Tensor:
    """The file as float luminance in [0, 1], shape [H, W]; transparency is flattened away. An image of
    more than ``MAX_PIXELS`` is refused from its header, before it is decoded (a decompression bomb:
    a small file whose header claims 30000x30000 pixels)."""
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # PIL's own limit (~89 megapixels) only warns: an error here
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            if img.width * img.height > MAX_PIXELS:
                raise ImageError(f"too large: {img.width}x{img.height} pixels, more than "
                                 f"{MAX_PIXELS // 1_000_000} megapixels (refused before decoding)")
            img = ImageOps.exif_transpose(img)
            img.load()
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                alpha = torch.from_numpy(np.asarray(rgba.getchannel("A"), dtype=np.float32))
                grey = torch.from_numpy(np.asarray(rgba.convert("L"), dtype=np.float32))
                # put the opaque strokes on a background that contrasts with them
                opaque = alpha > 127
                ink = grey[opaque].mean() if opaque.any() else torch.tensor(0.0)
                background = (255, 255, 255, 255) if ink < 128 else (0, 0, 0, 255)
                flat = Image.new("RGBA", rgba.size, background)
                flat.alpha_composite(rgba)
                img = flat
            grey_img = img.convert("L")
            width, height = grey_img.size
            pixels = torch.frombuffer(bytearray(grey_img.tobytes()), dtype=torch.uint8)
    except FileNotFoundError:
        raise ImageError("no such file") from None
    except IsADirectoryError:
        raise ImageError("is a directory, not an image file") from None
    except UnidentifiedImageError:
        raise ImageError("not a readable image (PNG/JPEG expected)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"too large: {' '.join(str(exc).split())[:160]} (refused before decoding)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"cannot read image: {' '.join(str(exc).split())[:160]}") from None
    if width == 0 or height == 0:
        raise ImageError("empty image")
    return pixels.view(height, width).to(torch.float32) / 255.0


def is_dark_on_light(grey: torch.Tensor) -> bool:
    """The background (the median of the border pixels) is lighter than mid-grey."""
    border = torch.cat([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    return bool(border.median() > 0.5)


def to_mnist(grey: torch.Tensor, polarity: str = "auto") -> torch.Tensor:
    """[H, W] luminance in [0, 1] → [1, 28, 28] float in [0, 1], white digit centred on black."""
    if polarity not in POLARITIES:
        raise ValueError(f"polarity must be one of {POLARITIES}, got {polarity!r}")
    invert = is_dark_on_light(grey) if polarity == "auto" else polarity == "dark-on-light"
    ink = 1.0 - grey if invert else grey
    # background to 0, strongest stroke to 1 (paper is rarely pure white, ink rarely pure black)
    flat = ink.flatten()
    low, high = flat[::max(1, len(flat) // 1_000_000)].median().item(), ink.max().item()
    if high - low < 0.1:
        raise ImageError("no digit found (the image is blank or has almost no contrast)")
    ink = ((ink - low) / (high - low)).clamp(0, 1)
    rows = (ink > INK_THRESHOLD).any(dim=1).nonzero().flatten()
    cols = (ink > INK_THRESHOLD).any(dim=0).nonzero().flatten()
    digit = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    # scale the bounding box to fit 20x20, keeping the aspect ratio
    h, w = digit.shape
    scale = DIGIT_BOX / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    digit = F.interpolate(digit[None, None], size=(new_h, new_w), mode="bilinear", antialias=True,
                          align_corners=False)[0, 0].clamp(0, 1)
    # centre of mass to the centre of the 28x28 field, clamped so the digit stays whole
    total = digit.sum()
    cy = (digit.sum(dim=1) * torch.arange(new_h)).sum() / total
    cx = (digit.sum(dim=0) * torch.arange(new_w)).sum() / total
    centre = (IMAGE_SIDE - 1) / 2
    top = int(min(max(round(centre - cy.item()), 0), IMAGE_SIDE - new_h))
    left = int(min(max(round(centre - cx.item()), 0), IMAGE_SIDE - new_w))
    out = torch.zeros(IMAGE_SIDE, IMAGE_SIDE)
    out[top:top + new_h, left:left + new_w] = digit
    return out[None]


def load_digit(path: str | os.PathLike, polarity: str = "auto") -> torch.Tensor:
    """An image file → [1, 28, 28] float in [0, 1], ready for the classifier (or ``model.pt2``)."""
    return to_mnist(read_grey(path), polarity)
