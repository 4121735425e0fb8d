"""Hostile and awkward input beyond the readers' own tests: unwritable output, leakage between splits,
file names with spaces and non-ASCII characters."""

from __future__ import annotations

import csv
import os
import shutil

import pytest

import finetunekit
from conftest import CIFAR


def _recipe(train, out, **data):
    return {"data": {"path": str(train), "image_size": 32, "augment": "none", "num_workers": 0, **data},
            "model": {"name": "timm:test_efficientnet", "pretrained": False},
            "train": {"epochs": 1, "batch_size": 16}, "out": str(out), "quiet": True}


def test_unwritable_output_directory_is_an_error_before_training(cifar_subset, tmp_path):
    if os.geteuid() == 0:  # root writes through permission bits; sysfs refuses everyone
        out = "/sys/finetunekit-test/run"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        out = locked / "run"
    with pytest.raises(finetunekit.UserError, match="--out .*: cannot write there"):
        finetunekit.fit(_recipe(cifar_subset["train"], out))


def test_the_same_images_in_train_and_validation_are_reported(cifar_subset, tmp_path):
    rows = list(csv.DictReader(cifar_subset["train"].open()))
    val = tmp_path / "val.csv"
    with val.open("w", newline="") as f:  # 12 training images, copied under new names, plus 28 others
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for i, r in enumerate(rows[:12]):
            copy = tmp_path / f"copy{i}.png"
            shutil.copy(r["path"], copy)
            w.writerow([copy, r["label"]])
        for r in csv.DictReader((cifar_subset["test"]).open()):
            w.writerow([r["path"], r["label"]])
    train = tmp_path / "train.csv"
    train.write_text(cifar_subset["train"].read_text())
    run = finetunekit.fit(_recipe(train, tmp_path / "run", val=str(val)))
    log = (run.run_dir / "log.txt").read_text()
    assert "warning: 12 validation images are byte-identical to training images (leakage" in log


def test_file_and_class_names_with_spaces_and_non_ascii(tmp_path):
    root = tmp_path / "données d'entraînement"
    for cls, source in (("chat noir", "cat"), ("chien 🐕", "dog")):
        (root / cls).mkdir(parents=True)
        for i, image in enumerate(sorted((CIFAR / "train" / source).iterdir())[:20]):
            shutil.copy(image, root / cls / f"é {i} ü.png")
    run = finetunekit.fit(_recipe(root, tmp_path / "run é"))
    assert run.metrics["classes"] == ["chat noir", "chien 🐕"]
    model = finetunekit.load(run.run_dir)
    pred = model.predict([root / "chat noir" / "é 0 ü.png"])
    assert pred[0]["label"] in ("chat noir", "chien 🐕")
