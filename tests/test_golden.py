"""Golden runs: tiny fits whose every per-step loss and final weights are pinned, bit for bit on the CPU.

They guard the redesign of the core (issue 12): the loop, the tasks and the add-ons may move, the numbers
may not. Each case trains a tiny model from a config (no download) on real data and compares
  - every step's training loss (steps.csv, as the run logs it) exactly, and
  - the SHA-256 of the saved model's tensors (model/model.safetensors, names and bytes in sorted order).

The pinned values live in tests/golden/<case>.json, one variant per machine kind (CPU model and torch
version: oneDNN picks other kernels on another CPU, and float sums round differently). A run must match
its machine's variant bit for bit; on a machine with no variant, any variant bit for bit, or else the
first one within a relative 1e-3 per step (float noise, not a change of behaviour: another sample order,
augmentation draw or learning rate moves losses by far more). Add the variant of a new machine kind with
    FINETUNEKIT_WRITE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py
at a commit whose variants pass elsewhere, and never regenerate them to make a code change pass.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import platform
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import finetunekit

from conftest import CIFAR, save_tiny_bert, torch_threads, write_manifest

GOLDEN = Path(__file__).parent / "golden"
WRITE = os.environ.get("FINETUNEKIT_WRITE_GOLDEN") == "1"
def machine() -> str:
    """The machine kind the pinned values hold for: CPU model, architecture and torch version."""
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} ({platform.machine()}), torch {torch.__version__}"


FILLER = ["the", "movie", "was", "plot", "actors", "story", "a", "really", "quite", "film", "and", "it", "very"]


def weights_sha256(path: Path) -> str:
    h = hashlib.sha256()
    for name, t in sorted(load_file(str(path)).items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def step_losses(run_dir: Path) -> list[str]:
    """Per-step losses as logged, in repr form (exact)."""
    with (run_dir / "steps.csv").open(encoding="utf-8") as f:
        return [row["loss"] for row in csv.DictReader(f)]


@pytest.fixture(scope="module", autouse=True)
def pinned_threads():
    """The pinned values were made with 2 intra-op threads (this machine's cores): the thread count changes
    the order of float reductions, so it is pinned here whatever an earlier test left behind."""
    with torch_threads(2):
        yield


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    if not CIFAR.is_dir():
        pytest.skip(f"{CIFAR} not found (the shared datasets sit beside the repo)")
    d = tmp_path_factory.mktemp("golden-images")
    classes = ["airplane", "automobile", "bird", "cat"]
    return {"train": write_manifest(d / "train.csv", CIFAR / "train", 12, classes),
            "val": write_manifest(d / "val.csv", CIFAR / "test", 4, classes)}


@pytest.fixture(scope="module")
def tiny_bert_folder(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("golden-bert"), hidden_dropout=0.1)


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("golden-texts")
    rng = random.Random(0)
    cls, reg = d / "sentiment.csv", d / "scores.tsv"
    with cls.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(96):
            word = rng.choice(["good", "great"] if i % 2 else ["bad", "awful"])
            words = rng.sample(FILLER, rng.randint(2, 7))
            words.insert(rng.randint(0, len(words)), word)
            w.writerow([" ".join(words), "positive" if i % 2 else "negative"])
    with reg.open("w", encoding="utf-8") as f:
        f.write("sentence\tscore\n")
        for _ in range(96):
            n = rng.randint(0, 3)
            f.write(" ".join(["great"] * n + rng.sample(FILLER, 3)) + f"\t{n}\n")
    return {"classification": cls, "regression": reg}


def _image_recipe(images, out, **train):
    data = {"path": str(images["train"]), "val": str(images["val"]), "image_size": 32, "num_workers": 0,
            **train.pop("data", {})}
    return {"data": data, "model": {"name": "timm:test_efficientnet", "pretrained": False},
            "train": {"epochs": 2, "batch_size": 8, "seed": 7, "strategy": "full", **train}, "out": str(out),
            "quiet": True}


def _text_recipe(folder, data, out, task, **train):
    return {"task": task, "data": {"path": str(data)}, "model": {"name": f"hf:{folder}"},
            "train": {"epochs": 2, "batch_size": 16, "lr": 3e-3, "seed": 0, **train}, "out": str(out),
            "quiet": True}


CASES = {
    # image full fine-tune with EMA and MixUp/CutMix (light augmentation, decoded-image cache)
    "image-full-ema-mixup": lambda f, out: _image_recipe(
        f["images"], out, ema=0.9, data={"mixup": 0.4, "cutmix": 1.0, "augment": "light"}),
    # linear probe on cached features (augment none: the features are computed once)
    "image-linear-probe-cached": lambda f, out: _image_recipe(
        f["images"], out, strategy="linear-probe", epochs=3, data={"augment": "none"}),
    # lp-ft: the head alone, then everything
    # (on images: its head phase on cached features is tests/test_strategies.py's)
    "image-lp-ft": lambda f, out: _image_recipe(f["images"], out, strategy="lp-ft", epochs=2, head_epochs=1,
                                                data={"cache_features": "off"}),
    "text-classification": lambda f, out: _text_recipe(f["bert"], f["texts"]["classification"], out,
                                                       "text-classification"),
    "text-regression": lambda f, out: _text_recipe(f["bert"], f["texts"]["regression"], out, "text-regression"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_run(case, images, tiny_bert_folder, texts, tmp_path):
    fixtures = {"images": images, "bert": tiny_bert_folder, "texts": texts}
    run = finetunekit.fit(CASES[case](fixtures, tmp_path / "run"))
    got = {"losses": step_losses(run.run_dir), "weights_sha256": weights_sha256(run.model_dir / "model.safetensors"),
           "best_epoch": run.metrics["best_epoch"]}
    path = GOLDEN / f"{case}.json"
    here = machine()
    variants = json.loads(path.read_text(encoding="utf-8"))["variants"] if path.exists() else []
    if WRITE:
        GOLDEN.mkdir(exist_ok=True)
        variants = [v for v in variants if v["machine"] != here] + [{"machine": here, **got}]
        path.write_text(json.dumps({"variants": variants}, indent=1) + "\n", encoding="utf-8")
    fields = ("losses", "best_epoch", "weights_sha256")
    if any(all(v[k] == got[k] for k in fields) for v in variants):
        return  # bit for bit
    mine = [v for v in variants if v["machine"] == here]
    if mine:  # this machine's own variant: bit for bit, nothing less
        for k in fields:
            assert got[k] == mine[0][k], k
    want = variants[0]
    assert got["best_epoch"] == want["best_epoch"]
    assert [float(x) for x in got["losses"]] == pytest.approx([float(x) for x in want["losses"]], rel=1e-3)
