"""Reading image files robustly: any mode to RGB, EXIF orientation, and an up-front readability scan.

The scan is one cheap pass (docs/data.md): each file's bytes are read once, hashed (the run's content hash
then reads no file again: finetunekit.filehash) and checked without a full decode where the format allows:
the header (Pillow's open: format, size, mode, the decompression-bomb limit), then, for JPEG, an
end-of-image marker after the start of the scan data, for PNG every chunk through IEND. A file that fails
that check (a truncated one), and every file of another format, is decoded in full, as the scan always
did, and that decode decides: the cheap check never rejects a file a full decode accepts. What only a full
decode finds in a complete-looking file (a JPEG whose entropy-coded data holds a stray marker, a PNG whose
compressed data is damaged) is found during training: the sample is replaced and counted
(data.ImageDataset).
"""

from __future__ import annotations

import hashlib
import io
import logging
import multiprocessing
import os
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from PIL import Image

from ..filehash import remember
from ..imagefiles import load_rgb, to_rgb  # noqa: F401 - re-exported

log = logging.getLogger("finetunekit")

# to_rgb and load_rgb live in the torch-free finetunekit.imagefiles (the ONNX runtime path reads images too)

_EOI = b"\xff\xd9"  # JPEG end of image; inside entropy-coded data 0xFF is always followed by 0x00 or RSTn


@dataclass
class ScanReport:
    """Which files are readable, which are not (and why), and which modes were converted."""

    ok: list[bool]
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    modes: Counter = field(default_factory=Counter)


def _reason(e: BaseException) -> str:
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    return f"{type(e).__name__}: {reason}"


def _png_complete(data: bytes) -> bool:
    """Whether a PNG's chunks are all there, through IEND (their CRCs are not checked: a full decode does
    not check them either)."""
    pos, n = 8, len(data)
    while pos + 8 <= n:
        end = pos + 12 + int.from_bytes(data[pos:pos + 4], "big")
        if end > n:
            return False
        if data[pos + 4:pos + 8] == b"IEND":
            return True
        pos = end
    return False


def _looks_complete(im: Image.Image, data: bytes) -> bool:
    """Whether the opened image `im` (its file's bytes: `data`) is complete by a check that decodes nothing:
    JPEG: an end-of-image marker after the start of the scan data (where Pillow's open stopped reading);
    PNG: every chunk through IEND. False for other formats."""
    if im.format in ("JPEG", "MPO"):
        return data.find(_EOI, im.fp.tell()) >= 0
    if im.format == "PNG":
        return _png_complete(data)
    return False


def _check(path: str) -> tuple[str | None, str, tuple[int, int, str] | None]:
    """(why `path` is unreadable or None, its mode, (size, mtime_ns, SHA-256) of the bytes read or None)."""
    seen = None
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
        seen = st.st_size, st.st_mtime_ns, hashlib.sha256(data).hexdigest()
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > Image.MAX_IMAGE_PIXELS:
                return f"too many pixels ({im.width}x{im.height}): possible decompression bomb", "", seen
            mode = im.mode
            if not _looks_complete(im, data):
                im.load()  # other formats, and a file the cheap check doubts: a full decode decides
        return None, mode, seen
    except Exception as e:  # noqa: BLE001 - any failure means "unreadable"; the reason is reported
        return _reason(e), "", seen


def _check_all(paths: list[str]) -> list[tuple]:
    return [_check(p) for p in paths]


PROCESSES_FROM = 2000  # files: below this a pool costs more than it saves


def scan_images(paths: list[str], processes: int | None = None) -> ScanReport:
    """Check every file once: one read, its hash, its header. The check is Python-bound (Pillow parses headers
    in Python), so threads would only contend for the GIL: large lists go to forked worker processes (one a
    core, up to 8; Linux), in chunks; the digests come back and are remembered (finetunekit.filehash)."""
    n = processes or min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    if n > 1 and len(paths) >= PROCESSES_FROM and sys.platform.startswith("linux"):
        chunks = [paths[i:i + 256] for i in range(0, len(paths), 256)]
        with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("fork")) as pool:
            results = [r for part in pool.map(_check_all, chunks) for r in part]
    else:
        results = _check_all(paths)
    report = ScanReport(ok=[err is None for err, _, _ in results])
    for path, (err, mode, seen) in zip(paths, results):
        if seen is not None:
            remember(path, *seen)
        if err is None:
            report.modes[mode] += 1
        else:
            report.bad.append((path, err))
    return report
