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
    # an automatic validation split: one pool over train and val
    assert "features (train and val, pooled): 400 x 256, computed" in log
    a, b = _weights(plain), _weights(cached)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
    assert cached.metrics["val"]["accuracy"] == pytest.approx(plain.metrics["val"]["accuracy"], abs=1e-6)
    again, log = _fit(cifar_subset["train"], tmp_path / "again")
    assert "features (train and val, pooled): 400 x 256, read from the cache" in log
    assert all(torch.equal(_weights(again)[k], b[k]) for k in b)
    # the saved model is the whole network: it scores like training's validation did
    r = finetunekit.evaluate(cached.run_dir, cifar_subset["train"])
    assert 0 <= r["accuracy"] <= 1 and r["samples"] == 400


def test_another_seed_reads_the_pooled_features_of_another_split(cifar_subset, tmp_path, monkeypatch):
    """With an automatic validation split, another --seed splits differently, yet reads the same pool."""
    monkeypatch.setenv("FINETUNEKIT_CACHE", str(tmp_path / "cache"))
    first, _ = _fit(cifar_subset["train"], tmp_path / "init")  # its saved weights: a fixed backbone for both seeds
    weights = first.model_dir / "model.safetensors"

    def run(seed):
        r = finetunekit.fit({"data": {"path": str(cifar_subset["train"]), "image_size": 32, "augment": "none",
                                      "num_workers": 0},
                             "model": {"name": "timm:test_efficientnet", "pretrained": False, "weights": str(weights)},
                             "train": {"strategy": "linear-probe", "epochs": 1, "batch_size": 16, "seed": seed},
                             "out": str(tmp_path / f"seed{seed}"), "quiet": True})
        return (r.run_dir / "log.txt").read_text(), (r.run_dir / "split.json").read_text()

    log2, split2 = run(2)
    log3, split3 = run(3)
    assert "features (train and val, pooled): 400 x 256, computed" in log2
    assert "features (train and val, pooled): 400 x 256, read from the cache" in log3
    assert split2 != split3  # another split, the same features


def test_a_changed_image_recomputes_its_split(cifar_subset, tmp_path):
    """With a validation set given, each split is cached on its own."""
    rows = list(csv.DictReader(cifar_subset["train"].open()))
    changed = tmp_path / "changed.png"
    shutil.copy(rows[0]["path"], changed)
    manifest = tmp_path / "train.csv"
    with manifest.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows([[changed if i == 0 else r["path"], r["label"]] for i, r in enumerate(rows)])
    _fit(manifest, tmp_path / "first", val=cifar_subset["test"])
    with changed.open("ab") as f:
        f.write(b"\0")  # same pixels, other bytes: the content hash moves, so the cache entry does
    _, log = _fit(manifest, tmp_path / "second", val=cifar_subset["test"])
    lines = [next(x for x in log.splitlines() if f"features ({split})" in x) for split in ("train", "val")]
    # the split holding the changed file is computed again; the other one is still read from the cache
    assert sorted("computed" in x for x in lines) == [False, True], lines


def test_augmented_probes_cache_one_plain_view_or_k_augmented_ones(cifar_subset, tmp_path):
    plain, log = _fit(cifar_subset["train"], tmp_path / "plain", augment="light")
    assert "features cached without augmentation (the linear-probe default; --cache-views K" in log
    assert "features (train and val, pooled): 400 x 256, " in log
    unaugmented, _ = _fit(cifar_subset["train"], tmp_path / "none")  # augment none: the very same features
    assert all(torch.equal(_weights(plain)[k], _weights(unaugmented)[k]) for k in _weights(plain))
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
    assert "features (train and val, pooled): 400 x 256, computed" in first
    recipe_seed = {"data": {"path": str(cifar_subset["train"]), "image_size": 32, "augment": "none", "num_workers": 0},
                   "model": {"name": "timm:test_efficientnet", "pretrained": False},
                   "train": {"strategy": "linear-probe", "epochs": 1, "batch_size": 16, "seed": 2},
                   "out": str(tmp_path / "seed2"), "quiet": True}
    run = finetunekit.fit(recipe_seed)
    assert "features (train and val, pooled): 400 x 256, computed" in (run.run_dir / "log.txt").read_text()


def _steps(run) -> list[float]:
    with (run.run_dir / "steps.csv").open() as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_the_head_phase_of_lp_ft_trains_on_cached_features(cifar_subset, tmp_path, monkeypatch):
    """lp-ft's head-only epochs read cached features, then every layer trains on the images: the same
    per-step losses as the uncached run, up to float noise (both unaugmented: the cached head phase is)."""
    monkeypatch.setenv("FINETUNEKIT_CACHE", str(tmp_path / "cache"))
    def fit(out, **data):
        return finetunekit.fit({"data": {"path": str(cifar_subset["train"]), "image_size": 32, "augment": "none",
                                         "num_workers": 0, **data},
                                "model": {"name": "timm:test_efficientnet", "pretrained": False},
                                "train": {"strategy": "lp-ft", "epochs": 3, "head_epochs": 2, "batch_size": 16,
                                          "seed": 1},
                                "out": str(tmp_path / out), "quiet": True})
    cached, plain = fit("cached"), fit("plain", cache_features="off")
    log = (cached.run_dir / "log.txt").read_text()
    assert "the head-only phase (2 epochs) trains on cached features" in log
    assert "features (train and val, pooled): 400 x 256, computed" in log
    assert "epoch 3: training all parameters; " in log and ", on cached features" not in log.split("epoch 3:")[1]
    assert "head-only phase: features not cached: --cache-features off" in (plain.run_dir / "log.txt").read_text()
    a, b = _steps(cached), _steps(plain)
    assert len(a) == len(b) == 66  # 22 full batches of 16 (360 images) x 3 epochs
    assert a == pytest.approx(b, rel=1e-4)
    assert cached.metrics["val"]["accuracy"] == pytest.approx(plain.metrics["val"]["accuracy"], abs=0.03)
    # the saved model is the whole network, and scores as validation said
    again = finetunekit.evaluate(cached.run_dir, cifar_subset["train"])
    assert again["samples"] == 400


def test_no_cached_head_phase_with_ema(cifar_subset, tmp_path):
    run = finetunekit.fit({"data": {"path": str(cifar_subset["train"]), "image_size": 32, "augment": "none",
                                    "num_workers": 0},
                           "model": {"name": "timm:test_efficientnet", "pretrained": False},
                           "train": {"strategy": "freeze-unfreeze", "epochs": 2, "batch_size": 16, "ema": 0.9},
                           "out": str(tmp_path / "ema"), "quiet": True})
    assert "head-only phase: features not cached: --ema averages the whole model" in \
        (run.run_dir / "log.txt").read_text()


def test_the_same_images_under_other_labels_are_not_read_back(cifar_subset, tmp_path, monkeypatch):
    """The cache holds targets with the features: a table that labels the same files otherwise (another
    task, other classes) must not read the first table's entry."""
    monkeypatch.setenv("FINETUNEKIT_CACHE", str(tmp_path / "cache"))

    def relabel(src, dst):
        rows = list(csv.DictReader(src.open()))
        with dst.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label"])
            w.writerows([[r["path"], "animal" if r["label"] in ("cat", "dog", "deer", "horse", "frog", "bird")
                          else "vehicle"] for r in rows])
        return dst

    _fit(cifar_subset["train"], tmp_path / "ten", val=cifar_subset["test"])
    run, log = _fit(relabel(cifar_subset["train"], tmp_path / "train2.csv"), tmp_path / "two",
                    val=relabel(cifar_subset["test"], tmp_path / "val2.csv"))
    assert "features (train): 400 x 256, computed" in log and "features (val): 200 x 256, computed" in log
    assert run.metrics["classes"] == ["animal", "vehicle"]
