"""`finetunekit predict` and `evaluate` on a tiny saved model (timm's test_efficientnet, 2 classes, 32 px):
unreadable inputs, --top-k beyond the classes, bad --batch-size, empty folders, the CLI's wording, and
evaluate's exact metrics."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest

from finetunekit import UserError
from finetunekit.cli import run

from conftest import CIFAR, cli, write_manifest

CLASSES = ["cat", "dog"]



@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """`finetunekit fit` of a 2-class test_efficientnet: 16 CIFAR images, 2 epochs (the head, then all)."""
    if not CIFAR.is_dir():
        pytest.skip(f"{CIFAR} not found (the shared datasets sit beside the repo)")
    d = tmp_path_factory.mktemp("tiny")
    train = write_manifest(d / "train.csv", CIFAR / "train", 8, CLASSES)
    test = write_manifest(d / "test.csv", CIFAR / "test", 3, CLASSES)
    code, out, err = cli("fit", "--data", str(train), "--test", str(test), "--model", "timm:test_efficientnet",
                         "--no-pretrained", "--image-size", "32", "--augment", "none", "--num-workers", "0",
                         "--strategy", "freeze-unfreeze", "--epochs", "2", "--head-epochs", "1",
                         "--batch-size", "4", "--lr", "0.01", "--seed", "0", "--out", str(d / "run"), "--quiet")
    assert code == 0, err
    images = d / "images"
    images.mkdir()
    for name in ("0000.jpg", "0001.jpg"):
        shutil.copy(CIFAR / "test" / "cat" / name, images / f"cat-{name}")
    shutil.copy(CIFAR / "test" / "dog" / "0000.jpg", images / "dog-0000.jpg")
    return {"run": d / "run", "train": train, "test": test, "images": images, "fit_out": out, "fit_err": err}


def _broken(folder: Path, name: str = "broken.jpg") -> Path:
    path = folder / name
    path.write_text("not a picture")
    return path


# 1. unreadable images: skipped, reported, in the output; --strict fails instead

def test_predict_skips_unreadable_images_and_lists_them(tiny, tmp_path):
    good = sorted(str(p) for p in tiny["images"].iterdir())
    bad = _broken(tmp_path)
    trunc = tmp_path / "truncated.jpg"
    trunc.write_bytes(Path(good[0]).read_bytes()[:300])
    code, out, err = cli("predict", str(tiny["run"]), good[0], str(bad), str(tiny["images"]), str(trunc),
                         "--format", "csv")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["path"] for r in rows] == [good[0], str(bad), *good, str(trunc)]  # one row per input, in order
    assert [bool(r["error"]) for r in rows] == [False, True, False, False, False, True]
    assert rows[1]["label"] == rows[1]["score"] == ""
    assert rows[1]["error"].startswith("cannot read as an image (UnidentifiedImageError")
    assert rows[5]["error"].startswith("cannot read as an image (OSError")
    assert all(r["label"] in CLASSES for r in rows if not r["error"])
    lines = err.strip().splitlines()
    assert lines[0].startswith(f"warning: {bad}: cannot read as an image (UnidentifiedImageError")
    assert lines[1].startswith(f"warning: {trunc}: cannot read as an image (OSError")
    assert lines[2] == "warning: 2 of 6 images could not be read and were skipped (their rows carry the error; " \
                       "--strict fails instead)"
    assert len(lines) == 3
    # the images that read score exactly as they do without the broken ones in their batch
    code, alone, _ = cli("predict", str(tiny["run"]), good[0], str(tiny["images"]), "--format", "csv")
    assert [r for r in csv.DictReader(io.StringIO(alone))] == [r for r in rows if not r["error"]]

    code, out, err = cli("predict", str(tiny["run"]), good[0], str(bad), "--format", "json")
    preds = json.loads(out)
    assert code == 0 and len(preds) == 2 and preds[1]["path"] == str(bad) and set(preds[1]) == {"path", "error"}
    assert preds[0]["label"] in CLASSES and "error" not in preds[0]
    code, out, err = cli("predict", str(tiny["run"]), good[0], str(bad))
    assert out.splitlines()[0].split() == ["path", "label", "score", "error"]
    assert out.splitlines()[2].split()[:4] == [str(bad), "cannot", "read", "as"]


def test_predict_strict_fails_on_the_first_unreadable_image(tiny, tmp_path):
    bad = _broken(tmp_path)
    code, out, err = cli("predict", str(tiny["run"]), str(tiny["images"]), str(bad), "--strict")
    assert code == 2 and out == ""
    assert err.startswith(f"finetunekit: error: {bad}: cannot read as an image (UnidentifiedImageError")
    assert len(err.strip().splitlines()) == 1, err


def test_predict_with_no_readable_image_exits_1(tiny, tmp_path):
    bad = _broken(tmp_path)
    code, out, err = cli("predict", str(tiny["run"]), str(bad), "--format", "csv")
    assert code == 1
    assert list(csv.DictReader(io.StringIO(out)))[0]["path"] == str(bad)
    assert err.strip().splitlines()[-1] == "finetunekit: error: none of the 1 images could be read"


def test_the_python_api_raises_by_default_and_skips_on_request(tiny, tmp_path):
    import finetunekit

    model = finetunekit.load(tiny["run"])
    bad = _broken(tmp_path)
    with pytest.raises(UserError, match=f"{bad}: cannot read as an image"):
        model.predict([bad])
    preds = model.predict([tiny["images"], bad], errors="skip")
    assert len(preds) == 4 and preds[3]["error"].startswith("cannot read as an image")
    with pytest.raises(ValueError, match="errors"):
        model.predict([bad], errors="ignore")


# 2. --top-k beyond the number of classes

@pytest.mark.parametrize("fmt", ["csv", "table", "json"])
def test_top_k_is_clamped_to_the_classes(tiny, fmt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # short relative paths: the table aligns cells of up to 60 characters
    shutil.copytree(tiny["images"], "images")
    _broken(Path("."))
    code, out, err = cli("predict", str(tiny["run"]), "images", "broken.jpg", "--top-k", "3", "--format", fmt)
    assert code == 0, err
    assert err.splitlines()[0] == "warning: --top-k 3: the model has 2 classes; showing 2"
    if fmt == "json":
        preds = json.loads(out)
        assert [len(p["top_k"]) for p in preds[:3]] == [2, 2, 2] and "top_k" not in preds[3]
        return
    if fmt == "csv":
        rows = list(csv.reader(io.StringIO(out)))
    else:
        lines = out.splitlines()  # cells read at the header's column offsets: the table is aligned
        starts = [lines[0].index(c) for c in lines[0].split()] + [None]
        rows = [[line[a:b].strip() for a, b in zip(starts, starts[1:])] for line in lines]
        assert rows[-1][1:5] == ["", "", "", ""] and rows[-1][5].startswith("cannot read as an image")
    assert rows[0] == ["path", "label", "score", "label2", "score2", "error"]
    assert all(len(r) == 6 for r in rows), rows  # rectangular
    assert all({r[1], r[3]} == set(CLASSES) for r in rows[1:4])
    assert all(float(r[2]) >= float(r[4]) for r in rows[1:4])


def test_top_k_equal_to_the_classes_gives_no_warning(tiny):
    code, out, err = cli("predict", str(tiny["run"]), str(tiny["images"]), "--top-k", "2", "--format", "csv")
    assert code == 0 and err == ""
    assert out.splitlines()[0] == "path,label,score,label2,score2,error"


# 3. --batch-size must be positive, checked before the model loads

@pytest.mark.parametrize("command", ["predict", "evaluate"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_batch_size_below_1_is_one_line_before_loading(command, value, tmp_path):
    extra = ["x.jpg"] if command == "predict" else ["--data", str(tmp_path)]
    with pytest.raises(UserError) as e:  # /no/run: had the model loaded first, this would be the error
        run([command, "/no/run", *extra, "--batch-size", value])
    assert str(e.value) == f"--batch-size: expected a value >= 1, got {value}"


def test_batch_size_below_1_from_python(tiny, tmp_path):
    import finetunekit

    model = finetunekit.load(tiny["run"])
    with pytest.raises(UserError, match="batch_size: expected a value >= 1, got 0"):
        model.predict(tiny["images"], batch_size=0)
    with pytest.raises(UserError, match="batch_size: expected a value >= 1, got -1"):
        finetunekit.evaluate(tiny["run"], tiny["test"], batch_size=-1)


# 4. folders without images

def test_predict_on_an_empty_folder_is_an_error(tiny, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    code, out, err = cli("predict", str(tiny["run"]), str(empty))
    assert code == 2 and out == ""
    assert err == (f"finetunekit: error: {empty}: no images found (looked for .jpg, .jpeg, .png, .bmp, .gif, .tif, "
                   f".tiff, .webp, .ppm, .pgm, .pbm)\n")


def test_an_empty_folder_beside_images_is_a_warning(tiny, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = cli("predict", str(tiny["run"]), str(empty), str(tiny["images"]), "--format", "csv")
    assert code == 0
    assert err.startswith(f"warning: {empty}: no images found (looked for .jpg, .jpeg, .png")
    assert len(err.splitlines()) == 1
    assert len(list(csv.DictReader(io.StringIO(out)))) == 3


# 6. wording

@pytest.mark.parametrize("args, expected", [
    (["bogus"], "finetunekit: error: argument COMMAND: invalid choice: 'bogus' (choose from"),
    (["predict"], "finetunekit: error: predict: the following arguments are required: RUN"),
    (["fit", "--epoch", "3"], "finetunekit: error: fit: unknown option --epoch (did you mean '--epochs'?)"),
    (["predict", "run"], "finetunekit: error: predict: give input files or folders, or --text TEXT"),
    (["predict", "run", "x.jpg", "--top-k", "many"], "finetunekit: error: predict: argument --top-k: invalid int "
                                                     "value: 'many'"),
])
def test_errors_have_one_prefix(args, expected):
    code, out, err = cli(*args)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(expected), err
    assert err.count("finetunekit") == 1


def test_fit_says_where_the_run_is_once(tiny):
    said = (tiny["fit_out"] + tiny["fit_err"]).count(f"run: {tiny['run']}")
    assert said == 1, tiny["fit_out"] + tiny["fit_err"]
    assert tiny["fit_err"].splitlines()[-1].endswith(f"; run: {tiny['run']}")  # --quiet still says it


def test_phase_changes_read_as_english(tiny):
    log = (tiny["run"] / "log.txt").read_text()
    assert "epoch 1: training head only (1 epoch); 2 tensors, lr x10" in log
    assert "epoch 2: training all parameters; 49 tensors, lr x1" in log and " trains (" not in log


def test_epoch_counts_are_singular_or_plural():
    from finetunekit.inspection import describe
    from finetunekit.models import create_backbone
    from finetunekit.strategies import make_plan, plural

    assert [plural(n, "epoch") for n in (1, 2, 0.5, 1.0)] == ["1 epoch", "2 epochs", "0.5 epochs", "1 epoch"]

    backbone = create_backbone("timm:test_efficientnet", 2, pretrained=False)
    plan = make_plan("freeze-unfreeze", backbone, 3, head_epochs=1)
    assert plan.phases[0].description == "head only (1 epoch)"
    assert make_plan("lp-ft", backbone, 5, head_epochs=2).phases[0].description == "head only (2 epochs)"
    gradual = [p.description for p in make_plan("gradual", backbone, 3).phases]
    assert gradual[1].startswith("head + the top group (down to ") and \
        gradual[2].startswith("head + the top 2 groups (down to ")
    assert "trains from (full, 1 epoch)" in describe("timm:test_efficientnet", epochs=1)
    assert "trains from (full, 3 epochs)" in describe("timm:test_efficientnet", epochs=3)


# 7. evaluate: pinned metrics of the tiny model (evaluate must give these whatever runs it)

PINNED = {"accuracy": 0.3333333432674408, "macro_f1": 0.25, "confusion_matrix": [[0, 3], [1, 2]],
          "confusion_matrix_classes": ["cat", "dog"], "samples": 6,
          "per_class": {"cat": {"precision": 0.0, "recall": 0.0, "f1": 0.0},
                        "dog": {"precision": 0.4000000059604645, "recall": 0.6666666865348816, "f1": 0.5}}}
PINNED_LOSS = 0.6952621936798096
PRINTED = ["accuracy 0.3333  macro_f1 0.2500  loss 0.6953  samples 6", "class  precision  recall      f1",
           "cat     0.0000  0.0000  0.0000", "dog     0.4000  0.6667  0.5000", "",
           "confusion matrix (rows: true class, columns: predicted)", "true \\ predicted  cat  dog",
           "cat                 0    3", "dog                 1    2"]


@pytest.mark.parametrize("batch_size", ["4", "64"])
def test_evaluate_gives_pinned_metrics_equal_to_the_fit_test_metrics(tiny, tmp_path, batch_size):
    saved = json.loads((tiny["run"] / "metrics.json").read_text())["test"]
    code, out, err = cli("evaluate", str(tiny["run"]), "--data", str(tiny["test"]), "--output",
                         str(tmp_path / "e.json"), "--batch-size", batch_size)
    assert code == 0, err
    assert out.splitlines() == PRINTED
    metrics = json.loads((tmp_path / "e.json").read_text())
    assert {k: metrics[k] for k in PINNED} == PINNED
    assert metrics["loss"] == pytest.approx(PINNED_LOSS, rel=1e-6, abs=0)
    assert {k: metrics[k] for k in saved if k != "loss"} == {k: saved[k] for k in saved if k != "loss"}
    assert metrics["loss"] == pytest.approx(saved["loss"], rel=1e-6, abs=0)
    assert metrics["skipped"] == 0


def test_evaluate_skips_and_counts_unreadable_files(tiny, tmp_path):
    import finetunekit

    manifest = tmp_path / "test.csv"
    bad = _broken(tmp_path)
    manifest.write_text(tiny["test"].read_text() + f"{bad},cat\n")
    metrics = finetunekit.evaluate(tiny["run"], manifest, batch_size=4)
    assert metrics["skipped"] == 1
    assert {k: metrics[k] for k in PINNED} == PINNED
    assert metrics["loss"] == pytest.approx(PINNED_LOSS, rel=1e-6, abs=0)


def test_predict_scores_are_pinned(tiny):
    code, out, err = cli("predict", str(tiny["run"]), str(tiny["images"]), "--format", "json", "--top-k", "2")
    preds = json.loads(out)
    assert [(Path(p["path"]).name, p["label"]) for p in preds] == [
        ("cat-0000.jpg", "dog"), ("cat-0001.jpg", "dog"), ("dog-0000.jpg", "dog")]
    assert [p["top_k"][1]["label"] for p in preds] == ["cat"] * 3
    assert [p["score"] for p in preds] == pytest.approx([0.519071638584137, 0.5171774625778198, 0.5367326140403748],
                                                        rel=1e-6, abs=0)
