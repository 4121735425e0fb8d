"""Strategies, accumulation and reproducibility, with timm's tiny test models on real CIFAR images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import finetunekit
from finetunekit.loop import _better, _score
from finetunekit.models import create_backbone


def _fit(cifar_subset, out, **train):
    recipe = {"data": {"path": str(cifar_subset["train"]), "image_size": 32, "augment": "none",
                       "num_workers": 0},
              "model": {"name": train.pop("model", "timm:test_efficientnet"), "pretrained": False,
                        "weights": train.pop("weights", None)},
              "train": {"epochs": 1, "batch_size": 16, **train}, "out": str(out), "quiet": True}
    return finetunekit.fit(recipe)


def _initial_weights(tmp_path, spec="timm:test_efficientnet"):
    backbone = create_backbone(spec, num_classes=10, pretrained=False)
    path = tmp_path / "init.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.module.state_dict().items()}, str(path))
    return path, load_file(str(path))


def test_linear_probe_trains_the_head_only_and_keeps_bn_statistics(cifar_subset, tmp_path):
    init_path, init = _initial_weights(tmp_path)
    run = _fit(cifar_subset, tmp_path / "run", strategy="linear-probe", weights=str(init_path))
    after = load_file(str(run.model_dir / "model.safetensors"))
    changed = {k for k in init if not torch.equal(init[k], after[k])}
    assert changed == {"classifier.weight", "classifier.bias"}  # running_mean/var included in "unchanged"


def test_full_trains_every_layer(cifar_subset, tmp_path):
    init_path, init = _initial_weights(tmp_path)
    run = _fit(cifar_subset, tmp_path / "run", strategy="full", weights=str(init_path), lr=1e-3)
    after = load_file(str(run.model_dir / "model.safetensors"))
    assert not torch.equal(init["conv_stem.weight"], after["conv_stem.weight"])
    assert not torch.equal(init["bn1.running_mean"], after["bn1.running_mean"])
    assert not torch.equal(init["classifier.weight"], after["classifier.weight"])


def test_same_seed_gives_identical_weights(cifar_subset, tmp_path):
    runs = [_fit(cifar_subset, tmp_path / f"run{i}", seed=3, epochs=2) for i in range(2)]
    a, b = (load_file(str(r.model_dir / "model.safetensors")) for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = load_file(str(_fit(cifar_subset, tmp_path / "run-other", seed=4).model_dir / "model.safetensors"))
    assert not all(torch.equal(a[k], other[k]) for k in a)


def test_gradient_accumulation_matches_a_larger_batch(cifar_subset, tmp_path):
    """batch 6 x accumulate 2 == batch 12 on a model without batch statistics (LayerNorm ViT)."""
    init_path, _ = _initial_weights(tmp_path, "timm:test_vit")
    common = dict(model="timm:test_vit", weights=str(init_path), clip_grad=None, warmup=0, seed=1)
    big = _fit(cifar_subset, tmp_path / "big", batch_size=12, grad_accum=1, **common)
    acc = _fit(cifar_subset, tmp_path / "acc", batch_size=6, grad_accum=2, **common)
    a, b = (load_file(str(r.model_dir / "model.safetensors")) for r in (big, acc))
    init = load_file(str(init_path))
    assert not torch.equal(a["head.weight"], init["head.weight"])
    for k in a:
        if k.endswith("attn.qkv.bias"):
            # the key bias gets an exactly-zero gradient in theory (softmax is shift-invariant); AdamW turns
            # its float round-off into lr-sized steps, so it differs between any two summation orders
            continue
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_best_epoch_rules():
    assert _better(_score("accuracy", {"accuracy": 0.5, "loss": 1.0}), None)
    assert not _better(_score("accuracy", {"accuracy": math.nan, "loss": 1.0}), None)  # NaN is never best
    best = _score("accuracy", {"accuracy": 0.9, "loss": 0.5})
    assert _better(_score("accuracy", {"accuracy": 0.9, "loss": 0.4}), best)  # tie -> lower loss wins
    assert not _better(_score("accuracy", {"accuracy": 0.89, "loss": 0.1}), best)
    assert _better(_score("loss", {"accuracy": 0.1, "loss": 0.3}), _score("loss", {"accuracy": 0.9, "loss": 0.4}))


def test_existing_run_is_never_overwritten_silently(cifar_subset, tmp_path):
    out = tmp_path / "run"
    _fit(cifar_subset, out)
    before = (out / "model" / "model.safetensors").read_bytes()
    with pytest.raises(finetunekit.UserError, match="already holds a finetunekit run"):
        _fit(cifar_subset, out)
    assert (out / "model" / "model.safetensors").read_bytes() == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(finetunekit.UserError, match="replaces finetunekit runs only"):
        finetunekit.fit({"data": {"path": str(cifar_subset["train"])}, "out": str(mine), "overwrite": True})
    assert (mine / "notes.txt").read_text() == "precious"


def test_soft_targets_give_the_cross_entropy_of_the_mixture():
    from finetunekit.tasks import Classification

    logits = torch.randn(4, 3)
    soft = torch.softmax(torch.randn(4, 3), -1)
    expected = -(soft * logits.log_softmax(-1)).sum(-1).mean()
    assert torch.allclose(Classification(["a", "b", "c"], label_smoothing=0.1).loss(logits, soft), expected)


def test_mixup_cutmix_strong_augment_and_flip_tta_run_end_to_end(cifar_subset, tmp_path):
    run = finetunekit.fit({
        "data": {"path": str(cifar_subset["train"]), "test": str(cifar_subset["test"]), "image_size": 32,
                 "augment": "strong", "mixup": 0.2, "cutmix": 1.0, "mixup_off_epoch": 2, "tta": "flip",
                 "num_workers": 0},
        "model": {"name": "timm:test_efficientnet", "pretrained": False},
        "train": {"epochs": 2, "batch_size": 16}, "out": str(tmp_path / "run"), "quiet": True})
    log = (run.run_dir / "log.txt").read_text()
    assert "MixUp 0.2, CutMix 1, off from epoch 2" in log
    assert math.isfinite(run.metrics["val"]["loss"])
    model = finetunekit.load(run.run_dir)
    assert model.tta == "flip"
    # the saved model predicts with the same flip-averaged logits that scored the test set
    r = finetunekit.evaluate(run.run_dir, cifar_subset["test"])
    assert r["accuracy"] == pytest.approx(run.metrics["test"]["accuracy"], abs=1e-6)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain, mirrored = model.module(x), model.module(x.flip(-1))
    from finetunekit.addons.tta import with_tta

    with torch.no_grad():
        assert torch.allclose(with_tta(model.module, "flip")(x), (plain + mirrored) / 2)


def test_mixup_needs_an_even_batch(cifar_subset, tmp_path):
    with pytest.raises(finetunekit.UserError, match="--batch-size 15: MixUp/CutMix"):
        finetunekit.fit({"data": {"path": str(cifar_subset["train"]), "mixup": 0.2}, "train": {"batch_size": 15},
                         "out": str(tmp_path / "run")})


def test_ema_is_evaluated_and_the_saved_weights_are_the_ones_scored(cifar_subset, tmp_path):
    run = finetunekit.fit({
        "data": {"path": str(cifar_subset["train"]), "val": str(cifar_subset["test"]), "image_size": 32,
                 "augment": "none", "num_workers": 0},
        "model": {"name": "timm:test_efficientnet", "pretrained": False},
        "train": {"epochs": 2, "batch_size": 16, "ema": 0.9}, "out": str(tmp_path / "run"), "quiet": True})
    log = (run.run_dir / "log.txt").read_text()
    assert log.count("EMA val accuracy") == 2
    again = finetunekit.evaluate(run.run_dir, cifar_subset["test"])
    assert again["accuracy"] == pytest.approx(run.metrics["val"]["accuracy"], abs=1e-6)
    assert again["loss"] == pytest.approx(run.metrics["val"]["loss"], rel=1e-4)


def test_mlp_head_trains_as_the_head_and_reloads(cifar_subset, tmp_path):
    run = finetunekit.fit({
        "data": {"path": str(cifar_subset["train"]), "val": str(cifar_subset["test"]), "image_size": 32,
                 "augment": "none", "num_workers": 0},
        "model": {"name": "timm:test_efficientnet", "pretrained": False, "head": "mlp:32", "dropout": 0.2},
        "train": {"epochs": 1, "batch_size": 16, "strategy": "linear-probe"}, "out": str(tmp_path / "run"),
        "quiet": True})
    model = finetunekit.load(run.run_dir)
    head = model.module.get_submodule(model.backbone.head)
    assert isinstance(head, torch.nn.Sequential) and head[1].out_features == 32 and head[-1].out_features == 10
    again = finetunekit.evaluate(run.run_dir, cifar_subset["test"])
    assert again["accuracy"] == pytest.approx(run.metrics["val"]["accuracy"], abs=1e-6)
    backbone = create_backbone("timm:test_efficientnet", 10, pretrained=False, dropout=0.3)
    assert backbone.module.drop_rate == 0.3
    with pytest.raises(finetunekit.UserError, match="--head mlp:: expected linear or mlp:N"):
        create_backbone("timm:test_efficientnet", 10, pretrained=False, head="mlp:")


ANIMALS = {"bird", "cat", "deer", "dog", "frog", "horse"}


def _table(cifar_subset, path, kind):
    import csv

    rows = list(csv.DictReader(cifar_subset["train"].open()))
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "labels" if kind == "multilabel" else "value"])
        for r in rows:
            if kind == "multilabel":
                w.writerow([r["path"], "|".join(["animal" if r["label"] in ANIMALS else "vehicle", r["label"]])])
            else:
                w.writerow([r["path"], 1.0 if r["label"] in ANIMALS else 0.0])
    return path


@pytest.mark.parametrize("kind", ["multilabel", "regression"])
def test_image_multilabel_and_regression_from_a_table(cifar_subset, tmp_path, kind):
    table = _table(cifar_subset, tmp_path / "t.csv", kind)
    run = finetunekit.fit({
        "task": f"image-{kind}", "data": {"path": str(table), "val": str(table), "image_size": 32,
                                          "augment": "none", "num_workers": 0},
        "model": {"name": "timm:test_efficientnet", "pretrained": False},
        "train": {"epochs": 1, "batch_size": 16}, "out": str(tmp_path / "run"), "quiet": True})
    val = run.metrics["val"]
    model = finetunekit.load(run.run_dir)
    pred = model.predict([next(csv_paths(cifar_subset))])[0]
    if kind == "multilabel":
        assert run.metrics["classes"][:2] == ["airplane", "animal"] and len(run.metrics["classes"]) == 12
        assert {"micro_f1", "map"} <= set(val) and set(pred["scores"]) == set(run.metrics["classes"])
    else:
        assert run.metrics["classes"] == [] and {"rmse", "r2"} <= set(val) and isinstance(pred["value"], float)
    again = finetunekit.evaluate(run.run_dir, table)
    key = "micro_f1" if kind == "multilabel" else "rmse"
    assert again[key] == pytest.approx(val[key], abs=1e-5)


def csv_paths(cifar_subset):
    import csv

    return (r["path"] for r in csv.DictReader(cifar_subset["train"].open()))


def test_l1_penalty_shrinks_the_head_and_is_kept_out_of_the_logged_loss(cifar_subset, tmp_path):
    init_path, init = _initial_weights(tmp_path)
    common = dict(strategy="linear-probe", weights=str(init_path), seed=2, lr=1e-2, warmup=0)
    plain = _fit(cifar_subset, tmp_path / "plain", **common)
    sparse = _fit(cifar_subset, tmp_path / "l1", l1_penalty=0.01, **common)
    w = {name: load_file(str(r.model_dir / "model.safetensors"))["classifier.weight"]
         for name, r in (("plain", plain), ("l1", sparse))}
    assert w["l1"].abs().sum() < 0.9 * w["plain"].abs().sum()
    assert "L1 penalty 0.01 on 1 head weight tensors (2560 values)" in (sparse.run_dir / "log.txt").read_text()
    # the logged train loss is the task's loss alone: it stays on the same scale as without the penalty
    penalty_at_init = 0.01 * init["classifier.weight"].abs().sum().item()
    assert penalty_at_init > 0.2 * 2.3  # large enough that the check below would catch it in the logged loss
    train_loss = [float(r.run_dir.joinpath("history.csv").read_text().splitlines()[1].split(",")[2])
                  for r in (plain, sparse)]
    assert train_loss[1] == pytest.approx(train_loss[0], rel=0.2)


def test_tta_views_flip_and_crop_sets():
    from finetunekit.addons.tta import tta_views, with_tta

    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    assert [len(tta_views(x, t)) for t in ("none", "flip", "crops", "flip-crops")] == [1, 2, 6, 7]
    views = tta_views(x, "flip-crops")
    assert all(v.shape == x.shape for v in views)
    assert torch.equal(views[1], x.flip(-1))
    # the top-left crop (7 x 7 of 8 x 8) resized back starts at the image's first pixel; bottom-right ends at its last
    top_left, bottom_right = views[3], views[6]
    assert top_left[..., 0, 0].equal(x[..., 0, 0]) and bottom_right[..., -1, -1].equal(x[..., -1, -1])
    assert not torch.equal(top_left, bottom_right)
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 64, 4))
    with torch.no_grad():
        expected = sum(module(v) for v in views) / 7
        assert torch.allclose(with_tta(module, "flip-crops")(x), expected)
        assert with_tta(module, "none") is module


def test_rotation_elastic_and_vertical_flip_augment_the_training_images_only():
    from PIL import Image

    from finetunekit.data import Preprocessing, build_transform

    pre = Preprocessing(input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    img = Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype("uint8"))
    plain = build_transform(pre, "none")
    medical = build_transform(pre, "none", rotate=30, elastic=40, vflip=True)
    names = [type(t).__name__ for t in medical.transforms]
    assert {"RandomVerticalFlip", "RandomRotation", "RandomApply"} <= set(names)
    assert names.index("RandomRotation") < names.index("MaybeToTensor")  # on the PIL image
    torch.manual_seed(0)
    outs = [medical(img) for _ in range(4)]
    assert all(o.shape == (3, 32, 32) for o in outs)
    assert not all(torch.equal(o, plain(img)) for o in outs)
    assert torch.equal(plain(img), plain(img))


def test_geometric_augmentation_is_refused_for_text(tmp_path):
    (tmp_path / "t.csv").write_text("text,label\na,x\nb,y\n")
    with pytest.raises(finetunekit.UserError, match="--rotate: does not apply to --task text-classification"):
        finetunekit.fit({"task": "text-classification", "data": {"path": str(tmp_path / "t.csv"), "rotate": 10},
                         "out": str(tmp_path / "run")})
