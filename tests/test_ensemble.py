"""Ensembles (finetunekit/ensemble.py): `predict RUN_A RUN_B INPUT...` and `evaluate RUN_A RUN_B --data D` on two
tiny real runs (timm's test_efficientnet, 2 classes, 32 px, CIFAR images, seeds 0 and 1): the exact mean of the
members' calibrated probabilities, the metrics of that mean, and the one-line refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import CIFAR, cli, write_manifest

CLASSES = ["cat", "dog"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Two 1-epoch fits that differ by --seed; member B's copy with a temperature of 2 (calibration.json), so the
    mean must divide its logits by 2 first."""
    if not CIFAR.is_dir():
        pytest.skip(f"{CIFAR} not found (the shared datasets sit beside the repo)")
    d = tmp_path_factory.mktemp("ensemble")
    train = write_manifest(d / "train.csv", CIFAR / "train", 8, CLASSES)
    test = write_manifest(d / "test.csv", CIFAR / "test", 5, CLASSES)
    for seed in (0, 1):
        code, _, err = cli("fit", "--data", str(train), "--model", "timm:test_efficientnet", "--no-pretrained",
                           "--image-size", "32", "--augment", "none", "--num-workers", "0", "--strategy", "full",
                           "--epochs", "1", "--batch-size", "4", "--lr", "0.01", "--seed", str(seed),
                           "--out", str(d / f"s{seed}"), "--quiet")
        assert code == 0, err
    hot = d / "s1-t2"
    shutil.copytree(d / "s1", hot)
    (hot / "model" / "calibration.json").write_text(json.dumps({"method": "temperature", "temperature": 2.0}))
    images = d / "images"
    images.mkdir()
    for c in CLASSES:
        for name in ("0000.jpg", "0001.jpg"):
            shutil.copy(CIFAR / "test" / c / name, images / f"{c}-{name}")
    return {"a": d / "s0", "b": hot, "test": test, "images": images, "dir": d}


def _probabilities(run: Path, images: Path) -> torch.Tensor:
    """[N, 2] calibrated probabilities of one member, through its own predict (top 2 = every class)."""
    import finetunekit

    preds = finetunekit.load(run).predict(images, top_k=2)
    return torch.tensor([[{t["label"]: t["score"] for t in p["top_k"]}[c] for c in CLASSES] for p in preds],
                        dtype=torch.float64)


def test_predict_gives_the_mean_of_the_members_calibrated_probabilities(runs):
    a, b = _probabilities(runs["a"], runs["images"]), _probabilities(runs["b"], runs["images"])
    mean = (a + b) / 2
    code, out, err = cli("predict", str(runs["a"]), str(runs["b"]), str(runs["images"]), "--format", "json",
                         "--top-k", "2")
    assert code == 0, err
    preds = json.loads(out)
    assert [Path(p["path"]).name for p in preds] == ["cat-0000.jpg", "cat-0001.jpg", "dog-0000.jpg", "dog-0001.jpg"]
    got = torch.tensor([[{t["label"]: t["score"] for t in p["top_k"]}[c] for c in CLASSES] for p in preds],
                       dtype=torch.float64)
    assert torch.allclose(got, mean, rtol=1e-6, atol=0)
    assert [p["label"] for p in preds] == [CLASSES[i] for i in mean.argmax(1)]
    assert not torch.allclose(a, b, rtol=1e-3, atol=0)  # the members differ: the mean is not either one


def test_the_temperature_is_applied_before_averaging(runs):
    from finetunekit.artifacts import load
    from finetunekit.ensemble import Ensemble

    member = load(runs["b"])
    assert member.temperature == 2.0
    raw = member.logits([str(p) for p in sorted(runs["images"].iterdir())])
    calibrated = _probabilities(runs["b"], runs["images"])
    assert torch.allclose(calibrated, (raw.double() / 2).softmax(-1), rtol=1e-6, atol=0)
    assert not torch.allclose(calibrated, raw.double().softmax(-1), rtol=1e-3, atol=0)
    preds = Ensemble.load([runs["b"], runs["b"]]).predict(runs["images"], top_k=2)
    assert [p["top_k"][0]["score"] for p in preds] == pytest.approx(calibrated.max(1).values.tolist(), rel=1e-6)


def test_evaluate_prints_members_ensemble_and_gain(runs):
    import finetunekit

    code, out, err = cli("evaluate", str(runs["a"]), str(runs["b"]), "--data", str(runs["test"]), "--batch-size",
                         "4", "--output", str(runs["dir"] / "ens.json"))
    assert code == 0, err
    result = json.loads((runs["dir"] / "ens.json").read_text())
    alone = finetunekit.evaluate(runs["a"], runs["test"], batch_size=4)  # a member's row is `evaluate RUN`'s
    assert result["members"][0] == {"run": str(runs["a"]), **alone} and result["members"][1]["run"] == str(runs["b"])
    assert result["members"][1]["temperature"] == 2.0
    # the ensemble's accuracy and NLL, from the members' own calibrated probabilities
    rows = [r.split(",") for r in runs["test"].read_text().splitlines()[1:]]
    probs = []
    for run in (runs["a"], runs["b"]):
        model = finetunekit.load(run)
        probs.append((model.logits([p for p, _ in rows]).double() / (model.temperature or 1.0)).softmax(-1))
    mean = (probs[0] + probs[1]) / 2
    targets = torch.tensor([CLASSES.index(c) for _, c in rows])
    ens = result["ensemble"]
    assert ens["samples"] == 10
    assert ens["accuracy"] == pytest.approx((mean.argmax(1) == targets).double().mean().item(), abs=1e-7)
    assert ens["loss"] == pytest.approx(-mean[torch.arange(10), targets].log().mean().item(), rel=1e-5)
    assert ens["nll"] == pytest.approx(ens["loss"], rel=1e-5)
    accs = [r["accuracy"] for r in result["members"]]
    assert result["gain"] == {"metric": "accuracy", "vs_best_member": pytest.approx(ens["accuracy"] - max(accs)),
                              "vs_mean_member": pytest.approx(ens["accuracy"] - sum(accs) / 2)}
    lines = out.splitlines()
    assert lines[0] == f"member {runs['a']}:" and "ensemble of 2 (mean of the calibrated probabilities):" in lines
    assert lines[-1] == (f"ensemble gain in accuracy: {result['gain']['vs_best_member']:+.4f} over the best member, "
                         f"{result['gain']['vs_mean_member']:+.4f} over the members' mean")


def test_members_with_other_classes_and_uncertainty_are_one_line_exit_2(runs, tmp_path):
    swapped = tmp_path / "swapped"
    shutil.copytree(runs["b"], swapped)
    config = json.loads((swapped / "model" / "config.json").read_text())
    config["label_names"] = ["dog", "cat"]
    (swapped / "model" / "config.json").write_text(json.dumps(config))
    code, out, err = cli("evaluate", str(runs["a"]), str(swapped), "--data", str(runs["test"]))
    assert code == 2 and err == (f"finetunekit: error: {swapped}: its classes (dog, cat) are not {runs['a']}'s "
                                 f"(cat, dog); an ensemble's members need the same classes in the same order\n")
    code, out, err = cli("predict", str(runs["a"]), str(swapped), str(runs["images"]))
    assert code == 2 and err.startswith(f"finetunekit: error: {swapped}: its classes (dog, cat)")
    code, out, err = cli("predict", str(runs["a"]), str(runs["b"]), str(runs["images"]), "--uncertainty")
    assert code == 2 and err == "finetunekit: error: --uncertainty: for one model, not an ensemble (its OOD " \
                                "threshold and dropout passes are a single model's)\n"


def test_multilabel_members_with_other_thresholds_are_one_line_exit_2(tmp_path):
    """An ensemble thresholds its mean probability once: members saved with 0.5 and 0.3 are refused, naming both."""
    from test_explain import _saved

    a = _saved(tmp_path / "a", "timm:test_efficientnet", ["cat", "animal"], "image-multilabel", 32)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    config = json.loads((b / "config.json").read_text())
    config["finetunekit"]["threshold"] = 0.3
    (b / "config.json").write_text(json.dumps(config))
    code, out, err = cli("predict", str(a), str(b), str(CIFAR / "test" / "cat" / "0000.jpg"))
    assert code == 2 and err == (f"finetunekit: error: {b}: its multi-label threshold is 0.3, {a}'s 0.5; an ensemble "
                                 f"thresholds its mean probability once, so its members need the same threshold\n")


def test_combine_is_exact_for_every_kind():
    from finetunekit.ensemble import combine, mean_probabilities

    a = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 3.0]])
    b = torch.tensor([[-1.0, 1.0, 0.0], [1.0, 2.0, -2.0]])
    want = ((a / 2).double().softmax(-1) + b.double().softmax(-1)) / 2
    got = mean_probabilities("classification", combine("classification", [a, b], [2.0, None]))
    assert torch.allclose(got, want, rtol=1e-6, atol=0)
    want = ((a / torch.tensor([1.0, 2.0, 4.0])).double().sigmoid() + b.double().sigmoid()) / 2
    got = mean_probabilities("multilabel", combine("multilabel", [a, b], [[1.0, 2.0, 4.0], None]))
    assert torch.allclose(got, want, rtol=1e-6, atol=0)
    assert torch.equal(combine("regression", [a[:, :1], b[:, :1]], [None, None]), torch.tensor([[0.5], [0.5]]))
