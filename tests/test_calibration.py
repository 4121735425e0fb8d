"""Calibration (issue 18): the temperature fitted on validation after a real tiny fit (timm's test_efficientnet,
3 CIFAR classes, 32 px, 45 validation images), model/calibration.json and metrics.json, the predictions files'
contract, predict / evaluate / the ONNX export applying the temperature, predict --uncertainty (the OOD flag,
Monte-Carlo dropout), per-class temperatures for multi-label, and the tasks that are not calibrated."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import finetunekit
from finetunekit import calibration, predictions, uncertainty
from finetunekit.tasks import Classification, MultiLabel, Regression

from conftest import CIFAR, cli, write_manifest

CLASSES = ["cat", "dog", "ship"]
PINNED_T = 2.0453117702270833  # this machine's fit (see the fixture); the bisection is deterministic


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    if not CIFAR.is_dir():
        pytest.skip(f"{CIFAR} not found (the shared datasets sit beside the repo)")
    d = tmp_path_factory.mktemp("calib")
    train = write_manifest(d / "train.csv", CIFAR / "train", 30, CLASSES)
    val = write_manifest(d / "val.csv", CIFAR / "test", 15, CLASSES)
    test = write_manifest(d / "test.csv", CIFAR / "test", 25, CLASSES)
    result = finetunekit.fit({"quiet": True, "out": str(d / "run"),
                              "data": {"path": str(train), "val": str(val), "test": str(test), "image_size": 32,
                                       "augment": "none", "num_workers": 0},
                              "model": {"name": "timm:test_efficientnet", "pretrained": False},
                              "train": {"epochs": 2, "batch_size": 8, "lr": 0.01, "seed": 0, "strategy": "full"}})
    paths = [row["path"] for row in csv.DictReader(val.open())]
    return {"run": result.run_dir, "metrics": result.metrics, "val": val, "test": test, "paths": paths, "dir": d}


def _rows(path: Path) -> list[dict]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def test_the_temperature_is_pinned_and_saved_with_the_model(run):
    entry = json.loads((run["run"] / "model" / "calibration.json").read_text())
    assert set(entry) == {"method", "temperature", "fitted_on", "samples", "ece_before", "ece_after", "nll_before",
                          "nll_after", "bins", "ood"}
    assert (entry["method"], entry["fitted_on"], entry["samples"], entry["bins"]) == ("temperature", "validation",
                                                                                    45, 15)
    assert entry["temperature"] == pytest.approx(PINNED_T, rel=1e-6)
    assert entry["nll_after"] < entry["nll_before"]  # T minimises the validation NLL
    assert entry["nll_before"] == pytest.approx(run["metrics"]["val"]["loss"], rel=1e-5)  # the loop's val loss
    assert entry["ood"]["score"] == "energy" and entry["ood"]["tpr"] == 0.95
    saved = json.loads((run["run"] / "metrics.json").read_text())["calibration"]
    assert {k: saved[k] for k in entry} == entry
    assert saved["test"]["samples"] == 75 and set(saved["test"]) == {"samples", "ece_before", "ece_after",
                                                                     "nll_before", "nll_after"}


def test_the_fit_is_the_nll_minimum_and_argmax_never_changes(run):
    model = finetunekit.load(run["run"])
    logits = model.logits(run["paths"]).double()
    y = torch.tensor([CLASSES.index(Path(p).parent.name) for p in run["paths"]])
    t = calibration.fit("classification", logits, y)
    assert t == pytest.approx(PINNED_T, rel=1e-6)
    nll = lambda temp: float(F.cross_entropy(logits / temp, y))  # noqa: E731
    assert nll(t) < min(nll(t * 0.99), nll(t * 1.01))  # a minimum, not a point on the slope
    for temp in (t, 0.05, 0.3, 1.0, 7.0, 20.0, [t]):  # real outputs: the predicted class is the same, exactly
        assert torch.equal(calibration.scale(logits, temp).argmax(-1), logits.argmax(-1))
        assert torch.equal(calibration.scale(logits.float(), temp).softmax(-1).argmax(-1), logits.argmax(-1))


def test_ece_drops_on_an_overconfident_model(run):
    """The same real model with its logits scaled by 4 (the head's weights x4): over-confident. The fit finds
    T = 4 x the model's own, and ECE and NLL drop."""
    model = finetunekit.load(run["run"])
    logits = model.logits(run["paths"]).double()
    y = torch.tensor([CLASSES.index(Path(p).parent.name) for p in run["paths"]])
    entry = calibration.calibrate("classification", 4 * logits, y)
    assert entry["temperature"] == pytest.approx(4 * PINNED_T, rel=1e-6)
    assert entry["ece_after"] <= entry["ece_before"] and entry["nll_after"] < entry["nll_before"]
    assert entry["ece_before"] > 0.3 and entry["ece_after"] < 0.2


def test_predictions_files_follow_the_contract(run):
    model = finetunekit.load(run["run"])
    t = model.temperature
    val = _rows(run["run"] / "val_predictions.csv")
    assert list(val[0]) == ["item", "label", "prediction", "score", "score_uncalibrated", "loss"]
    assert [r["item"] for r in val] == run["paths"]  # dataset order, the paths as given
    assert [r["label"] for r in val] == [Path(p).parent.name for p in run["paths"]]
    logits = model.logits(run["paths"])
    y = torch.tensor([CLASSES.index(r["label"]) for r in val])
    assert [r["prediction"] for r in val] == [CLASSES[i] for i in logits.argmax(-1)]
    np.testing.assert_allclose([float(r["score"]) for r in val], (logits / t).softmax(-1).max(-1).values,
                               rtol=1e-5)
    np.testing.assert_allclose([float(r["score_uncalibrated"]) for r in val], logits.softmax(-1).max(-1).values,
                               rtol=1e-5)
    np.testing.assert_allclose([float(r["loss"]) for r in val], F.cross_entropy(logits, y, reduction="none"),
                               rtol=1e-4)
    test = _rows(run["run"] / "test_predictions.csv")
    assert len(test) == 75 and test[0]["item"].endswith("test/cat/0000.jpg")


def test_predict_and_evaluate_apply_the_temperature(run):
    model = finetunekit.load(run["run"])
    t = model.temperature
    logits = model.logits(run["paths"][:6])
    preds = model.predict(run["paths"][:6], top_k=3)
    expected = (logits.double() / t).softmax(-1)
    for p, row in zip(preds, expected):
        assert [a["score"] for a in p["top_k"]] == pytest.approx(sorted(row.tolist(), reverse=True), abs=1e-6)
    model.calibration = None  # opting out: the model's own softmax
    assert model.predict(run["paths"][:1])[0]["score"] == pytest.approx(float(logits[0].softmax(-1).max()), abs=1e-6)

    metrics = finetunekit.evaluate(run["run"], run["test"], batch_size=16)
    saved = json.loads((run["run"] / "metrics.json").read_text())["calibration"]["test"]
    assert metrics["temperature"] == t
    assert metrics["ece"] == pytest.approx(saved["ece_after"], abs=1e-6)
    assert metrics["nll"] == pytest.approx(saved["nll_after"], rel=1e-5)
    assert metrics["ece_uncalibrated"] == pytest.approx(saved["ece_before"], abs=1e-6)
    assert metrics["nll_uncalibrated"] == pytest.approx(metrics["loss"], rel=1e-5)


def test_the_onnx_export_applies_the_temperature(run, tmp_path):
    from finetunekit.runtime import load as load_export

    code, out, err = cli("export", str(run["run"]), "--out", str(tmp_path / "export"))
    assert code == 0, err
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["calibration"] == json.loads((run["run"] / "model" / "calibration.json").read_text())
    runtime = load_export(tmp_path / "export")
    eager = finetunekit.load(run["run"]).logits(run["paths"][:8]).double()
    expected = (eager / config["calibration"]["temperature"]).softmax(-1)
    for p, row in zip(runtime.predict(run["paths"][:8], top_k=3), expected):
        assert [a["score"] for a in p["top_k"]] == pytest.approx(sorted(row.tolist(), reverse=True), abs=1e-6)
    assert [p["label"] for p in runtime.predict(run["paths"][:8])] == [CLASSES[i] for i in eager.argmax(-1)]
    # and its uncertainty fields are the eager model's
    a = runtime.predict(run["paths"][:8], uncertainty=True)
    b = finetunekit.load(run["run"]).predict(run["paths"][:8], uncertainty=True)
    assert [p["ood"] for p in a] == [p["ood"] for p in b]
    assert [p["entropy"] for p in a] == pytest.approx([p["entropy"] for p in b], abs=1e-5)


def test_uncertainty_fields_and_the_ood_flag(run):
    model = finetunekit.load(run["run"])
    ood = model.calibration["ood"]
    preds = model.predict(run["paths"], uncertainty=True)
    logits = model.logits(run["paths"]).double() / model.temperature
    p = logits.softmax(-1)
    assert [x["max_prob"] for x in preds] == pytest.approx(p.max(-1).values.tolist(), abs=1e-6)
    assert [x["max_prob"] for x in preds] == pytest.approx([x["score"] for x in preds], abs=1e-6)
    assert [x["entropy"] for x in preds] == pytest.approx((-(p * p.log()).sum(-1)).tolist(), abs=1e-6)
    assert [x["ood_score"] for x in preds] == pytest.approx(torch.logsumexp(logits, -1).tolist(), abs=1e-6)
    flagged = [x["ood"] for x in preds]
    assert flagged == [x["ood_score"] < ood["threshold"] for x in preds]
    assert sum(flagged) == 3  # the threshold keeps 95 % of these 45 validation images: 42 kept
    msp = model.predict(run["paths"], ood_score="msp")
    assert [x["ood"] for x in msp] == [x["max_prob"] < ood["thresholds"]["msp"] for x in msp]

    code, out, err = cli("predict", str(run["run"]), *run["paths"][:2], "--uncertainty", "--format", "csv")
    assert code == 0, err
    assert out.splitlines()[0] == "path,label,score,max_prob,entropy,ood_score,ood,error"
    code, out, err = cli("predict", str(run["run"]), run["paths"][0], "--uncertainty", "--mc-dropout", "4")
    assert code == 2 and err.strip() == ("finetunekit: error: --mc-dropout: this model has no dropout layers to sample "
                                         "with (nn.Dropout with p > 0, or a timm head's drop_rate > 0)")
    code, out, err = cli("predict", str(run["run"]), run["paths"][0], "--mc-dropout", "4")
    assert code == 2 and err.strip() == "finetunekit: error: --mc-dropout: goes with --uncertainty"
    code, out, err = cli("predict", str(run["run"]), run["paths"][0], "--uncertainty", "--ood-score", "maxlogit")
    assert code == 2 and err.strip() == "finetunekit: error: --ood-score maxlogit: expected one of energy, msp"


def test_mc_dropout_trains_the_dropout_alone(run):
    """With the head's dropout on (timm's drop_rate), N passes differ, BatchNorm keeps its running statistics
    and eval mode, and the fields are those of the passes' probabilities."""
    model = finetunekit.load(run["run"])
    model.module.drop_rate = 0.5
    bns = [m for m in model.module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in bns]
    preds = model.predict(run["paths"][:5], uncertainty=True, mc_dropout=8)
    again = model.predict(run["paths"][:5], uncertainty=True, mc_dropout=8)
    assert preds == again  # seeded: a prediction repeats
    assert all(torch.equal(m.running_mean, b) for m, b in zip(bns, before))
    assert not model.module.training and not any(m.training for m in bns)
    assert all(x["mutual_information"] > 0 and x["mc_variance"] > 0 for x in preds)
    assert all(x["mc_entropy"] >= x["mutual_information"] for x in preds)
    model.module.drop_rate = 0.0
    assert [x["label"] for x in model.predict(run["paths"][:5])] == [x["label"] for x in preds]


def test_multilabel_gets_one_temperature_per_class(tmp_path):
    """Three labels made over-confident (x3), under-confident (x0.5) and never positive: per-class temperatures
    3, 0.5 and 1 (a class with one value in validation keeps T = 1)."""
    g = torch.Generator().manual_seed(0)
    true = torch.randn(20000, 3, generator=g, dtype=torch.float64) * 2
    y = (torch.rand(20000, 3, generator=g, dtype=torch.float64) < true.sigmoid()).double()
    y[:, 2] = 0
    logits = true * torch.tensor([3.0, 0.5, 1.0], dtype=torch.float64)
    entry = calibration.calibrate("multilabel", logits, y)
    assert entry["temperature"][0] == pytest.approx(3.0, rel=0.03)
    assert entry["temperature"][1] == pytest.approx(0.5, rel=0.03)
    assert entry["temperature"][2] == 1.0
    assert entry["ece_after"] < entry["ece_before"] and entry["nll_after"] < entry["nll_before"]
    # the decisions at threshold 0.5 never change; the file's probabilities are calibrated
    assert torch.equal(calibration.scale(logits, entry["temperature"]) > 0, logits > 0)
    task = MultiLabel(["a", "b", "c"], threshold=0.5)
    path = tmp_path / "p.csv"
    predictions.write(path, task, None, logits[:4].float(), y[:4].float(), entry["temperature"])
    rows = _rows(path)
    assert list(rows[0]) == ["item", "label", "prediction", "score", "score_uncalibrated", "loss", "p_a", "p_b", "p_c"]
    cal = calibration.scale(logits[:4], entry["temperature"]).sigmoid()
    for r, p, t in zip(rows, cal, y[:4]):
        assert r["prediction"] == ";".join(c for c, v in zip("abc", p) if v > 0.5)
        assert r["label"] == ";".join(c for c, v in zip("abc", t) if v > 0.5)
        assert [float(r[f"p_{c}"]) for c in "abc"] == pytest.approx(p.tolist(), rel=1e-5)
        on = p > 0.5
        assert float(r["score"]) == pytest.approx(float(p[on].mean() if on.any() else p.max()), rel=1e-5)


def test_regression_is_not_calibrated_and_writes_its_errors(tmp_path, caplog):
    from finetunekit.posthoc import Scored, finish

    out = torch.tensor([[1.0], [2.5], [0.0]])
    y = torch.tensor([1.5, 2.5, -1.0])
    loader = torch.utils.data.DataLoader(list(range(3)))
    log = logging.getLogger("finetunekit")  # a fit's RunLog leaves it unpropagated: the handler goes on it
    log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="finetunekit"):
            entry = finish({"val": Scored({}, out, y)}, Regression(), {"val": loader}, tmp_path, tmp_path,
                           calibrate=True)
    finally:
        log.removeHandler(caplog.handler)
    assert entry == {} and not (tmp_path / calibration.FILE).exists()
    said = {r.message for r in caplog.records if r.message.startswith("calibration")}  # (each handler's copy)
    assert said == {"calibration: none for regression (no class probabilities to calibrate)"}
    assert (tmp_path / "val_predictions.csv").read_text(encoding="utf-8").splitlines() == [
        "item,label,prediction,loss", "0,1.5,1,0.25", "1,2.5,2.5,0", "2,-1,0,1"]


def test_no_calibration_writes_predictions_but_no_temperature(run, tmp_path):
    from finetunekit.cli_parser import build_parser as _build_parser, recipe_from_args
    from finetunekit.posthoc import Scored, finish

    parser, dests = _build_parser()
    assert recipe_from_args(parser.parse_args(["fit", "--no-calibration"]), dests).train.calibration is False
    assert recipe_from_args(parser.parse_args(["fit"]), dests).train.calibration is True
    logits = finetunekit.load(run["run"]).logits(run["paths"])
    y = torch.tensor([CLASSES.index(Path(p).parent.name) for p in run["paths"]])
    loader = torch.utils.data.DataLoader(list(range(len(y))))
    entry = finish({"val": Scored({}, logits, y)}, Classification(CLASSES), {"val": loader}, tmp_path, tmp_path,
                   calibrate=False)
    assert entry == {} and not (tmp_path / calibration.FILE).exists()
    rows = _rows(tmp_path / "val_predictions.csv")
    assert all(r["score"] == r["score_uncalibrated"] for r in rows)


def test_text_loaders_sorted_by_length_are_put_back_in_dataset_order():
    from finetunekit.data.text import SortedBatches

    lengths = [5, 1, 4, 2, 3]
    loader = torch.utils.data.DataLoader(list(range(5)), batch_sampler=SortedBatches(lengths, 2))
    order = predictions.loader_order(loader, 5)
    seen = torch.cat(list(loader))  # the dataset indices in the order the loader yields them
    assert seen.tolist() == order == [1, 3, 4, 2, 0]
    assert predictions.in_dataset_order(seen * 10, order).tolist() == [0, 10, 20, 30, 40]
    assert predictions.in_dataset_order(["b", "d", "e", "c", "a"], order) == ["a", "b", "c", "d", "e"]


def test_ood_threshold_keeps_95_percent_of_validation():
    z = np.random.default_rng(0).normal(size=(1000, 4)) * 3
    fitted = uncertainty.fit_ood(z)
    for score in uncertainty.SCORES:
        kept = (uncertainty.ood_score(z, score) >= fitted["thresholds"][score]).mean()
        assert kept == pytest.approx(0.95, abs=0.001)


def test_a_temperature_at_a_bound_is_not_used(run, tmp_path):
    """Validation samples that are all right (as on the demo's digits): the NLL falls towards T -> 0, T ends at
    its lower bound, and the run keeps its probabilities as they are (no calibration.json)."""
    from finetunekit.posthoc import Scored, finish

    paths = run["paths"] + [row["path"] for row in csv.DictReader(run["test"].open())]
    logits = finetunekit.load(run["run"]).logits(paths)
    y = torch.tensor([CLASSES.index(Path(p).parent.name) for p in paths])
    right = logits.argmax(-1) == y
    assert int(right.sum()) >= calibration.MIN_SAMPLES
    assert calibration.at_bound(calibration.fit("classification", logits[right], y[right]))
    loader = torch.utils.data.DataLoader(list(range(int(right.sum()))))
    entry = finish({"val": Scored({}, logits[right], y[right])}, Classification(CLASSES), {"val": loader}, tmp_path,
                   tmp_path, calibrate=True)
    assert entry == {} and not (tmp_path / calibration.FILE).exists()
    assert (tmp_path / "val_predictions.csv").is_file()
