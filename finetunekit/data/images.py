"""Reading image files robustly: any mode to RGB, EXIF orientation, and an up-front readability scan."""

from __future__ import annotations

import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..imagefiles import load_rgb, to_rgb  # noqa: F401 - re-exported

log = logging.getLogger("finetunekit")

# to_rgb and load_rgb live in the torch-free finetunekit.imagefiles (the ONNX runtime path reads images too)


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
