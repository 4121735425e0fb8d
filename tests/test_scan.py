"""The one-pass start-up scan: it rejects exactly what a full decode rejects (truncation in every format),
hashes each file while reading it once (the content hash and every cache key stay the same), and what only a
full decode finds is replaced and counted during training."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import finetunekit
from finetunekit import filehash
from finetunekit.checkpoint import content_hash
from finetunekit.data import ImageDataset, Split, make_loader, unreadable
from finetunekit.data.images import scan_images

from conftest import CIFAR


def _full_decode_ok(data: bytes) -> bool:
    """The scan's reference: what the scan before this change did to every file (open, then a full decode)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001
        return False


def _encoded(fmt: str, size=(40, 30)) -> bytes:
    a = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(a).save(out, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def _damaged(data: bytes) -> dict[str, bytes]:
    n = len(data)
    return {"whole": data, "cut-half": data[:n // 2], "cut-90%": data[:n * 9 // 10], "cut-1": data[:-1],
            "cut-2": data[:-2], "cut-12": data[:-12], "trailing-bytes": data + b"\0" * 64 + b"junk",
            "header-zeroed": data[:2] + b"\0" * 40 + data[42:]}


def test_the_scan_rejects_exactly_what_a_full_decode_rejects(tmp_path):
    files, expected = [], []
    for fmt, ext in (("JPEG", "jpg"), ("PNG", "png"), ("GIF", "gif"), ("BMP", "bmp"), ("WEBP", "webp"),
                     ("TIFF", "tif")):
        for name, data in _damaged(_encoded(fmt)).items():
            p = tmp_path / f"{fmt}-{name}.{ext}"
            p.write_bytes(data)
            files.append(str(p))
            expected.append(_full_decode_ok(data))
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image\n")
    files += [str(tmp_path / "empty.jpg"), str(tmp_path / "text.jpg")]
    expected += [False, False]
    report = scan_images(files)
    assert report.ok == expected
    assert sum(expected) == 17 and len(expected) == 50  # pinned: the set of cases means what it says
    # a truncated JPEG and PNG are both rejected with the decoder's own reason
    bad = dict(report.bad)
    assert bad[str(tmp_path / "JPEG-cut-half.jpg")].startswith("OSError: image file is truncated")
    assert bad[str(tmp_path / "PNG-cut-half.png")].startswith("OSError: image file is truncated")


def test_damage_only_a_full_decode_finds_passes_the_scan(tmp_path):
    """The documented limit (docs/data.md): a stray marker inside a JPEG's scan data, a damaged byte inside a
    PNG's compressed data. A full decode rejects them; the scan, which does not decode complete-looking
    files, lets them through, and training replaces and counts them."""
    jpeg = _encoded("JPEG", (160, 160))
    stray = jpeg[:2000] + b"\xff\xd8" + jpeg[2002:]
    png = bytearray(_encoded("PNG"))
    png[len(png) // 2] ^= 0x55
    for name, data in (("stray.jpg", stray), ("flip.png", bytes(png))):
        (tmp_path / name).write_bytes(data)
        assert not _full_decode_ok(data)
    assert scan_images([str(tmp_path / "stray.jpg"), str(tmp_path / "flip.png")]).ok == [True, True]


def test_the_scan_hashes_each_file_once_and_the_content_hash_is_unchanged(tmp_path, monkeypatch):
    paths = []
    for i in range(5):
        p = tmp_path / "c" / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), (i, 2 * i, 99)).save(p)
        paths.append(p)
    expected = content_hash({"train": paths})  # computed by reading the files (nothing remembered yet)
    want = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    scan_images([str(p) for p in paths])

    def no_second_read(*args):
        raise AssertionError("a file was read a second time")

    monkeypatch.setattr(filehash, "_sha256_file", no_second_read)
    assert [filehash.sha256_file(p) for p in paths] == want
    assert content_hash({"train": paths}) == expected  # the same digests: cache keys and fingerprints unchanged
    monkeypatch.undo()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(paths[0])  # changed after the scan: hashed again
    assert filehash.sha256_file(paths[0]) == hashlib.sha256(paths[0].read_bytes()).hexdigest() != want[0]


def _stray_marker_jpeg(path: Path) -> Path:
    Image.effect_noise((64, 64), 40).convert("RGB").save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2] + b"\xff\xd8" + data[len(data) // 2 + 2:])
    return path


def test_a_file_that_fails_to_decode_in_training_is_replaced_and_counted(tmp_path):
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(paths[-1])
    _stray_marker_jpeg(tmp_path / "1.png")  # a JPEG under a .png name: Pillow reads by content
    paths[1] = tmp_path / "1.png"
    ds = ImageDataset(Split([str(p) for p in paths], [0, 1, 2, 3]), lambda im: torch.tensor(im.getpixel((0, 0))))
    x, y = ds[1]
    assert y == 2 and x.tolist() == [120, 0, 0]  # the next image of the split, with its own label
    assert unreadable([ds]) == 1
    fresh = ImageDataset(ds_split := Split([str(p) for p in paths], [0, 1, 2, 3]), ds.transform)
    batches = list(make_loader(fresh, 4, train=False, workers=1, seed=0))  # counted in a worker process
    assert batches[0][1].tolist() == [0, 2, 2, 3] and unreadable([fresh]) == 1 and len(ds_split) == 4


def test_fit_counts_images_that_fail_to_decode_in_metrics(tmp_path):
    cifar = CIFAR / "train"
    if not cifar.is_dir():
        pytest.skip(f"{cifar} not found")
    rows = [(str(p), c) for c in ("airplane", "cat") for p in sorted((cifar / c).glob("*.jpg"))[:20]]
    rows[3] = (str(_stray_marker_jpeg(tmp_path / "stray.jpg")), "airplane")
    with open(tmp_path / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *rows])
    run = finetunekit.fit({"data": {"path": str(tmp_path / "train.csv"), "image_size": 32, "num_workers": 0,
                                    "val_fraction": 0.25, "cache_images": "off"},
                           "model": {"name": "timm:test_efficientnet", "pretrained": False},
                           "train": {"epochs": 1, "batch_size": 8, "seed": 0, "strategy": "full"}, "quiet": True,
                           "out": str(tmp_path / "run")})
    metrics = json.loads((run.run_dir / "metrics.json").read_text())
    assert metrics["skipped"] == 0 and metrics["unreadable_in_training"] == 1
    assert "stray.jpg: cannot be decoded" in (run.run_dir / "log.txt").read_text()


def test_a_pool_of_processes_scans_and_remembers_as_one_process_does(tmp_path, monkeypatch):
    from finetunekit.data import images

    paths = []
    for i in range(6):
        p = tmp_path / f"{i}.jpg"
        p.write_bytes(_encoded("JPEG")[: None if i % 3 else 500])  # every third one truncated
        paths.append(str(p))
    serial = scan_images(paths, processes=1)
    filehash._known.clear()
    monkeypatch.setattr(images, "PROCESSES_FROM", 0)
    pooled = scan_images(paths, processes=2)
    assert pooled == serial and pooled.ok == [False, True, True, False, True, True]
    assert all(filehash._known.get((p, os.stat(p).st_size, os.stat(p).st_mtime_ns)) ==
               hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths)  # remembered in the parent
