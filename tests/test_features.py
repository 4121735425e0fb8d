"""Cached backbone features for linear probes: the same head as the uncached path, reused across runs,
recomputed when anything they depend on changes."""

from __future__ import annotations

import csv
import shutil

import pytest
import torch
from safetensors.torch import load_file

import finetunekit


def _fit(train, out, val=None, **options):
    data = {"path": str(train), "image_size": 32, "augment": "none", "num_workers": 0}
    data.update({k: v for k, v in options.items() if k in ("cache_features", "cache_views", "augment")})
    if val:
        data["val"] = str(val)
    train_opts = {"strategy": "linear-probe", "epochs": 2, "batch_size": 16, "seed": 1,
                  **{k: v for k, v in options.items() if k in ("ema", "lr")}}
    model = {"name": "timm:test_efficientnet", "pretrained": False, **({"dropout": options["dropout"]}
                                                                         if "dropout" in options else {})}
    run = finetunekit.fit({"data": data, "model": model, "train": train_opts, "out": str(out), "quiet": True})
    return run, (run.run_dir / "log.txt").read_text()


def _weights(run):
    return load_file(str(run.model_dir / "model.safetensors"))


def test_cached_head_equals_the_uncached_one_and_the_cache_is_reused(cifar_subset, tmp_path):
    plain, log = _fit(cifar_subset["train"], tmp_path / "off", cache_features="off")
    assert "features not cached: --cache-features off" in log
    cached, log = _fit(cifar_subset["train"], tmp_path / "on")
    assert "features (train): 360 x 256, computed" in log and "features (val): 40 x 256, computed" in log
    a, b = _weights(plain), _weights(cached)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
    assert cached.metrics["val"]["accuracy"] == pytest.approx(plain.metrics["val"]["accuracy"], abs=1e-6)
    again, log = _fit(cifar_subset["train"], tmp_path / "again")
    assert "features (train): 360 x 256, read from the cache" in log
    assert all(torch.equal(_weights(again)[k], b[k]) for k in b)
    # the saved model is the whole network: it scores like training's validation did
    r = finetunekit.evaluate(cached.run_dir, cifar_subset["train"])
    assert 0 <= r["accuracy"] <= 1 and r["samples"] == 400


def test_a_changed_image_recomputes_its_split(cifar_subset, tmp_path):
    rows = list(csv.DictReader(cifar_subset["train"].open()))
    changed = tmp_path / "changed.png"
    shutil.copy(rows[0]["path"], changed)
    manifest = tmp_path / "train.csv"
    with manifest.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows([[changed if i == 0 else r["path"], r["label"]] for i, r in enumerate(rows)])
    _fit(manifest, tmp_path / "first")
    with changed.open("ab") as f:
        f.write(b"\0")  # same pixels, other bytes: the content hash moves, so the cache entry does
    _, log = _fit(manifest, tmp_path / "second")
    lines = [next(x for x in log.splitlines() if f"features ({split})" in x) for split in ("train", "val")]
    # the split holding the changed file is computed again; the other one is still read from the cache
    assert sorted("computed" in x for x in lines) == [False, True], lines


def test_augmented_probes_cache_k_views_or_say_why_not(cifar_subset, tmp_path):
    _, log = _fit(cifar_subset["train"], tmp_path / "plain", augment="light")
    assert "features not cached: augmentation draws new views every epoch (pass --cache-views K" in log
    one, log = _fit(cifar_subset["train"], tmp_path / "views", augment="light", cache_views=3)
    assert "features (train): 360 x 256 x 3 views, computed" in log
    assert "features (val): 40 x 256, " in log  # validation is never augmented: one view
    two, log = _fit(cifar_subset["train"], tmp_path / "views2", augment="light", cache_views=3)
    assert "x 3 views, read from the cache" in log
    assert all(torch.equal(_weights(one)[k], _weights(two)[k]) for k in _weights(one))


def test_ema_and_dropout_on_cached_features_save_the_whole_model(cifar_subset, tmp_path):
    run, log = _fit(cifar_subset["train"], tmp_path / "ema", val=cifar_subset["test"], ema=0.5, dropout=0.2,
                    lr=0.05)
    assert "features (train)" in log and log.count("EMA val accuracy") == 2
    # the model's size is the whole backbone's, though only the head trains on the cached features
    assert "0.10M parameters, 0.00M trainable (linear-probe; the frozen backbone ran once, its features cached)" in log
    again = finetunekit.evaluate(run.run_dir, cifar_subset["test"])
    assert again["accuracy"] == pytest.approx(run.metrics["val"]["accuracy"], abs=1e-6)
    assert again["loss"] == pytest.approx(run.metrics["val"]["loss"], rel=1e-4)


def test_features_of_another_random_init_are_not_reused(cifar_subset, tmp_path, monkeypatch):
    """pretrained: false with another seed is another backbone: its features must be computed, not read
    from the first run's cache entry (the key holds the frozen weights' SHA-256)."""
    monkeypatch.setenv("FINETUNEKIT_CACHE", str(tmp_path / "cache"))
    _, first = _fit(cifar_subset["train"], tmp_path / "seed1")
    assert "features (train): 360 x 256, computed" in first
    recipe_seed = {"data": {"path": str(cifar_subset["train"]), "image_size": 32, "augment": "none", "num_workers": 0},
                   "model": {"name": "timm:test_efficientnet", "pretrained": False},
                   "train": {"strategy": "linear-probe", "epochs": 1, "batch_size": 16, "seed": 2},
                   "out": str(tmp_path / "seed2"), "quiet": True}
    run = finetunekit.fit(recipe_seed)
    assert "features (train): 360 x 256, computed" in (run.run_dir / "log.txt").read_text()
