"""Images for the report: the original file (un-augmented) read, turned upright, made RGB and resized to a
small thumbnail; small images are enlarged by a whole factor with nearest-neighbour (pixels stay sharp)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from ..imagefiles import load_rgb

SIZE = 112  # the thumbnail's longer side, px


def locate(item: str, run_dir: Path) -> Path | None:
    """The file a predictions row names: as written (absolute or relative to the working folder), else
    relative to the run directory."""
    for p in (Path(item), run_dir / item):
        if p.is_file():
            return p
    return None


def fit(image: Image.Image, size: int = SIZE) -> Image.Image:
    w, h = image.size
    scale = size / max(w, h)
    if scale >= 2:
        k = int(scale)
        return image.resize((w * k, h * k), Image.Resampling.NEAREST)
    if scale < 1:
        image = image.copy()
        image.thumbnail((size, size), Image.Resampling.LANCZOS)
    return image


def thumbnail(path: Path, size: int = SIZE) -> Image.Image:
    return fit(load_rgb(path), size)
