"""The decoded-image cache: the same validation tensors as decoding the files, augmentation by sample
seed, rebuilt when a file changes, used only when it pays, and never in the way when it cannot be built."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

import finetunekit
from finetunekit.checkpoint import content_hash
from finetunekit.data import ImageDataset, Preprocessing, Split, build_transform
from finetunekit.data import decoded
from finetunekit.data.decoded import DecodedImages, Normalize, decoded_datasets
from finetunekit.data.transforms import ShorterSide, build_tensor_transform

@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNEKIT_CACHE", str(tmp_path / "cache"))  # the same images in each test: own cache


PRE = Preprocessing(input_size=48, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), crop_pct=0.875)


def _images(folder: Path, cifar_subset, n: int = 12) -> Split:
    """Real CIFAR JPEGs plus shapes the cache must handle: a wide RGBA PNG, a tall grayscale JPEG, and a
    photo stored on its side with an EXIF orientation tag."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(cifar_subset["train"]) as f:
        rows = list(csv.DictReader(f))[:n]
    paths = [r["path"] for r in rows]
    wide = Image.new("RGBA", (240, 100), (200, 10, 10, 128))
    wide.paste((10, 200, 10, 255), (0, 0, 120, 50))
    wide.save(folder / "wide.png")
    tall = Image.linear_gradient("L").resize((40, 90))
    tall.save(folder / "tall.jpg")
    side = Image.new("RGB", (60, 50), (0, 0, 255))
    side.paste((255, 255, 0), (0, 0, 20, 50))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to view
    side.save(folder / "side.jpg", exif=exif)
    paths += [str(folder / n) for n in ("wide.png", "tall.jpg", "side.jpg")]
    return Split(paths, list(range(len(paths))))


def _content(split: Split) -> str:
    return content_hash({"train": [Path(p) for p in split.paths]})[1]["train"]


def _cached(split: Split, augment="none", mode="on", epochs=2, **extra):
    return decoded_datasets({"train": ImageDataset(split, None)}, {"train": _content(split)}, mode=mode,
                            epochs=epochs, pre=PRE, augment=augment, rotate=extra.get("rotate", 0.0),
                            elastic=0.0, vflip=extra.get("vflip", False))


def test_validation_tensors_equal_the_decoded_files(cifar_subset, tmp_path):
    split = _images(tmp_path / "img", cifar_subset)
    ds = _cached(split)["train"]
    plain = ImageDataset(split, build_transform(PRE, "none"))
    normalize = Normalize(PRE.mean, PRE.std)
    for i in range(len(split.paths)):
        x, y = ds[i]
        assert x.dtype == torch.uint8 and x.shape == (3, 48, 48) and y == i
        expected, _ = plain[i]
        assert torch.allclose(normalize(x[None])[0], expected, atol=1e-5), split.paths[i]


def test_training_crops_follow_the_sample_seed_and_stored_images_are_never_enlarged(cifar_subset, tmp_path):
    split = _images(tmp_path / "img", cifar_subset)
    ds = _cached(split, augment="strong", vflip=True, rotate=10.0)["train"]
    a, b, c = ds[(0, 7)][0], ds[(0, 7)][0], ds[(0, 8)][0]
    assert a.dtype == torch.uint8 and a.shape == (3, 48, 48)
    assert torch.equal(a, b) and not torch.equal(a, c)
    stored = {tuple(int(v) for v in row[1:]) for row in ds.index}
    assert (32, 32) in stored  # CIFAR: 32 px, below the stored size of ceil(48 / 0.875) = 55, kept as is
    assert (55, 132) in stored and (90, 40) in stored  # the wide PNG scaled to 55 px high; the tall one kept
    assert (60, 50) in stored  # the EXIF-rotated photo, upright (taller than wide)
    assert repr(build_tensor_transform(PRE, "light")[0]) == repr(ShorterSide(55, "bilinear"))


def test_a_changed_file_builds_a_new_entry_and_a_second_run_reads_the_cache(cifar_subset, tmp_path, caplog):
    split = _images(tmp_path / "img", cifar_subset)
    with caplog.at_level(logging.DEBUG, logger="finetunekit"):  # the cache's lines are detail (--verbose)
        first = _cached(split)["train"]
        again = _cached(split)["train"]
    assert again.entry == first.entry
    assert "decoded into the cache" in caplog.text and "read from the cache" in caplog.text
    Image.new("RGB", (40, 40), (1, 2, 3)).save(split.paths[-1], format="JPEG")  # the same name, new pixels
    changed = _cached(split)["train"]
    assert changed.entry != first.entry
    assert changed[len(split) - 1][0].float().mean() < 10


def test_auto_skips_one_epoch_and_an_over_budget_cache(cifar_subset, tmp_path, monkeypatch, caplog):
    split = _images(tmp_path / "img", cifar_subset)
    with caplog.at_level(logging.DEBUG, logger="finetunekit"):
        assert _cached(split, mode="auto", epochs=1) is None
        assert "1 epoch" in caplog.text
        assert _cached(split, mode="off") is None
        monkeypatch.setattr(decoded, "free_budget", lambda: 1000)
        assert _cached(split, mode="auto", epochs=5) is None
        assert "would exceed the budget" in caplog.text
        assert _cached(split, mode="on", epochs=5) is not None  # on: no budget
        assert _cached(split, mode="auto", epochs=1) is not None  # built already: it pays now


def test_a_full_disk_falls_back_to_the_files(cifar_subset, tmp_path, monkeypatch, caplog):
    split = _images(tmp_path / "img", cifar_subset)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(decoded.np, "save", full)
    with caplog.at_level(logging.INFO, logger="finetunekit"):
        assert _cached(split) is None
    assert "could not write the cache" in caplog.text and "No space left on device" in caplog.text
    assert not [p for p in decoded.cache_dir().iterdir() if ".tmp" in p.name]  # nothing half-written left


def test_workers_see_the_same_samples(cifar_subset, tmp_path):
    from finetunekit.data import make_loader

    split = _images(tmp_path / "img", cifar_subset)
    ds = _cached(split, augment="light")["train"]
    batches = [[x for x, _ in make_loader(ds, 5, train=True, workers=w, seed=3)] for w in (0, 2)]
    assert all(torch.equal(a, b) for a, b in zip(*batches)) and len(batches[0]) == 3


def test_fit_trains_on_the_cache_and_records_the_choice(cifar_subset, tmp_path):
    common = {"data": {"path": str(cifar_subset["train"]), "image_size": 32, "num_workers": 0},
              "model": {"name": "timm:test_efficientnet", "pretrained": False},
              "train": {"epochs": 2, "batch_size": 32, "seed": 0, "strategy": "full"}, "quiet": True}
    run = finetunekit.fit({**common, "out": str(tmp_path / "on")})
    log = (run.run_dir / "log.txt").read_text()
    assert "decoded images (train): 360 decoded into the cache" in log
    assert "cache_images: 'on'" in (run.run_dir / "recipe.yaml").read_text() or \
        "cache_images: on" in (run.run_dir / "recipe.yaml").read_text()
    off = finetunekit.fit({**common, "data": {**common["data"], "cache_images": "off"}, "out": str(tmp_path / "off")})
    assert "decoded images" not in (off.run_dir / "log.txt").read_text()
    for r in (run, off):  # both train: finite losses, 2 epochs each
        assert len(r.metrics and (r.run_dir / "history.csv").read_text().splitlines()) == 3
        assert 0 < r.metrics["val"]["loss"] < 2.5
