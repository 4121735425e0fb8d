"""Strategies, accumulation and reproducibility, with timm's tiny test models on real CIFAR images."""

from __future__ import annotations

import math

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
