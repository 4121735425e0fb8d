"""--strategy auto: the playbook's choice from the data (finetunekit.playbook), logged and recorded."""

from __future__ import annotations

import pytest
import yaml

import finetunekit
from conftest import CIFAR, SHARED_DATA
from finetunekit.playbook import FAR, MEDIUM, SMALL, choose, native_short_side, per_class

FLOWERS = SHARED_DATA / "flowers-mini"


def _files(root, per_class):
    return sorted(p for d in sorted(root.iterdir()) for p in sorted(d.iterdir())[:per_class])


def test_samples_per_class():
    assert per_class("classification", [0] * 10 + [1] * 30 + [2] * 20) == 20  # the median class
    assert per_class("multilabel", [[1, 0], [1, 1], [0, 1], [0, 1]]) == 2.5
    assert per_class("regression", [0.5] * 90) == 45
    assert per_class("classification", []) == 0


def test_native_resolution_is_read_from_the_headers():
    if not CIFAR.is_dir() or not FLOWERS.is_dir():
        pytest.skip("the shared datasets sit beside the repo")
    assert native_short_side(_files(CIFAR / "train", 5)) == 32
    side = native_short_side(_files(FLOWERS / "train", 20))
    assert 200 <= side <= 400  # photos of 240-500 px on the long side
    assert native_short_side([]) is None


def test_the_rule():
    if not CIFAR.is_dir() or not FLOWERS.is_dir():
        pytest.skip("the shared datasets sit beside the repo")
    photos, thumbs = _files(FLOWERS / "train", 20), _files(CIFAR / "train", 5)
    small = [0] * SMALL + [1] * SMALL
    c = choose("image-classification", "image", "classification", small, photos, 224)
    assert c.strategy == "linear-probe" and f"{SMALL} samples per class" in c.reason
    assert c.line().startswith("strategy auto -> linear-probe: ")
    medium = [0] * (SMALL + 1) + [1] * (SMALL + 1)
    assert choose("image-classification", "image", "classification", medium, photos, 224).strategy == "lp-ft"
    large = [0] * (MEDIUM + 1) + [1] * (MEDIUM + 1)
    assert choose("image-classification", "image", "classification", large, photos, 224).strategy == "full"
    # 32 px thumbnails at a 224 px input are far from the pretraining photos, however few
    far = choose("image-classification", "image", "classification", small, thumbs, 224)
    assert far.strategy == "full" and "32 px against the model's 224 px input (7.0x upscaled)" in far.reason
    # ... but not at a 48 px input (1.5x < FAR)
    assert 48 / 32 < FAR
    assert choose("image-classification", "image", "classification", small, thumbs, 48).strategy == "linear-probe"
    assert choose("text-classification", "text", "classification", small).strategy == "full"
    assert choose("detection", "image", "detection", []).strategy == "full"


def test_auto_is_the_default_and_is_logged_and_recorded(cifar_subset, tmp_path):
    """40 images a class at their native 32 px: a linear probe, on cached features, and recipe.yaml says so
    (a --resume or a re-run of it trains the same plan)."""
    run = finetunekit.fit({"data": {"path": str(cifar_subset["train"]), "image_size": 32, "num_workers": 0},
                           "model": {"name": "timm:test_efficientnet", "pretrained": False},
                           "train": {"epochs": 1, "batch_size": 16}, "out": str(tmp_path / "run"), "quiet": True})
    log = (run.run_dir / "log.txt").read_text()
    assert ("strategy auto -> linear-probe: 36 samples per class at 32 px (<= 200): few enough that the "
            "pretrained features with a new head generalize best, on cached features") in log
    assert "features cached without augmentation" in log  # the default --augment light: one plain view
    recipe = yaml.safe_load((run.run_dir / "recipe.yaml").read_text())
    assert recipe["train"]["strategy"] == "linear-probe"
    explicit = finetunekit.fit({"data": {"path": str(cifar_subset["train"]), "image_size": 32, "num_workers": 0},
                                "model": {"name": "timm:test_efficientnet", "pretrained": False},
                                "train": {"epochs": 1, "batch_size": 16, "strategy": "full"},
                                "out": str(tmp_path / "full"), "quiet": True})
    assert "strategy auto" not in (explicit.run_dir / "log.txt").read_text()
