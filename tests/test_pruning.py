"""`fit --prune R`: structured channel pruning with torch-pruning, then fine-tuning. A tiny real run (timm's
test_efficientnet, 32 px, --prune 0.5): the parameter count drops as channel pruning predicts, the pruned model
trains, its folder loads back in a fresh process and predicts exactly as the training process scored it, a
killed run resumes to the same weights, and the options that make no sense are one line, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import finetunekit
from finetunekit import UserError

from conftest import CIFAR, ROOT, run_cli, write_manifest

CLASSES = ["cat", "dog"]


def _args(data: dict, out, *extra: str) -> tuple[str, ...]:
    return ("fit", "--data", str(data["train"]), "--test", str(data["test"]), "--model", "timm:test_efficientnet",
            "--no-pretrained", "--image-size", "32", "--prune", "0.5", "--epochs", "2", "--batch-size", "4",
            "--lr", "0.01", "--augment", "none", "--num-workers", "0", "--checkpoint-every", "2", "--out", str(out),
            "--quiet", *extra)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    if not CIFAR.is_dir():
        pytest.skip(f"{CIFAR} not found (the shared datasets sit beside the repo)")
    d = tmp_path_factory.mktemp("prune")
    return {"train": write_manifest(d / "train.csv", CIFAR / "train", 8, CLASSES),
            "test": write_manifest(d / "test.csv", CIFAR / "test", 4, CLASSES), "dir": d,
            "images": [str(p) for c in CLASSES for p in sorted((CIFAR / "test" / c).glob("*.jpg"))[:3]]}


def _recipe(data: dict, out, **train) -> dict:
    """The recipe of _args, for runs in this process."""
    return {"quiet": True, "out": str(out),
            "data": {"path": str(data["train"]), "test": str(data["test"]), "image_size": 32, "augment": "none",
                     "num_workers": 0},
            "model": {"name": "timm:test_efficientnet", "pretrained": False, "prune": 0.5},
            "train": {"epochs": 2, "batch_size": 4, "lr": 0.01, "checkpoint_every": "2", **train}}


@pytest.fixture(scope="module")
def pruned_run(data):
    return finetunekit.fit(_recipe(data, data["dir"] / "run")).run_dir


def test_pruning_halves_the_channels_and_the_run_trains(pruned_run):
    import timm

    log = (pruned_run / "log.txt").read_text()
    assert "strategy auto -> full: --prune 0.5" in log
    assert "--prune 0.5: 50% of the channels" in log and "MACs at 32 px" in log
    config = json.loads((pruned_run / "model" / "config.json").read_text())
    layers = config["finetunekit"]["pruned_layers"]
    assert config["finetunekit"]["prune"] == 0.5 and layers
    assert layers["classifier"]["out_features"] == 2  # the head's outputs are never pruned
    # half the channels of each group: the stem keeps 16 of 32, a depthwise conv keeps groups == channels
    full = timm.create_model("test_efficientnet", pretrained=False, num_classes=2)
    assert layers["conv_stem"]["out_channels"] == full.conv_stem.out_channels // 2
    dw = [s for s in layers.values() if "groups" in s and s["groups"] > 1]
    assert dw and all(s["groups"] == s["in_channels"] == s["out_channels"] for s in dw)
    # conv weights scale with in x out channels: about a quarter of the parameters are left
    saved = load_file(str(pruned_run / "model" / "model.safetensors"))
    params = sum(t.numel() for k, t in saved.items() if not k.endswith(("running_mean", "running_var",
                                                                       "num_batches_tracked")))
    before = sum(p.numel() for p in full.parameters())
    assert 0.2 < params / before < 0.4, (params, before)
    metrics = json.loads((pruned_run / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and metrics["test"]["samples"] == 8
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in _history(pruned_run))


def _history(run):
    import csv

    return [{k: float(v) for k, v in row.items() if k in ("train_loss",)} for row in csv.DictReader((run / "history.csv").open())]


_FRESH = """
import json, sys, torch
import finetunekit
model = finetunekit.load(sys.argv[1])
logits = model.logits(json.loads(sys.argv[2]))
test = finetunekit.evaluate(sys.argv[1], sys.argv[3], quiet=True)
print(json.dumps({"logits": logits.tolist(), "params": sum(p.numel() for p in model.module.parameters()),
                  "test": {k: test[k] for k in ("accuracy", "loss", "samples")}}))
"""


def test_pruned_folder_loads_in_a_fresh_process_and_predicts_identically(pruned_run, data):
    r = subprocess.run([sys.executable, "-c", _FRESH, str(pruned_run), json.dumps(data["images"]),
                        str(data["test"])], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    fresh = json.loads(r.stdout.strip().splitlines()[-1])
    here = finetunekit.load(pruned_run)
    assert torch.equal(here.logits(data["images"]), torch.tensor(fresh["logits"]))
    assert fresh["params"] == sum(p.numel() for p in here.module.parameters())
    # the test set was scored in the training process by the trained (pruned) module itself
    scored = json.loads((pruned_run / "metrics.json").read_text())["test"]
    assert fresh["test"]["samples"] == scored["samples"]
    assert fresh["test"]["accuracy"] == pytest.approx(scored["accuracy"], abs=1e-6)
    assert fresh["test"]["loss"] == pytest.approx(scored["loss"], abs=1e-5)


def test_killed_pruned_run_resumes_to_the_same_weights(pruned_run, data):
    out = data["dir"] / "killed"
    killed = run_cli(*_args(data, out), env={"FINETUNEKIT_FAULT": "batch@5"})  # second epoch, mid-way
    assert killed.returncode != 0
    resumed = finetunekit.fit(_recipe(data, out), resume=str(out))  # in this process, as the reference ran
    assert "resumed_from" in resumed.metrics
    assert "resuming from" in (out / "log.txt").read_text()
    final = [load_file(str(sorted((run / "checkpoints").glob("step-*"))[-1] / "model.safetensors"))
             for run in (out, pruned_run)]
    assert final[0].keys() == final[1].keys()
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0]), "resumed weights differ"


def test_resume_with_other_pruning_is_refused(pruned_run, data, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(pruned_run, out)
    with pytest.raises(UserError, match="cannot continue: pruned"):
        finetunekit.fit(_recipe(data, out), resume=str(out), resume_force=True, **{"model.prune": 0.3})


def test_damaged_pruned_layers_are_one_line(pruned_run, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(pruned_run / "model", folder)
    config = json.loads((folder / "config.json").read_text())
    config["finetunekit"]["pruned_layers"]["no.such.layer"] = {"num_features": 3}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="field finetunekit.pruned_layers: test_efficientnet has no layer"):
        finetunekit.load(folder)
    from finetunekit.models.timm_source import TimmSource

    with pytest.raises(UserError, match="its layers are pruned"):
        TimmSource.load_native(pruned_run / "model")  # plain timm would not fit the pruned shapes


@pytest.mark.parametrize("extra, expected", [
    (("--prune", "1"), "--prune: expected a value < 1"),
    (("--prune", "0.3", "--strategy", "linear-probe"), "--prune 0.3: --strategy linear-probe trains none of the "
                                                       "backbone's convolutions"),
    (("--prune", "0.3", "--task", "text-classification"), "--prune: does not apply to --task text-classification"),
    (("--prune", "0.3", "--task", "detection"), "--prune: does not apply to --task detection"),
])
def test_prune_options_that_make_no_sense_are_one_line_exit_2(extra, expected, tmp_path):
    r = run_cli("fit", "--data", str(tmp_path), "--out", str(tmp_path / "run"), *extra)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], r.stderr
