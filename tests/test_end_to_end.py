"""The real CLI and the real offline backbone on real CIFAR-10 images: artifacts, reload, interop."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest
import torch

import finetunekit
from finetunekit.cli import RECIPES_DIR

from conftest import ROOT, run_cli


@pytest.fixture(scope="module")
def lite0_run(cifar_subset, tmp_path_factory):
    """The shipped linear-probe recipe through the real CLI, on 40 images a class, 3 epochs."""
    out = tmp_path_factory.mktemp("e2e") / "run"
    r = run_cli("fit", "--config", "cifar10-lite0-linear-probe", "--data", str(cifar_subset["train"]),
                "--test", str(cifar_subset["test"]), "--epochs", "3", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_recipe_run_learns_and_writes_every_artifact(lite0_run):
    out = lite0_run
    for name in ("recipe.yaml", "split.json", "metrics.json", "history.csv", "log.txt",
                 "model/model.safetensors", "model/config.json"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["samples"] == 200
    assert metrics["test"]["accuracy"] > 0.3, metrics["test"]["accuracy"]  # chance is 0.1
    for key in ("top5_accuracy", "macro_f1", "per_class", "confusion_matrix"):
        assert key in metrics["test"]
    assert len(metrics["test"]["confusion_matrix"]) == 10 and sum(map(sum, metrics["test"]["confusion_matrix"])) == 200
    assert set(metrics["test"]["per_class"]) == set(metrics["classes"])
    assert metrics["peak_rss_mb"]["process"] > 0
    with (out / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    resolved = finetunekit.Recipe.load(out / "recipe.yaml")
    assert resolved.train.strategy == "linear-probe" and resolved.train.lr is not None
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["label_names"] == metrics["classes"] and config["architecture"] == "tf_efficientnet_lite0"
    assert config["pretrained_cfg"]["input_size"] == [3, 64, 64]


def test_reload_in_a_fresh_process_predicts_identically(lite0_run, cifar_subset):
    with cifar_subset["test"].open() as f:
        images = [row["path"] for row in csv.DictReader(f)][::25]
    model = finetunekit.load(lite0_run)
    here = model.logits(images)
    code = ("import sys, json, finetunekit\n"
            "m = finetunekit.load(sys.argv[1])\n"
            "print(json.dumps(m.logits(sys.argv[2:]).tolist()))\n")
    r = subprocess.run([sys.executable, "-c", code, str(lite0_run), *images], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    there = torch.tensor(json.loads(r.stdout))
    torch.testing.assert_close(there, here, rtol=0, atol=1e-5)
    preds = model.predict(images)
    assert [p["label"] for p in preds] == [model.classes[i] for i in here.argmax(-1)]


def test_model_folder_loads_with_plain_timm(lite0_run, cifar_subset):
    import timm

    model = finetunekit.load(lite0_run)
    with cifar_subset["test"].open() as f:
        images = [row["path"] for row in csv.DictReader(f)][:4]
    x = torch.stack([model.transform(model._image(p)) for p in images])
    with torch.no_grad():
        expected = model.module(x)
    weights = lite0_run / "model" / "model.safetensors"
    plain = timm.create_model("tf_efficientnet_lite0", pretrained=True, num_classes=10,
                              pretrained_cfg_overlay=dict(file=str(weights), num_classes=10)).eval()
    local = timm.create_model(f"local-dir:{lite0_run / 'model'}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), expected)
        torch.testing.assert_close(local(x), expected)
    assert local.pretrained_cfg["label_names"] == model.classes


def test_cli_predict_and_evaluate(lite0_run, cifar_subset, tmp_path):
    with cifar_subset["test"].open() as f:
        rows = list(csv.DictReader(f))
    folder = tmp_path / "imgs"
    folder.mkdir()
    for row in rows[:3]:
        (folder / row["path"].rsplit("/", 1)[-1]).write_bytes(open(row["path"], "rb").read())
    r = run_cli("predict", str(lite0_run), rows[50]["path"], str(folder), "--format", "csv", "--top-k", "2")
    assert r.returncode == 0, r.stderr
    table = list(csv.DictReader(io.StringIO(r.stdout)))
    assert len(table) == 4 and table[0]["path"] == rows[50]["path"]
    classes = json.loads((lite0_run / "metrics.json").read_text())["classes"]
    assert all(t["label"] in classes and 0 <= float(t["score"]) <= 1 and t["label2"] in classes for t in table)

    bad = tmp_path / "broken.jpg"
    bad.write_text("not a picture")
    r = run_cli("predict", str(lite0_run), str(bad), "--strict")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
    assert "broken.jpg: cannot read as an image" in r.stderr
    r = run_cli("predict", str(lite0_run), rows[50]["path"], str(bad), "--format", "csv")  # skipped, listed
    assert r.returncode == 0 and "warning: 1 of 2 images could not be read" in r.stderr, r.stderr
    assert [bool(t["error"]) for t in csv.DictReader(io.StringIO(r.stdout))] == [False, True]

    r = run_cli("evaluate", str(lite0_run), "--data", str(cifar_subset["test"]), "--output", str(tmp_path / "e.json"))
    assert r.returncode == 0, r.stderr
    again = json.loads((tmp_path / "e.json").read_text())
    saved = json.loads((lite0_run / "metrics.json").read_text())["test"]
    assert again["accuracy"] == pytest.approx(saved["accuracy"], abs=1e-6)
    assert again["confusion_matrix"] == saved["confusion_matrix"]


def test_full_recipe_runs(cifar_subset, tmp_path):
    """The shipped full fine-tune recipe, cut to one epoch at 32 px."""
    out = tmp_path / "full"
    r = run_cli("fit", "--config", "cifar10-lite0-full", "--data", str(cifar_subset["train"]), "--epochs", "1",
                "--image-size", "32", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["strategy"] == "full" and metrics["val"]["loss"] < 2.3026  # below chance's ln(10) after 11 updates
    assert (RECIPES_DIR / "cifar10-lite0-full.yaml").is_file()


OFFLINE_RECIPES = ["cifar10-lite0-linear-probe", "cifar10-lite0-full", "cifar10-lite0-gradual", "mlp-head-sgd",
                   "imbalanced-focal-differential-lr", "sst2-minilm", "text-frozen-layers-focal",
                   "pair-classification-minilm"]


@pytest.mark.slow
@pytest.mark.parametrize("name", OFFLINE_RECIPES)
def test_every_offline_recipe_runs(name, cifar_subset, tmp_path):
    """Each shipped offline recipe, through the CLI, for 2 epochs on a small slice of its kind of data."""
    import json

    from finetunekit import Recipe

    recipe = Recipe.load(RECIPES_DIR / f"{name}.yaml")
    if recipe.modality == "image":
        data = ["--data", str(cifar_subset["train"]), "--image-size", "32"]
    else:
        sst2 = ROOT.parent / "shared" / "data" / "sst2"
        rows = (sst2 / "train.tsv").read_text(encoding="utf-8").splitlines()
        train = tmp_path / "train.tsv"
        if recipe.data.text_column and "," in recipe.data.text_column:  # a pair recipe: two columns of SST-2
            lines = ["premise\thypothesis\tlabel"] + [f"{a.split(chr(9))[0]}\t{b.split(chr(9))[0]}\t"
                                                       f"{int(a.split(chr(9))[1] == b.split(chr(9))[1])}"
                                                       for a, b in zip(rows[1:161], rows[161:321])]
        else:
            lines = rows[:161]
        train.write_text("\n".join(lines) + "\n", encoding="utf-8")
        data = ["--data", str(train), "--val", str(train)]
    r = run_cli("fit", "--config", name, *data, "--epochs", "2", "--out", str(tmp_path / "run"), "--quiet",
                *(["--head-epochs", "1"] if recipe.train.strategy in ("lp-ft", "freeze-unfreeze") else []))
    assert r.returncode == 0, r.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and metrics["best_epoch"] >= 1
