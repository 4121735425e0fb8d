"""Tests for the data layer: image decoding, the readability scan, sources and splits, transforms, loaders.

Every image is generated in `tmp_path` with Pillow/numpy; the shared cifar10-mini set is only read.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetunekit.data import ImageDataset, make_loader
from finetunekit.data.images import ScanReport, load_rgb, scan_images, to_rgb
from finetunekit.data.sources import (
    Split,
    Splits,
    class_sort_key,
    read_labeled_files,
    resolve_splits,
    stratified_split,
)
from finetunekit.data.transforms import Preprocessing, build_transform
from finetunekit.errors import UserError

CIFAR = Path("/work/shared/data/cifar10-mini")


# --------------------------------------------------------------------------------------------------
# helpers


def save_image(path: Path, size=(8, 8), color=(10, 120, 200), mode="RGB", fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format=fmt)
    return path


def make_class_folders(root: Path, counts: dict[str, int], size=(8, 8), ext="png") -> dict[str, list[Path]]:
    """root/<class>/<i>.<ext>, each image a distinct colour; returns the files per class."""
    files: dict[str, list[Path]] = {}
    for k, (name, n) in enumerate(counts.items()):
        files[name] = [
            save_image(root / name / f"{i:03d}.{ext}", size=size, color=(k * 20 % 256, i * 7 % 256, 99))
            for i in range(n)
        ]
    return files


def write_unreadable(path: Path, kind: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "text":
        path.write_text("this is not an image\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path, format="JPEG")
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        raise ValueError(kind)
    return path


def resolve(path, val=None, test=None, fraction=0.2, seed=0, max_bad=0.0) -> Splits:
    return resolve_splits(path, val, test, fraction, seed, max_bad)


def pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im, dtype=np.int32)


def assert_rgb8(im: Image.Image, size: tuple[int, int]):
    assert isinstance(im, Image.Image)
    assert im.mode == "RGB"
    assert im.size == size
    a = np.asarray(im)
    assert a.dtype == np.uint8 and a.shape == (size[1], size[0], 3)


# --------------------------------------------------------------------------------------------------
# 1. image modes -> 8-bit RGB


def test_load_rgb_grayscale_L(tmp_path):
    p = tmp_path / "gray.png"
    Image.new("L", (7, 5), 77).save(p)
    assert Image.open(p).mode == "L"
    im = load_rgb(p)
    assert_rgb8(im, (7, 5))
    assert (pixels(im) == 77).all()


def test_load_rgb_rgba_transparent_composited_on_white(tmp_path):
    a = np.zeros((4, 6, 4), dtype=np.uint8)  # fully transparent black everywhere
    a[0, 0] = (10, 200, 30, 255)  # opaque
    a[1, 1] = (0, 0, 0, 128)  # half-transparent black -> mid gray on white
    a[2, 2] = (255, 0, 0, 0)  # fully transparent red -> white, not red
    p = tmp_path / "rgba.png"
    Image.fromarray(a, "RGBA").save(p)
    im = load_rgb(p)
    assert_rgb8(im, (6, 4))
    assert im.getpixel((5, 3)) == (255, 255, 255)
    assert im.getpixel((2, 2)) == (255, 255, 255)
    assert im.getpixel((0, 0)) == (10, 200, 30)
    half = im.getpixel((1, 1))
    assert all(abs(c - 127) <= 2 for c in half), half


def test_load_rgb_la_composited_on_white():
    a = np.zeros((2, 2, 2), dtype=np.uint8)
    a[0, 0] = (40, 255)
    im = to_rgb(Image.fromarray(a, "LA"))
    assert im.mode == "RGB"
    assert im.getpixel((0, 0)) == (40, 40, 40)
    assert im.getpixel((1, 1)) == (255, 255, 255)


def test_load_rgb_palette_with_transparency(tmp_path):
    im = Image.new("P", (5, 4), 0)
    im.putpalette([10, 20, 30, 200, 0, 0] + [0] * (256 * 3 - 6))
    im.putpixel((0, 0), 1)
    p = tmp_path / "pal.png"
    im.save(p, transparency=0)
    with Image.open(p) as check:
        assert check.mode == "P" and "transparency" in check.info
    out = load_rgb(p)
    assert_rgb8(out, (5, 4))
    assert out.getpixel((0, 0)) == (200, 0, 0)
    # palette entry 0 is transparent: white, not its palette colour (10, 20, 30)
    assert out.getpixel((3, 2)) == (255, 255, 255)


def test_load_rgb_palette_without_transparency_keeps_colours(tmp_path):
    im = Image.new("P", (3, 3), 0)
    im.putpalette([10, 20, 30] + [0] * (256 * 3 - 3))
    p = tmp_path / "pal.gif"
    im.save(p)
    out = load_rgb(p)
    assert_rgb8(out, (3, 3))
    assert out.getpixel((1, 1)) == (10, 20, 30)


def test_load_rgb_cmyk_jpeg(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 12), (0, 255, 255, 0)).save(p, quality=95)  # pure red in CMYK
    with Image.open(p) as check:
        assert check.mode == "CMYK"
    im = load_rgb(p)
    assert_rgb8(im, (16, 12))
    r, g, b = im.getpixel((8, 6))
    assert r > 230 and g < 25 and b < 25, (r, g, b)


def test_load_rgb_16bit_grayscale_png_rescaled(tmp_path):
    a = np.array([[65535, 32768, 0], [1000, 65535, 256]], dtype=np.uint16)
    p = tmp_path / "g16.png"
    Image.fromarray(a).save(p)
    with Image.open(p) as check:
        assert check.mode.startswith("I")  # 'I;16' (or 'I' on older Pillow), never 8-bit
    im = load_rgb(p)
    assert_rgb8(im, (3, 2))
    px = pixels(im)
    assert (px[..., 0] == px[..., 1]).all() and (px[..., 1] == px[..., 2]).all()
    assert px[0, 0, 0] == 255
    assert px[1, 1, 0] == 255
    assert abs(px[0, 1, 0] - 128) <= 1
    assert px[0, 2, 0] == 0
    assert px[1, 0, 0] == round(1000 * 255 / 65535)  # scaled, not clipped to 255
    assert px[1, 2, 0] <= 1  # 256/65535 of full scale, not 255 (as a naive clip would give)


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_to_rgb_16bit_modes(mode):
    dtype = "<u2" if mode == "I;16" else ">u2"
    a = np.array([[65535, 0]], dtype=dtype)
    im = Image.frombytes(mode, (2, 1), a.tobytes())
    out = to_rgb(im)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (0, 0, 0)


def test_to_rgb_float_in_unit_range():
    out = to_rgb(Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)))
    assert out.mode == "RGB"
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]  # rounded


@pytest.mark.parametrize("mode,color", [("1", 1), ("YCbCr", (128, 128, 128)), ("RGB", (1, 2, 3))])
def test_to_rgb_other_modes(mode, color):
    out = to_rgb(Image.new(mode, (3, 2), color))
    assert out.mode == "RGB" and out.size == (3, 2)


def test_load_rgb_exif_rotated_jpeg(tmp_path):
    # stored 40x20: left half red, right half blue. Orientation 6 = "rotate 90 clockwise to display",
    # so the upright image is 20x40 with the stored left half on top.
    a = np.zeros((20, 40, 3), dtype=np.uint8)
    a[:, :20] = (255, 0, 0)
    a[:, 20:] = (0, 0, 255)
    p = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(p, exif=exif, quality=95)
    with Image.open(p) as check:
        assert check.size == (40, 20)
    im = load_rgb(p)
    assert_rgb8(im, (20, 40))
    top, bottom = im.getpixel((10, 5)), im.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


def test_load_rgb_closes_file_and_returns_loaded_image(tmp_path):
    p = save_image(tmp_path / "x.png", size=(4, 4))
    im = load_rgb(p)
    os.remove(p)  # the returned image must not depend on the (now gone) file
    assert im.getpixel((0, 0)) == (10, 120, 200)


def test_load_rgb_real_cifar_files():
    if not CIFAR.is_dir():
        pytest.skip("cifar10-mini not available")
    files = sorted((CIFAR / "train" / "cat").glob("*.jpg"))[:3] + sorted((CIFAR / "test" / "ship").glob("*.jpg"))[:2]
    assert len(files) == 5
    for f in files:
        assert_rgb8(load_rgb(f), (32, 32))


# --------------------------------------------------------------------------------------------------
# 2. scan_images


def test_scan_images_reports_each_bad_file_with_reason(tmp_path):
    good_rgb = save_image(tmp_path / "good.png")
    good_l = save_image(tmp_path / "gray.png", mode="L", color=5)
    good_jpg = save_image(tmp_path / "good.jpg", size=(16, 16))
    truncated = write_unreadable(tmp_path / "trunc.jpg", "truncated")
    empty = write_unreadable(tmp_path / "empty.jpg", "empty")
    text = write_unreadable(tmp_path / "text.jpg", "text")
    missing = tmp_path / "missing.jpg"
    paths = [str(p) for p in (good_rgb, truncated, empty, good_l, text, missing, good_jpg)]

    report = scan_images(paths)
    assert isinstance(report, ScanReport)
    assert report.ok == [True, False, False, True, False, False, True]
    bad = dict(report.bad)
    assert [p for p, _ in report.bad] == [str(truncated), str(empty), str(text), str(missing)]  # input order
    for p in (truncated, empty, text, missing):
        assert bad[str(p)].strip(), f"no reason for {p}"
        assert ":" in bad[str(p)]  # "ExceptionType: message"
    assert bad[str(missing)].startswith("FileNotFoundError")
    assert bad[str(empty)].startswith("UnidentifiedImageError")
    assert bad[str(text)].startswith("UnidentifiedImageError")
    assert report.modes == Counter({"RGB": 2, "L": 1})


def test_scan_images_truncated_jpeg_is_caught_by_full_decode(tmp_path):
    p = write_unreadable(tmp_path / "trunc.jpg", "truncated")
    with Image.open(p) as im:  # the header still parses: only a full decode notices
        assert im.size == (32, 32)
    report = scan_images([str(p)])
    assert report.ok == [False]
    assert len(report.bad) == 1 and report.bad[0][0] == str(p)
    assert "OSError" in report.bad[0][1] or "truncated" in report.bad[0][1].lower()


def test_scan_images_modes_and_processes(tmp_path):
    paths = []
    for i in range(5):
        paths.append(str(save_image(tmp_path / f"rgb{i}.png")))
    for i in range(3):
        paths.append(str(save_image(tmp_path / f"la{i}.png", mode="LA", color=(1, 2))))
    paths.append(str(save_image(tmp_path / "cmyk.jpg", mode="CMYK", color=(0, 0, 0, 0))))
    for processes in (1, 4):  # 4: a pool of forked processes (when the list is long: test_scan.py)
        report = scan_images(paths, processes=processes)
        assert report.ok == [True] * 9
        assert report.bad == []
        assert report.modes == Counter({"RGB": 5, "LA": 3, "CMYK": 1})


def test_scan_images_empty_list():
    report = scan_images([])
    assert report.ok == [] and report.bad == [] and not report.modes


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_scan_images_decompression_bomb(tmp_path, monkeypatch):
    small = save_image(tmp_path / "small.png", size=(5, 5))  # 25 px: fine
    over = save_image(tmp_path / "over.png", size=(12, 12))  # 144 px: over 1x the limit
    way_over = save_image(tmp_path / "way.png", size=(20, 20))  # 400 px: over 2x, Pillow refuses
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    report = scan_images([str(small), str(over), str(way_over)])
    assert report.ok == [True, False, False]
    bad = dict(report.bad)
    assert "too many pixels (12x12)" in bad[str(over)]
    assert "DecompressionBomb" in bad[str(way_over)]


# --------------------------------------------------------------------------------------------------
# 3. resolve_splits: sources and splits


def _label_names(splits: Splits, split: Split) -> list[str]:
    return [splits.classes[i] for i in split.labels]


def test_resolve_class_folders_stratified_split(tmp_path):
    files = make_class_folders(tmp_path / "data", {"cat": 20, "dog": 20, "eel": 10})
    s = resolve(tmp_path / "data", fraction=0.2, seed=3)
    assert s.classes == ["cat", "dog", "eel"]
    assert s.test is None
    assert s.skipped == []
    # sizes: round(20*.2)=4, 4, round(10*.2)=2
    val_counts = Counter(_label_names(s, s.val))
    assert val_counts == {"cat": 4, "dog": 4, "eel": 2}
    assert Counter(_label_names(s, s.train)) == {"cat": 16, "dog": 16, "eel": 8}
    # no overlap, nothing lost
    all_files = {str(p) for fs in files.values() for p in fs}
    assert not set(s.train.paths) & set(s.val.paths)
    assert set(s.train.paths) | set(s.val.paths) == all_files
    assert len(s.train.paths) + len(s.val.paths) == len(all_files)
    # labels match the folder each file is in
    for split in (s.train, s.val):
        assert len(split.paths) == len(split.labels)
        for p, name in zip(split.paths, _label_names(s, split)):
            assert Path(p).parent.name == name
    # the record
    rec = s.record
    assert rec["val"]["files"] == s.val.paths
    assert rec["val"]["fraction"] == 0.2 and rec["val"]["seed"] == 3
    assert rec["val"]["count"] == len(s.val) == 10
    assert "stratified" in rec["val"]["from"] and str(tmp_path / "data") in rec["val"]["from"]
    assert rec["train"] == {"from": str(tmp_path / "data"), "count": 40}
    assert rec["test"] is None


def test_resolve_stratified_split_is_seeded(tmp_path):
    make_class_folders(tmp_path / "data", {"a": 15, "b": 15})
    s1 = resolve(tmp_path / "data", fraction=0.3, seed=11)
    s2 = resolve(tmp_path / "data", fraction=0.3, seed=11)
    s3 = resolve(tmp_path / "data", fraction=0.3, seed=12)
    assert s1.val.paths == s2.val.paths and s1.train.paths == s2.train.paths
    assert s1.record == s2.record
    assert set(s1.val.paths) != set(s3.val.paths)
    assert len(s1.val) == len(s3.val) == 2 * round(15 * 0.3)


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_resolve_val_fraction_about_right(tmp_path, fraction):
    make_class_folders(tmp_path / "data", {"a": 24, "b": 16, "c": 8})
    s = resolve(tmp_path / "data", fraction=fraction, seed=0)
    by_class = Counter(_label_names(s, s.val))
    for name, n in {"a": 24, "b": 16, "c": 8}.items():
        assert abs(by_class[name] - n * fraction) <= 1, (name, by_class[name])
        assert 1 <= by_class[name] < n
    assert abs(len(s.val) / 48 - fraction) <= 3 / 48


@pytest.mark.parametrize("val_name", ["val", "valid", "validation"])
def test_resolve_train_val_test_layout(tmp_path, val_name):
    root = tmp_path / "data"
    train = make_class_folders(root / "train", {"a": 4, "b": 3})
    val = make_class_folders(root / val_name, {"a": 2, "b": 1})
    test = make_class_folders(root / "test", {"a": 1, "b": 2})
    s = resolve(root, fraction=0.5)
    assert s.classes == ["a", "b"]
    assert sorted(s.train.paths) == sorted(str(p) for fs in train.values() for p in fs)
    assert sorted(s.val.paths) == sorted(str(p) for fs in val.values() for p in fs)
    assert s.test is not None
    assert sorted(s.test.paths) == sorted(str(p) for fs in test.values() for p in fs)
    assert _label_names(s, s.val).count("a") == 2
    assert _label_names(s, s.test).count("b") == 2
    rec = s.record
    assert rec["train"] == {"from": str(root / "train"), "count": 7}
    assert rec["val"]["from"] == str(root / val_name)
    assert rec["val"]["count"] == 3
    assert "files" not in rec["val"] and "fraction" not in rec["val"]
    assert rec["test"] == {"from": str(root / "test"), "count": 3}


def test_resolve_train_and_test_without_val_splits_train(tmp_path):
    root = tmp_path / "data"
    make_class_folders(root / "train", {"a": 10, "b": 10})
    make_class_folders(root / "test", {"a": 2, "b": 2})
    s = resolve(root, fraction=0.2, seed=1)
    assert len(s.val) == 4 and len(s.train) == 16 and len(s.test) == 4
    assert all(Path(p).parts[-3] == "train" for p in s.train.paths + s.val.paths)
    assert s.record["val"]["from"] == f"stratified split of {root / 'train'}"
    assert s.record["train"]["from"] == str(root / "train")
    assert s.record["test"]["from"] == str(root / "test")


def test_resolve_explicit_val_overrides_layout(tmp_path):
    root = tmp_path / "data"
    make_class_folders(root / "train", {"a": 3, "b": 3})
    make_class_folders(root / "val", {"a": 1, "b": 1})
    other = make_class_folders(tmp_path / "other_val", {"a": 2, "b": 2})
    s = resolve(root, val=tmp_path / "other_val")
    assert sorted(s.val.paths) == sorted(str(p) for fs in other.values() for p in fs)
    assert s.record["val"]["from"] == str(tmp_path / "other_val")


def test_resolve_separate_val_and_test_folders(tmp_path):
    make_class_folders(tmp_path / "tr", {"x": 3, "y": 3})
    make_class_folders(tmp_path / "va", {"x": 1, "y": 1})
    make_class_folders(tmp_path / "te", {"y": 2})  # a test set need not contain every class
    s = resolve(tmp_path / "tr", val=tmp_path / "va", test=tmp_path / "te")
    assert len(s.train) == 6 and len(s.val) == 2 and len(s.test) == 2
    assert set(s.test.labels) == {s.classes.index("y")}


def test_resolve_csv_manifest_relative_paths(tmp_path, monkeypatch):
    root = tmp_path / "project"
    imgs = make_class_folders(root / "images", {"cat": 5, "dog": 5})
    absolute = save_image(tmp_path / "elsewhere" / "abs.png")
    manifest = root / "labels.csv"
    with manifest.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for name, fs in imgs.items():
            for p in fs:
                w.writerow([p.relative_to(root).as_posix(), name])
        w.writerow([str(absolute), "dog"])
    monkeypatch.chdir(tmp_path)  # relative paths resolve against the CSV's folder, not the cwd
    s = resolve(manifest, fraction=0.2, seed=0)
    assert s.classes == ["cat", "dog"]
    everything = set(s.train.paths) | set(s.val.paths)
    assert everything == {str(p) for fs in imgs.values() for p in fs} | {str(absolute)}
    assert all(Path(p).is_file() for p in everything)
    assert Counter(_label_names(s, s.val)) == {"cat": 1, "dog": 1}
    assert s.record["val"]["files"] == s.val.paths
    assert str(manifest) in s.record["val"]["from"]


def test_read_manifest_resolves_against_csv_folder(tmp_path, monkeypatch):
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    (sub / "m.csv").write_text("path,label\nimg/1.png,x\n../2.png,y\n")
    monkeypatch.chdir(tmp_path)
    lf = read_labeled_files(sub / "m.csv", "--data")
    assert lf.paths == [str(sub / "img" / "1.png"), str(sub / ".." / "2.png")]
    assert lf.labels == ["x", "y"]
    assert lf.origin == f"--data {sub / 'm.csv'}"


def test_resolve_tsv_manifest(tmp_path):
    imgs = make_class_folders(tmp_path / "img", {"1": 3, "2": 3})
    manifest = tmp_path / "m.tsv"
    lines = ["path\tlabel"] + [f"img/{n}/{p.name}\t{n}" for n, fs in imgs.items() for p in fs]
    manifest.write_text("\n".join(lines) + "\n")
    s = resolve(manifest, fraction=0.34, seed=2)
    assert s.classes == ["1", "2"]
    assert len(s.train) + len(s.val) == 6
    assert Counter(_label_names(s, s.val)) == {"1": 1, "2": 1}


def test_manifest_alternate_column_names_bom_and_blank_lines(tmp_path):
    imgs = make_class_folders(tmp_path, {"a": 2, "b": 2})
    manifest = tmp_path / "m.csv"
    rows = [f"{n}/{p.name}, {n} " for n, fs in imgs.items() for p in fs]
    # BOM (Excel), capitalised header with spaces, a blank line, another column
    text = "\ufeff Filename ,Class,notes\n" + "\n".join(r + ",x" for r in rows[:2]) + "\n\n" + \
        "\n".join(r + ",y" for r in rows[2:]) + "\n"
    manifest.write_text(text, encoding="utf-8")
    lf = read_labeled_files(manifest, "--data")
    assert lf.labels == ["a", "a", "b", "b"]  # stripped
    assert lf.paths == [str(p) for fs in imgs.values() for p in fs]
    assert lf.declared == ["a", "b"]  # a class whose files are all unreadable is then an error


def test_resolve_manifest_for_val_and_test(tmp_path):
    imgs = make_class_folders(tmp_path / "img", {"a": 6, "b": 6})
    flat = [(p, n) for n, fs in imgs.items() for p in fs]

    def manifest(name, rows):
        m = tmp_path / name
        m.write_text("path,label\n" + "".join(f"{p},{n}\n" for p, n in rows))
        return m

    tr = manifest("tr.csv", flat[0:4] + flat[6:10])
    va = manifest("va.csv", [flat[4], flat[10]])
    te = manifest("te.csv", [flat[5], flat[11]])
    s = resolve(tr, val=va, test=te)
    assert len(s.train) == 8 and len(s.val) == 2 and len(s.test) == 2
    assert s.val.labels == [0, 1] and s.test.labels == [0, 1]
    assert s.record["val"]["from"] == str(va)


def test_resolve_natural_class_order(tmp_path):
    make_class_folders(tmp_path / "d", {"10": 2, "2": 2, "1": 2, "b": 2, "A": 2, "a": 2})
    s = resolve(tmp_path / "d", fraction=0.5)
    assert s.classes == ["1", "2", "10", "A", "a", "b"]
    for split in (s.train, s.val):
        for p, name in zip(split.paths, _label_names(s, split)):
            assert Path(p).parent.name == name
    lf = read_labeled_files(tmp_path / "d", "--data")
    assert lf.declared == ["1", "2", "10", "A", "a", "b"]


def test_class_sort_key_natural_order():
    names = ["10", "2", "dog", "1", "-3", "100", "Cat", "02x"]
    assert sorted(names, key=class_sort_key) == ["-3", "1", "2", "10", "100", "02x", "Cat", "dog"]


def test_class_folders_ignore_hidden_files_and_folders_at_top(tmp_path):
    make_class_folders(tmp_path / "d", {"a": 2, "b": 2})
    (tmp_path / "d" / ".cache").mkdir()
    save_image(tmp_path / "d" / ".cache" / "x.png")
    (tmp_path / "d" / "a" / ".DS_Store").write_bytes(b"\0\1junk")
    (tmp_path / "d" / "notes.txt").write_text("a loose file at the top is not a class")
    lf = read_labeled_files(tmp_path / "d", "--data")
    assert lf.declared == ["a", "b"]
    assert len(lf.paths) == 4
    assert not any(".DS_Store" in p or ".cache" in p for p in lf.paths)


def test_class_folders_include_nested_subfolders(tmp_path):
    make_class_folders(tmp_path / "d", {"a": 1, "b": 1})
    save_image(tmp_path / "d" / "a" / "nested" / "deep.png")
    lf = read_labeled_files(tmp_path / "d", "--data")
    assert str(tmp_path / "d" / "a" / "nested" / "deep.png") in lf.paths
    assert lf.labels.count("a") == 2


def test_resolve_real_cifar10_mini_layout():
    if not (CIFAR / "train").is_dir():
        pytest.skip("cifar10-mini not available")
    s = resolve(CIFAR, fraction=0.1, seed=0)
    assert len(s.classes) == 10 and s.classes[0] == "airplane"
    assert s.record["train"]["from"] == str(CIFAR / "train")
    assert s.record["test"]["from"] == str(CIFAR / "test")
    assert len(s.val) == 10 * round(500 * 0.1)
    assert len(s.train) + len(s.val) == 5000 and len(s.test) == 1000
    assert Counter(s.val.labels) == {i: 50 for i in range(10)}
    assert s.skipped == []


# --------------------------------------------------------------------------------------------------
# 4. errors


def test_error_data_path_missing(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(UserError) as e:
        resolve(missing)
    assert "--data" in str(e.value) and str(missing) in str(e.value)
    assert e.value.exit_code == 2


def test_error_data_path_none():
    with pytest.raises(UserError, match="--data"):
        resolve(None)


def test_error_val_and_test_paths_missing(tmp_path):
    make_class_folders(tmp_path / "d", {"a": 2, "b": 2})
    with pytest.raises(UserError) as e:
        resolve(tmp_path / "d", val=tmp_path / "no_val")
    assert "--val" in str(e.value) and "no_val" in str(e.value)
    with pytest.raises(UserError) as e:
        resolve(tmp_path / "d", test=tmp_path / "no_test")
    assert "--test" in str(e.value) and "no_test" in str(e.value)


def test_error_no_class_folders(tmp_path):
    (tmp_path / "d").mkdir()
    save_image(tmp_path / "d" / "loose.png")
    with pytest.raises(UserError) as e:
        resolve(tmp_path / "d")
    assert "--data" in str(e.value) and "no sub-folders" in str(e.value)


def test_error_empty_class_folder(tmp_path):
    make_class_folders(tmp_path / "d", {"a": 3})
    (tmp_path / "d" / "b").mkdir()
    with pytest.raises(UserError) as e:
        resolve(tmp_path / "d")
    msg = str(e.value)
    assert "--data" in msg and "'b'" in msg and "empty" in msg


def test_error_class_with_only_unreadable_files(tmp_path):
    make_class_folders(tmp_path / "d", {"a": 6, "c": 3})
    write_unreadable(tmp_path / "d" / "b" / "1.jpg", "text")
    write_unreadable(tmp_path / "d" / "b" / "2.jpg", "empty")
    with pytest.raises(UserError) as e:
        resolve(tmp_path / "d", max_bad=0.5)
    msg = str(e.value)
    assert "class 'b'" in msg and "no readable images" in msg and "--data" in msg


def test_error_single_class(tmp_path):
    make_class_folders(tmp_path / "d", {"only": 5})
    with pytest.raises(UserError) as e:
        resolve(tmp_path / "d")
    msg = str(e.value)
    assert "--data" in msg and "only" in msg and "at least 2" in msg


def test_error_single_class_in_manifest(tmp_path):
    imgs = make_class_folders(tmp_path, {"a": 3})
    m = tmp_path / "m.csv"
    m.write_text("path,label\n" + "".join(f"{p},a\n" for p in imgs["a"]))
    with pytest.raises(UserError, match="at least 2") as e:
        resolve(m)
    assert str(m) in str(e.value)


def test_error_val_label_unknown_to_training(tmp_path):
    make_class_folders(tmp_path / "tr", {"a": 3, "b": 3})
    make_class_folders(tmp_path / "va", {"a": 1, "zebra": 1})
    with pytest.raises(UserError) as e:
        resolve(tmp_path / "tr", val=tmp_path / "va")
    msg = str(e.value)
    assert "--val" in msg and "zebra" in msg and "not in the training data" in msg


def test_error_test_labels_unknown_to_training(tmp_path):
    make_class_folders(tmp_path / "d" / "train", {"a": 3, "b": 3})
    make_class_folders(tmp_path / "d" / "test", {"a": 1, "q": 1, "r": 1})
    with pytest.raises(UserError) as e:
        resolve(tmp_path / "d")
    msg = str(e.value)
    assert "--test" in msg and "'q'" in msg and "'r'" in msg and "labels" in msg


def test_error_val_only_unreadable(tmp_path):
    make_class_folders(tmp_path / "tr", {"a": 10, "b": 10})
    write_unreadable(tmp_path / "va" / "a" / "x.jpg")
    with pytest.raises(UserError) as e:
        resolve(tmp_path / "tr", val=tmp_path / "va", max_bad=0.5)
    assert "--val" in str(e.value) and "no readable images" in str(e.value)


@pytest.mark.parametrize("header", ["file_name,category", "path,kind", "name,label", ""])
def test_error_manifest_without_path_label_columns(tmp_path, header):
    m = tmp_path / "m.csv"
    m.write_text(header + "\n" + ("a.png,cat\n" if header else ""))
    with pytest.raises(UserError) as e:
        resolve(m)
    msg = str(e.value)
    assert str(m) in msg and "--data" in msg and "'path' and 'label'" in msg


@pytest.mark.parametrize("name,text,line,what", [
    ("m.csv", "path,label\na.png,cat\nb.png,\nc.png,dog\n", 3, "empty label"),
    ("m.tsv", "path\tlabel\na.png\tcat\nb.png\tcat\n  \tdog\n", 4, "empty path"),
])
def test_error_manifest_empty_field_names_line(tmp_path, name, text, line, what):
    m = tmp_path / name
    m.write_text(text)
    with pytest.raises(UserError) as e:
        resolve(m)
    msg = str(e.value)
    assert str(m) in msg and f"line {line}" in msg and what in msg


def test_error_manifest_short_row(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("path,label\na.png\n")
    with pytest.raises(UserError, match="line 2: empty label"):
        resolve(m)


def test_error_manifest_not_utf8(tmp_path):
    m = tmp_path / "m.csv"
    m.write_bytes("path,label\ncaf\u00e9.png,chat\n".encode("latin-1"))
    with pytest.raises(UserError) as e:
        resolve(m)
    msg = str(e.value)
    assert str(m) in msg and "UTF-8" in msg


def test_error_manifest_no_rows(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("path,label\n")
    with pytest.raises(UserError, match="no rows"):
        resolve(m)


def test_error_val_manifest_names_val_option(tmp_path):
    make_class_folders(tmp_path / "tr", {"a": 2, "b": 2})
    m = tmp_path / "val.csv"
    m.write_text("image,target\nx.png,\n")
    with pytest.raises(UserError) as e:
        resolve(tmp_path / "tr", val=m)
    assert str(e.value).startswith(f"--val {m}")


def test_error_too_many_unreadable_files(tmp_path):
    make_class_folders(tmp_path / "d", {"a": 4, "b": 4})
    bad = [write_unreadable(tmp_path / "d" / "a" / f"z{i}.jpg", kind)
           for i, kind in enumerate(["text", "empty", "truncated"])]
    # 3 of 11 bad = 27%
    with pytest.raises(UserError) as e:
        resolve(tmp_path / "d", max_bad=0.2)
    msg = str(e.value)
    assert "--max-bad-fraction" in msg and "0.2" in msg
    assert "3 of 11" in msg
    assert any(str(p) in msg for p in bad)  # names the first bad file
    with pytest.raises(UserError, match="--max-bad-fraction"):
        resolve(tmp_path / "d", max_bad=0.0)


def test_unreadable_below_threshold_skipped_and_listed(tmp_path, caplog):
    files = make_class_folders(tmp_path / "d", {"a": 10, "b": 10})
    bad = {
        str(write_unreadable(tmp_path / "d" / "a" / "bad1.jpg", "truncated")),
        str(write_unreadable(tmp_path / "d" / "b" / "bad2.jpg", "text")),
    }
    caplog.set_level("WARNING", logger="finetunekit")
    s = resolve(tmp_path / "d", fraction=0.2, seed=0, max_bad=0.1)  # 2 of 22 < 10%
    assert {p for p, _ in s.skipped} == bad
    assert all(reason for _, reason in s.skipped)
    kept = set(s.train.paths) | set(s.val.paths)
    assert not kept & bad
    assert kept == {str(p) for fs in files.values() for p in fs}
    assert len(s.train) + len(s.val) == 20
    assert Counter(_label_names(s, s.val)) == {"a": 2, "b": 2}
    assert s.record["train"]["count"] == len(s.train)
    assert "skipped 2 unreadable" in caplog.text
    assert all(p in caplog.text for p in bad)


def test_unreadable_val_and_test_files_skipped_and_counted(tmp_path):
    make_class_folders(tmp_path / "d" / "train", {"a": 10, "b": 10})
    make_class_folders(tmp_path / "d" / "val", {"a": 2, "b": 2})
    make_class_folders(tmp_path / "d" / "test", {"a": 2, "b": 2})
    vbad = write_unreadable(tmp_path / "d" / "val" / "a" / "v.jpg")
    tbad = write_unreadable(tmp_path / "d" / "test" / "b" / "t.jpg", "empty")
    s = resolve(tmp_path / "d", max_bad=0.1)
    assert {p for p, _ in s.skipped} == {str(vbad), str(tbad)}
    assert len(s.val) == 4 and len(s.test) == 4
    assert s.record["val"]["count"] == 4 and s.record["test"]["count"] == 4


def test_unreadable_exactly_at_threshold_is_allowed(tmp_path):
    make_class_folders(tmp_path / "d", {"a": 5, "b": 4})
    write_unreadable(tmp_path / "d" / "b" / "x.jpg")  # 1 of 10 = exactly 0.1
    s = resolve(tmp_path / "d", max_bad=0.1)
    assert len(s.skipped) == 1


# --------------------------------------------------------------------------------------------------
# 5. ImageDataset, transforms, loaders


@pytest.fixture(scope="module")
def small_split(tmp_path_factory) -> Split:
    root = tmp_path_factory.mktemp("ds")
    paths, labels = [], []
    rng = np.random.default_rng(0)
    kinds = [("RGB", "png"), ("L", "png"), ("RGBA", "png"), ("CMYK", "jpg"), ("RGB", "jpg")]
    for i in range(10):
        mode, ext = kinds[i % len(kinds)]
        h, w = 20 + 3 * i, 45 - 2 * i  # every size differs from 32x32
        a = rng.integers(0, 256, (h, w, len(mode)) if mode != "L" else (h, w), dtype=np.uint8)
        p = root / f"{i}.{ext}"
        Image.fromarray(a, mode).save(p)
        paths.append(str(p))
        labels.append(i)  # unique labels reveal the order a loader yields
    return Split(paths, labels)


def test_image_dataset_eval_transform(small_split):
    ds = ImageDataset(small_split, build_transform(Preprocessing(input_size=32), "none"))
    assert len(ds) == 10
    for i in range(len(ds)):
        x, y = ds[i]
        assert isinstance(x, torch.Tensor)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert torch.isfinite(x).all()
        assert y == i
    # 'none' is deterministic
    assert torch.equal(ds[3][0], ds[3][0])


def test_eval_transform_normalizes_with_mean_and_std(tmp_path):
    pre = Preprocessing(input_size=32, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    p = save_image(tmp_path / "white.png", size=(40, 40), color=(255, 255, 255))
    x = build_transform(pre, "none")(load_rgb(p))
    assert x.shape == (3, 32, 32)
    expected = torch.tensor([(1 - 0.5) / 0.5, (1 - 0.25) / 0.25, 1.0]).view(3, 1, 1)
    assert torch.allclose(x, expected.expand_as(x), atol=1e-5)


@pytest.mark.parametrize("augment", ["light", "standard"])
def test_image_dataset_augmented_transform_shape(small_split, augment):
    torch.manual_seed(0)
    ds = ImageDataset(small_split, build_transform(Preprocessing(input_size=32), augment))
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert y == i


def test_build_transform_unknown_augment_raises():
    with pytest.raises(KeyError):
        build_transform(Preprocessing(input_size=32), "extreme")


def test_preprocessing_roundtrip_and_with_size():
    pre = Preprocessing(input_size=48, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), crop_pct=1.0)
    assert Preprocessing.from_dict(pre.to_dict()) == pre
    assert pre.with_size(None) is pre
    assert pre.with_size(64).input_size == 64 and pre.with_size(64).mean == pre.mean


def _first_batch_labels(loader) -> list[int]:
    _, y = next(iter(loader))
    return y.tolist()


def test_make_loader_train_seeded_order(small_split):
    ds = ImageDataset(small_split, build_transform(Preprocessing(input_size=32), "none"))
    a = make_loader(ds, 4, train=True, workers=0, seed=123)
    b = make_loader(ds, 4, train=True, workers=0, seed=123)
    c = make_loader(ds, 4, train=True, workers=0, seed=124)
    first_a, first_b = _first_batch_labels(a), _first_batch_labels(b)
    assert first_a == first_b
    assert len(first_a) == 4
    # a full epoch: shuffled, drop_last (10 = 4+4+2 -> 2 batches), same with the same seed
    epoch_a = [y.tolist() for _, y in make_loader(ds, 4, train=True, workers=0, seed=123)]
    epoch_b = [y.tolist() for _, y in make_loader(ds, 4, train=True, workers=0, seed=123)]
    assert epoch_a == epoch_b and len(epoch_a) == 2 and all(len(e) == 4 for e in epoch_a)
    assert epoch_a[0] == first_a
    epoch_c = [y.tolist() for _, y in c]
    assert epoch_c != epoch_a
    assert epoch_a != [[0, 1, 2, 3], [4, 5, 6, 7]]  # actually shuffled


def test_make_loader_eval_in_order_keeps_last(small_split):
    ds = ImageDataset(small_split, build_transform(Preprocessing(input_size=32), "none"))
    loader = make_loader(ds, 4, train=False, workers=0, seed=0)
    batches = [(x.shape, y.tolist()) for x, y in loader]
    assert [y for _, y in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert batches[0][0] == (4, 3, 32, 32)


def test_make_loader_train_small_dataset_keeps_partial_batch(small_split):
    ds = ImageDataset(small_split, build_transform(Preprocessing(input_size=32), "none"))
    batches = [y.tolist() for _, y in make_loader(ds, 16, train=True, workers=0, seed=0)]
    assert len(batches) == 1 and sorted(batches[0]) == list(range(10))


def test_make_loader_workers_same_order_as_main_process(small_split):
    ds = ImageDataset(small_split, build_transform(Preprocessing(input_size=32), "none"))
    main = [y.tolist() for _, y in make_loader(ds, 4, train=True, workers=0, seed=5)]
    worker = [y.tolist() for _, y in make_loader(ds, 4, train=True, workers=1, seed=5)]
    assert main == worker


# --------------------------------------------------------------------------------------------------
# 6. stratified_split


def test_stratified_split_single_sample_class_stays_in_train():
    labels = ["a"] * 10 + ["solo"] + ["b"] * 5
    for seed in range(20):
        for fraction in (0.1, 0.5, 0.99, 1.0):
            held = stratified_split(labels, fraction, seed)
            assert held[10] is False
    # every class with two or more keeps at least one in train and holds out at least one
    held = stratified_split(labels, 1.0, 0)
    for name in ("a", "b"):
        flags = [h for h, lab in zip(held, labels) if lab == name]
        assert any(flags) and not all(flags)


@pytest.mark.parametrize("n", [2, 3, 5, 7, 10, 33, 100])
@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.2, 0.5, 0.8])
def test_stratified_split_fraction_within_rounding(n, fraction):
    labels = ["x"] * n + ["y"] * (n + 1)
    held = stratified_split(labels, fraction, seed=7)
    assert len(held) == len(labels) and all(isinstance(h, bool) for h in held)
    for name, size in (("x", n), ("y", n + 1)):
        k = sum(h for h, lab in zip(held, labels) if lab == name)
        assert k == min(size - 1, max(1, round(size * fraction)))
        assert 1 <= k <= size - 1
        assert abs(k - size * fraction) <= 1 or k in (1, size - 1)


def test_stratified_split_deterministic_and_seed_dependent():
    labels = [c for c in "abc" for _ in range(30)]
    h1 = stratified_split(labels, 0.3, seed=1)
    assert h1 == stratified_split(labels, 0.3, seed=1)
    assert h1 != stratified_split(labels, 0.3, seed=2)
    assert sum(h1) == 27


def test_stratified_split_interleaved_labels():
    labels = ["a", "b"] * 10
    held = stratified_split(labels, 0.2, seed=0)
    assert sum(h for h, lab in zip(held, labels) if lab == "a") == 2
    assert sum(h for h, lab in zip(held, labels) if lab == "b") == 2


def test_stratified_split_empty():
    assert stratified_split([], 0.2, 0) == []


# --------------------------------------------------------------------------------------------------
# regressions: bugs found in review and fixed


@pytest.mark.parametrize("mode,color,key", [("L", 0, 0), ("RGB", (0, 0, 0), (0, 0, 0))])
def test_regression_trns_transparency_in_L_and_RGB_not_composited(tmp_path, mode, color, key):
    p = tmp_path / f"trns_{mode}.png"
    Image.new(mode, (4, 4), color).save(p, transparency=key)
    with Image.open(p) as check:
        assert check.mode == mode and "transparency" in check.info
    assert load_rgb(p).getpixel((1, 1)) == (255, 255, 255)


@pytest.mark.parametrize("name", ["²", "①", "--5"])
def test_regression_class_sort_key_non_ascii_digits(name):
    assert class_sort_key(name)[0] in (0, 1)


def test_regression_resolve_class_folder_named_superscript(tmp_path):
    make_class_folders(tmp_path / "d", {"²": 2, "b": 2})
    s = resolve(tmp_path / "d", fraction=0.5)
    assert set(s.classes) == {"²", "b"}


def test_regression_class_sort_key_not_total():
    assert sorted(["1", "01"], key=class_sort_key) == sorted(["01", "1"], key=class_sort_key)


def test_regression_files_in_hidden_subfolders_are_included(tmp_path):
    make_class_folders(tmp_path / "d", {"a": 2, "b": 2})
    save_image(tmp_path / "d" / "a" / ".ipynb_checkpoints" / "000-checkpoint.png")
    lf = read_labeled_files(tmp_path / "d", "--data")
    assert not any(".ipynb_checkpoints" in p for p in lf.paths)


def test_regression_manifest_class_with_only_unreadable_files_is_an_error(tmp_path):
    rows = [("a", i) for i in range(5)] + [("b", i) for i in range(5)]
    for label, i in rows:
        save_image(tmp_path / f"{label}{i}.png")
    (tmp_path / "c0.png").write_bytes(b"not an image")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n" + "".join(f"{l}{i}.png,{l}\n" for l, i in rows) + "c0.png,c\n")
    with pytest.raises(UserError, match="class 'c' has no readable images"):
        resolve_splits(manifest, None, None, 0.2, 0, max_bad_fraction=0.1)


@pytest.mark.parametrize("mode,values,expected", [("F", [[0.5, 2.0]], [0, 2]), ("I", [[255, 100]], [255, 100]),
                                                  ("I", [[65535, 0]], [255, 0]), ("F", [[0.0, 1.0]], [0, 255])])
def test_regression_float_and_int32_images_keep_their_range(mode, values, expected):
    im = Image.fromarray(np.array(values, dtype=np.float32 if mode == "F" else np.int32), mode)
    assert [to_rgb(im).getpixel((x, 0))[0] for x in range(2)] == expected


@pytest.mark.parametrize("preset", ["light", "standard", "strong"])
def test_every_augment_preset_survives_many_draws(preset):
    import numpy as np
    from PIL import Image

    torch.manual_seed(0)
    tf = build_transform(Preprocessing(input_size=32), preset)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    for _ in range(100):
        x = tf(image)
        assert x.shape == (3, 32, 32) and torch.isfinite(x).all()


def test_randaugment_every_op_at_every_magnitude():
    """The presets' RandAugment op space, exhaustively: no op/magnitude pair may fail on a real image (timm's
    posterize could ask Pillow for 0 bits, which raised mid-epoch)."""
    import numpy as np
    from PIL import Image
    from torchvision.transforms import InterpolationMode, RandAugment
    from torchvision.transforms.autoaugment import _apply_op

    tf = build_transform(Preprocessing(input_size=32), "standard")
    ra = next(t for t in tf.transforms if isinstance(t, RandAugment))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    space = ra._augmentation_space(ra.num_magnitude_bins, (40, 48))
    for name, (magnitudes, signed) in space.items():
        for m in (magnitudes if magnitudes.ndim else [magnitudes]):
            for sign in ((1, -1) if signed else (1,)):
                out = _apply_op(image, name, float(m) * sign, interpolation=InterpolationMode.NEAREST, fill=None)
                assert out.size == image.size, name
