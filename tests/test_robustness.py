"""`finetunekit evaluate --attack/--corruptions` (finetunekit.robustness): FGSM against its analytic answer on a
hand-set linear model, PGD's projection and strength, the identities (eps 0, severity 0) against the clean
figures, the clean pixels against the model's own preprocessing, the refused tasks, and the command line."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from finetunekit import UserError, robustness
from finetunekit.robustness import attacks, corruptions, runner

from conftest import CIFAR, cli, torch_threads
from test_explain import _saved

CE = lambda logits, y: nn.functional.cross_entropy(logits, y, reduction="none")  # noqa: E731


def test_the_names_are_the_registries():
    assert robustness.ATTACK_NAMES == tuple(attacks.ATTACKS)
    assert robustness.CORRUPTION_NAMES == tuple(corruptions.CORRUPTIONS)


def _linear(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5), size=4):
    """A 2-class linear model behind a normalization: w1 - w0 is +-1 in every pixel, so the sign of the loss
    gradient is known exactly: for target y it is sign(w[1-y] - w[y]) whatever the softmax."""
    torch.manual_seed(0)
    d = 3 * size * size
    diff = torch.randint(0, 2, (d,)).float() * 2 - 1  # w1 - w0
    w0 = torch.randn(d) * 0.1
    linear = nn.Linear(d, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.stack([w0, w0 + diff]))
        linear.bias.zero_()
    return runner.Normalized(nn.Sequential(nn.Flatten(), linear), mean, std).eval(), diff.reshape(3, size, size)


def test_fgsm_on_a_linear_model_is_the_analytic_sign_step():
    model, diff = _linear()
    torch.manual_seed(1)
    x = torch.rand(6, 3, 4, 4)
    x[0, 0, 0, 0], x[1, 1, 1, 1] = 0.0, 1.0  # pixels at the edges: the step is clipped there
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    eps = 8 / 255
    direction = torch.stack([diff if int(t) == 0 else -diff for t in y])  # sign(w[1-y] - w[y])
    expected = (x + eps * direction).clamp(0, 1)
    assert torch.equal(attacks.fgsm(model, x, y, CE, eps), expected)
    assert torch.equal(attacks.fgsm(model, x, y, CE, 0.0), x)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 3)).eval()


def test_pgd_stays_in_the_ball_and_the_pixel_range_and_beats_fgsm():
    model = _mlp()
    torch.manual_seed(1)
    x = torch.rand(200, 3, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(-1)  # the model's own answers: clean accuracy 1
    eps = 0.1
    seeds = list(range(len(x)))
    for keep in (True, False):
        adv = attacks.pgd(model, x, y, CE, eps, seeds, steps=10, keep_first_success=keep)
        assert (adv - x).abs().max() <= eps + 1e-7 and adv.min() >= 0 and adv.max() <= 1
        assert not torch.equal(adv, x)
    right = lambda a: int((model(a).argmax(-1) == y).sum())  # noqa: E731
    with torch_threads(1):  # the pinned counts are one thread's sums
        fgsm, pgd = right(attacks.fgsm(model, x, y, CE, eps)), right(attacks.pgd(model, x, y, CE, eps, seeds))
    assert (fgsm, pgd) == (115, 95)  # right of 200: PGD fools more than FGSM at the same eps
    assert torch.equal(attacks.pgd(model, x, y, CE, eps, seeds), attacks.pgd(model, x, y, CE, eps, seeds))
    assert torch.equal(attacks.pgd(model, x, y, CE, 0.0, seeds), x)


def test_corruptions_severity_0_is_identity_and_noise_repeats_per_sample():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 16, 16)
    for name, c in corruptions.CORRUPTIONS.items():
        assert c(x, 0, [0, 1, 2, 3]) is x, name
        out = c(x, 3, [0, 1, 2, 3])
        assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1 and not torch.equal(out, x), name
    noise = corruptions.CORRUPTIONS["gaussian-noise"]
    whole = noise(x, 5, [7, 8, 9, 10])
    assert torch.equal(whole[2:], noise(x[2:], 5, [9, 10]))  # each sample's own seed: the batch does not matter
    assert corruptions.CORRUPTIONS["gaussian-blur"].setting(5, 64) == round(6 * 64 / 224, 4)
    assert corruptions.CORRUPTIONS["jpeg"].setting(1, 64) == 25


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A seeded test_efficientnet over CIFAR's 10 classes, saved as a run folder whose recipe names a test set
    of 30 images."""
    if not CIFAR.is_dir():
        pytest.skip(f"{CIFAR} not found (the shared datasets sit beside the repo)")
    from conftest import write_manifest

    run = tmp_path_factory.mktemp("robust-run")
    classes = sorted(d.name for d in (CIFAR / "test").iterdir())
    _saved(run, "timm:test_efficientnet", classes, "image-classification", 32)
    test = write_manifest(run.parent / "robust-test.csv", CIFAR / "test", 3, classes)
    (run / "recipe.yaml").write_text(f"task: image-classification\ndata:\n  test: {test}\n", encoding="utf-8")
    return SimpleNamespace(run=run, test=test, classes=classes)


def test_clean_pixels_through_the_normalization_are_the_models_own_logits(tiny):
    import finetunekit

    model = finetunekit.load(tiny.run)
    plan = robustness.Plan(batch_size=8)
    loader, net, _ = runner.pixel_loader(model, tiny.test, plan)
    x = torch.cat([b[0] for b in loader])
    assert 0 <= x.min() and x.max() <= 1 and x.shape[1:] == (3, 32, 32)
    paths = [line.split(",")[0] for line in tiny.test.read_text().splitlines()[1:]]
    with torch.no_grad():
        assert torch.equal(net.eval()(x), model.logits(paths))


def test_eps_0_and_severity_0_give_the_clean_accuracy_exactly(tiny):
    plan = robustness.plan_of(SimpleNamespace(attack="fgsm,pgd", eps="0,8/255", pgd_steps=3, pgd_step_size=None,
                                              corruptions="all", severities="0,5", limit=None, seed=0,
                                              batch_size=8))
    report = runner.evaluate_robustness(tiny.run, tiny.test, plan)
    clean = report["clean"]["accuracy"]
    assert report["samples"] == 30 and clean == 2 / 30  # pinned: the seeded tiny model
    for row in report["attacks"] + report["corruptions"]:
        if row.get("eps") == 0 or row.get("severity") == 0:
            assert row["accuracy"] == clean and row["drop"] == 0, row
    strong = [a for a in report["attacks"] if a["eps"] > 0]
    assert [(a["attack"], a["accuracy"]) for a in strong] == [("fgsm", 0.0), ("pgd", 0.0)]
    assert all(a["success_rate"] == 1.0 for a in strong)


def test_cli_writes_the_report_and_never_overwrites_another_file(tiny, tmp_path):
    args = ("evaluate", str(tiny.run), "--attack", "fgsm", "--eps", "1/255", "--corruptions", "jpeg",
            "--severities", "1", "--limit", "12", "--seed", "3")
    code, out, err = cli(*args)  # no --data: the run's test set
    assert code == 0, err
    report = json.loads((tiny.run / "robustness.json").read_text())
    assert set(report) == {"kind", "version", "run", "model", "data", "samples", "skipped", "metric", "device",
                           "seed", "limit", "tta", "clean", "attacks", "corruptions", "seconds"}
    assert (report["data"], report["samples"], report["metric"]) == (str(tiny.test), 12, "accuracy")
    assert set(report["attacks"][0]) == {"attack", "eps", "eps_text", "success_rate", "accuracy", "drop", "seconds"}
    assert report["attacks"][0]["eps"] == 1 / 255 and report["attacks"][0]["eps_text"] == "1/255"
    assert {k: report["corruptions"][0][k] for k in ("corruption", "severity", "parameter", "value")} == \
        {"corruption": "jpeg", "severity": 1, "parameter": "quality", "value": 25}
    lines = out.splitlines()
    assert lines[1].split() == ["condition", "setting", "accuracy", "change", "seconds"]
    assert lines[3].startswith("fgsm") and "eps 1/255" in lines[3] and lines[4].startswith("jpeg")
    assert lines[-1] == f"wrote {tiny.run / 'robustness.json'}"
    code, out, err = cli(*args)  # again: beside the first, never over it
    assert code == 0 and out.splitlines()[-1] == f"wrote {tiny.run / 'robustness-2.json'}", err
    again = json.loads((tiny.run / "robustness-2.json").read_text())
    assert again["clean"]["accuracy"] == report["clean"]["accuracy"]
    assert again["attacks"][0]["accuracy"] == report["attacks"][0]["accuracy"]
    mine = tmp_path / "mine.json"
    mine.write_text("{}")
    code, out, err = cli(*args, "--output", str(mine))
    assert code == 2 and err.strip() == (f"finetunekit: error: --output {mine}: exists and is not a robustness "
                                         f"report; choose another name or remove it") and mine.read_text() == "{}"


@pytest.mark.parametrize("args, expected", [
    (["--attack", "fgm"], "--attack fgm: not one of fgsm, pgd (did you mean 'fgsm'?)"),
    (["--attack", "pgd", "--eps", "300/255"], "--eps 300/255: expected a number in [0, 1] (pixel units: "),
    (["--attack", "pgd", "--eps", "8/0"], "--eps 8/0: expected a number in [0, 1] such as 8/255 or 0.03"),
    (["--corruptions", "fog"], "--corruptions fog: not one of gaussian-noise, gaussian-blur, jpeg, brightness"),
    (["--corruptions", "jpeg", "--severities", "6"], "--severities 6: expected integers from 0 to 5, e.g. 1,3,5"),
    (["--attack", "fgsm", "--limit", "0"], "--limit 0: expected at least 1"),
    ([], "evaluate: --data PATH is required (only --attack/--corruptions default to the run's test set)"),
    (["--eps", "8/255"], "evaluate: --eps applies with --attack"),
    (["--attack", "fgsm", "--severities", "5"], "evaluate: --severities applies with --corruptions"),
    (["--data", ".", "--limit", "5"], "evaluate: --limit applies with --attack or --corruptions"),
])
def test_flag_errors_are_one_line(tmp_path, args, expected):
    code, out, err = cli("evaluate", str(tmp_path), *args)
    assert code == 2 and err.startswith(f"finetunekit: error: {expected}") and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("task, why", [
    ("text-classification", "adversarial text attacks are out of scope"),
    ("detection", "detectors are scored by mAP over boxes, not accuracy"),
    ("image-regression", "a regression model has no accuracy to lose"),
])
def test_other_tasks_are_refused_before_loading(tmp_path, task, why):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"finetunekit": {"task": task}}))
    code, out, err = cli("evaluate", str(tmp_path), "--attack", "fgsm", "--data", str(tmp_path))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.strip() == (f"finetunekit: error: evaluate --attack/--corruptions: {tmp_path / 'model'} is a {task} "
                           f"model; robustness covers image classification and multi-label models ({why})")


def test_a_loaded_regression_model_is_refused(tmp_path):
    folder = _saved(tmp_path, "timm:test_efficientnet", [], "image-regression")
    import finetunekit

    with pytest.raises(UserError, match=r"is a image-regression model; robustness covers image classification"):
        runner.evaluate_robustness(tmp_path, tmp_path, robustness.Plan(attacks=["fgsm"]),
                                   model=finetunekit.load(folder))


def test_multilabel_scores_are_label_accuracy_and_pgd_runs_on_soft_targets():
    scorer = runner.Scorer(SimpleNamespace(kind="multilabel", threshold=0.5))
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, -2.0, 1.0]])
    y = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert scorer(logits, y).tolist() == [1 / 3, 1.0] and scorer.metric == "label_accuracy"
    model = _mlp()
    x = torch.rand(8, 3, 4, 4)
    bce = lambda out, t: nn.functional.binary_cross_entropy_with_logits(out, t, reduction="none").mean(-1)  # noqa: E731
    adv = attacks.pgd(model, x, torch.rand(8, 3).round(), bce, 0.05, list(range(8)), steps=3)
    assert (adv - x).abs().max() <= 0.05 + 1e-7 and not torch.equal(adv, x)


def test_a_multilabel_model_end_to_end(tmp_path):
    """A multi-label folder (its table columns as a multi-label run records them) scored from a labels table:
    label accuracy, eps 0 equal to clean, PGD on its sigmoid loss below it."""
    if not CIFAR.is_dir():
        pytest.skip(f"{CIFAR} not found")
    labels = ["airplane", "cat", "animal", "vehicle"]
    folder = _saved(tmp_path, "timm:test_efficientnet", labels, "image-multilabel", 32)
    config = json.loads((folder / "config.json").read_text())
    config["finetunekit"].update(path_column="path", label_columns=["labels"], label_delimiter="|")
    (folder / "config.json").write_text(json.dumps(config))
    table = tmp_path / "t.csv"
    rows = [f"{p},{c}|{'animal' if c == 'cat' else 'vehicle'}" for c in ("airplane", "cat")
            for p in sorted((CIFAR / "test" / c).glob("*.jpg"))[:5]]
    table.write_text("path,labels\n" + "\n".join(rows) + "\n")
    plan = robustness.Plan(attacks=["pgd"], eps=[0.0, 8 / 255], eps_text=["0", "8/255"], pgd_steps=3,
                           corruptions=["brightness"], severities=[0], batch_size=4)
    report = runner.evaluate_robustness(folder, table, plan)
    clean = report["clean"]["label_accuracy"]
    assert (report["metric"], report["samples"]) == ("label_accuracy", 10)
    assert [a["label_accuracy"] for a in report["attacks"]][0] == clean == report["corruptions"][0]["label_accuracy"]
    assert report["attacks"][1]["label_accuracy"] < clean and "success_rate" not in report["attacks"][1]
