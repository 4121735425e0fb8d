"""Reading image files robustly: any mode to RGB, EXIF orientation, and an up-front readability scan."""

from __future__ import annotations

import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

log = logging.getLogger("finetunekit")

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


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image file as upright 8-bit RGB."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        return to_rgb(im)


@dataclass
class ScanReport:
    """Which files decode, which do not (and why), and which modes were converted."""

    ok: list[bool]
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    modes: Counter = field(default_factory=Counter)


def _check(path: str) -> tuple[str | None, str]:
    try:
        with Image.open(path) as im:
            if im.width * im.height > Image.MAX_IMAGE_PIXELS:
                return f"too many pixels ({im.width}x{im.height}): possible decompression bomb", ""
            mode = im.mode
            im.load()  # a full decode: truncated files fail here, not in the middle of an epoch
        return None, mode
    except Exception as e:  # noqa: BLE001 - any failure means "unreadable"; the reason is reported
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return f"{type(e).__name__}: {reason}", ""


def scan_images(paths: list[str], threads: int | None = None) -> ScanReport:
    """Decode every file once (threads: Pillow releases the GIL while decoding)."""
    threads = threads or min(16, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(_check, paths, chunksize=64))
    report = ScanReport(ok=[err is None for err, _ in results])
    for path, (err, mode) in zip(paths, results):
        if err is None:
            report.modes[mode] += 1
        else:
            report.bad.append((path, err))
    return report
