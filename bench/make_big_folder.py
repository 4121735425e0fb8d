"""A large image folder for the start-up and streaming benchmarks: real CIFAR-10 mini photos, upscaled.

Each of N images is one of the 6,000 CIFAR-10 mini images (train and test, 32x32), a seeded random crop of it
(24-32 px, mirrored half the time) resized with bicubic interpolation to a seeded side of 128-224 px and saved
as a JPEG (quality 90) in its class folder: train/<class>/<i>.jpg. Every file's bytes differ. Then a few
damaged files are added (docs/data.md lists what each is and which scan rejects it):

    train/airplane/zz-truncated-{half,90pct,minus2}.jpg   JPEGs cut short (any scan rejects them)
    train/airplane/zz-empty.jpg, zz-text.jpg              not images
    train/automobile/zz-truncated.png                     a PNG cut short
    train/automobile/zz-stray-marker.jpg                  a complete-looking JPEG with a stray SOI marker in its
                                                          scan data (only a full decode finds it)

    python bench/make_big_folder.py --out /work/bigdata/cifar-big --count 50000

Never under the shared data folder. An existing --out is refused unless --overwrite.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

SOURCE = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cifar10-mini"


def sources(root: Path) -> list[tuple[Path, str]]:
    return [(p, p.parent.name) for split in ("train", "test") for p in sorted((root / split).glob("*/*.jpg"))]


def damaged(out: Path) -> list[Path]:
    """The damaged files, from an upscaled photo of the folder itself."""
    made = []
    good = sorted((out / "train" / "airplane").glob("*.jpg"))[0].read_bytes()
    n = len(good)
    for name, data in (("zz-truncated-half.jpg", good[:n // 2]), ("zz-truncated-90pct.jpg", good[:n * 9 // 10]),
                       ("zz-truncated-minus2.jpg", good[:-2]), ("zz-empty.jpg", b""),
                       ("zz-text.jpg", b"this is not an image\n")):
        made.append(out / "train" / "airplane" / name)
        made[-1].write_bytes(data)
    png = io.BytesIO()
    Image.open(io.BytesIO(good)).save(png, format="PNG")
    made.append(out / "train" / "automobile" / "zz-truncated.png")
    made[-1].write_bytes(png.getvalue()[: len(png.getvalue()) * 2 // 3])
    made.append(out / "train" / "automobile" / "zz-stray-marker.jpg")
    made[-1].write_bytes(good[:n // 2] + b"\xff\xd8" + good[n // 2 + 2:])
    return made


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--count", type=int, default=50_000)
    ap.add_argument("--min-side", type=int, default=128)
    ap.add_argument("--max-side", type=int, default=224)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    if SOURCE.parent in out.parents:
        ap.error(f"--out {out}: not under the shared data folder")
    if out.exists():
        if not args.overwrite:
            ap.error(f"--out {out}: exists (--overwrite replaces it)")
        shutil.rmtree(out)
    src = sources(SOURCE)
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    for i in range(args.count):
        path, label = src[i % len(src)]
        crop = int(rng.integers(24, 33))
        x, y = (int(v) for v in rng.integers(0, 33 - crop, 2))
        side = int(rng.integers(args.min_side, args.max_side + 1))
        with Image.open(path) as im:
            im = im.convert("RGB").crop((x, y, x + crop, y + crop))
        if rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        target = out / "train" / label / f"{i:06d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        im.resize((side, side), Image.Resampling.BICUBIC).save(target, quality=90)
    bad = damaged(out)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"SUMMARY make-big-folder: {args.count} images + {len(bad)} damaged in {out} ({total / 2**20:.0f} MB) "
          f"in {time.perf_counter() - started:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
