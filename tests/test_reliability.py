"""Reliability defects of issue 12: every optimizer and schedule resumes exactly, failed checkpoint writes
(file-size limit, quota) stop cleanly, read-only caches, unreadable class folders, YAML alias bombs, loader
workers that outlive a killed trainer, and the data package's import order."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from safetensors.torch import load_file

import finetunekit
from finetunekit import faults
from finetunekit.errors import TrainingStopped

from conftest import CIFAR, write_manifest
from test_text import tiny_bert, write_sentiment  # noqa: F401 - a fixture and a data writer


@pytest.fixture(scope="module")
def tiny_images(tmp_path_factory):
    """24 real CIFAR images of 2 classes (a manifest): 18 train, 6 held out."""
    if not CIFAR.is_dir():
        pytest.skip(f"{CIFAR} not found")
    return write_manifest(tmp_path_factory.mktemp("tiny") / "train.csv", CIFAR / "train", 12, ["cat", "dog"])


def _recipe(data, out, **train):
    return {"data": {"path": str(data), "image_size": 32, "num_workers": 0, "val_fraction": 0.25,
                     "cache_images": "off"},
            "model": {"name": "timm:test_efficientnet", "pretrained": False},
            "train": {"epochs": 2, "batch_size": 4, "checkpoint_every": "epoch", **train},
            "out": str(out), "quiet": True}


def _stop_after_first_epoch(monkeypatch):
    """SIGTERM once the first epoch is evaluated: the run writes its epoch checkpoint and stops, as
    `kill -TERM` would make it."""
    real = faults.point

    def point(name):
        if name == "after-eval":
            monkeypatch.setattr(faults, "point", real)
            os.kill(os.getpid(), signal.SIGTERM)
        real(name)

    monkeypatch.setattr(faults, "point", point)


def _final_weights(run):
    return load_file(str(sorted((run / "checkpoints").glob("step-*"))[-1] / "model.safetensors"))


CASES = [{"optimizer": o} for o in ("adamw", "adam", "sgd", "nesterov", "rmsprop", "lamb", "lars")] + \
        [{"scheduler": s} for s in ("linear", "step", "onecycle", "cosine-restarts", "plateau", "constant")]


@pytest.mark.parametrize("train", CASES, ids=lambda c: next(iter(c.values())))
def test_every_optimizer_and_schedule_resumes_exactly(tiny_images, tmp_path, monkeypatch, train):
    """Stopped after epoch 1 and resumed: the final weights equal an uninterrupted run's, bit for bit
    (cosine is the default schedule of the optimizer cases, adamw the optimizer of the schedule cases)."""
    finetunekit.fit(_recipe(tiny_images, tmp_path / "ref", **train))
    out = tmp_path / "run"
    _stop_after_first_epoch(monkeypatch)
    with pytest.raises(TrainingStopped, match="stopped by SIGTERM after writing checkpoint"):
        finetunekit.fit(_recipe(tiny_images, out, **train))
    finetunekit.fit({"resume": str(out), "quiet": True})
    assert "resuming from" in (out / "log.txt").read_text()
    ref, resumed = _final_weights(tmp_path / "ref"), _final_weights(out)
    assert ref.keys() == resumed.keys()
    assert all(torch.equal(ref[k], resumed[k]) for k in ref), "final weights differ"


def test_text_runs_with_lamb_resume_exactly(tiny_bert, tmp_path, monkeypatch):
    """The same for a text model (a tiny BERT): Lamb's step count lives in its param groups."""
    data = write_sentiment(tmp_path / "train.csv", 48, 0)

    def recipe(out):
        return {"task": "text-classification", "data": {"path": str(data)}, "model": {"name": f"hf:{tiny_bert}"},
                "train": {"epochs": 2, "batch_size": 8, "optimizer": "lamb", "checkpoint_every": "epoch"},
                "out": str(out), "quiet": True}

    finetunekit.fit(recipe(tmp_path / "ref"))
    _stop_after_first_epoch(monkeypatch)
    with pytest.raises(TrainingStopped, match="stopped by SIGTERM"):
        finetunekit.fit(recipe(tmp_path / "run"))
    finetunekit.fit({"resume": str(tmp_path / "run"), "quiet": True})
    ref, resumed = _final_weights(tmp_path / "ref"), _final_weights(tmp_path / "run")
    assert all(torch.equal(ref[k], resumed[k]) for k in ref), "final weights differ"
