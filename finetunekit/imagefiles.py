"""Reading images without torch: any Pillow mode to upright 8-bit RGB, and the image files a predict input
names. Torch-free on purpose: `finetunekit predict` on an exported ONNX model (finetunekit.runtime) uses it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps

from .errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")

# Pillow refuses images over 2x this many pixels (decompression bombs); the scan skips those over 1x.
Image.MAX_IMAGE_PIXELS = 89_478_485


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB: 16/32-bit grayscale rescaled, transparency composited on white."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float32)
        peak = float(a.max()) if a.size else 0.0
        # 16-bit data -> /257; values already in 0..255 stay; float images in 0..1 are scaled up
        if im.mode.startswith("I;16") or peak > 255:
            top = 65535.0
        elif im.mode == "F" and peak <= 1.0:
            top = 1.0
        else:
            top = 255.0
        im = Image.fromarray(np.clip(a * (255.0 / top), 0, 255).round().astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV -> RGB


def load_rgb(path: str | os.PathLike | BinaryIO) -> Image.Image:
    """Open an image file (a path, or a binary file object: a shard member's bytes) as upright 8-bit RGB."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        return to_rgb(im)


def no_images(where: str) -> str:
    return f"{where}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})"


def images_under(folder: str | os.PathLike) -> list[str]:
    """The image files (by suffix) in `folder` and its sub-folders, hidden names skipped, sorted."""
    out = []
    for parent, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        out += [os.path.join(parent, n) for n in names
                if not n.startswith(".") and os.path.splitext(n)[1].lower() in IMAGE_SUFFIXES]
    return sorted(out)


def expand_inputs(images: Any) -> list[Any]:
    """A path, a folder (its image files, sorted, recursively), or a sequence of those and of images."""
    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
        images = [images]
    out: list[Any] = []
    for item in images:
        if isinstance(item, (str, os.PathLike)):
            p = Path(item)
            if p.is_dir():
                out += sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
            elif p.is_file():
                out.append(str(p))
            else:
                raise UserError(f"{p}: no such file or folder")
        else:
            out.append(item)
    return out
