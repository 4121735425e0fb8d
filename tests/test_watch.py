"""A run watched from its files and its log: history.csv and progress.json after every epoch, the warnings about
its data (counted in metrics.json), the confusion matrix with its class names, and progress without a terminal."""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
from pathlib import Path

import pytest
import yaml

import finetunekit
from finetunekit import UserError
from finetunekit.addons import AddOn

from conftest import CIFAR, cli

CLASSES = ["airplane", "automobile", "bird", "cat"]
TINY = {"model": {"name": "timm:test_efficientnet", "pretrained": False},
        "data": {"image_size": 32, "num_workers": 0},
        "train": {"epochs": 2, "batch_size": 16, "seed": 0, "strategy": "linear-probe"}, "quiet": True}


def _manifest(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows(rows)
    return path


def _images(split: str, cls: str, start: int, n: int) -> list[tuple[str, str]]:
    files = sorted((CIFAR / split / cls).glob("*.jpg"))[start:start + n]
    return [(str(f), cls) for f in files]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """train: 15 images of each of 4 classes; val: 3 of each of 3 classes (no cat); test: 4 test images of each
    class plus 3 training images (byte-identical)."""
    if not CIFAR.is_dir():
        pytest.skip(f"{CIFAR} not found")
    d = tmp_path_factory.mktemp("watch")
    train = [r for c in CLASSES for r in _images("train", c, 0, 15)]
    val = [r for c in CLASSES[:3] for r in _images("train", c, 100, 3)]
    test = [r for c in CLASSES for r in _images("test", c, 0, 4)] + train[:3]
    return {"train": _manifest(d / "train.csv", train), "val": _manifest(d / "val.csv", val),
            "test": _manifest(d / "test.csv", test)}


class _Watcher(AddOn):
    """Reads the run's files after each epoch, as someone watching the run directory would."""

    def __init__(self, out: Path):
        self.out, self.seen = out, []

    def after_epoch(self, epoch, val):
        with (self.out / "history.csv").open() as f:
            rows = list(csv.DictReader(f))
        self.seen.append((epoch, rows, json.loads((self.out / "progress.json").read_text())))
        return False


def test_history_and_progress_after_every_epoch_and_the_warnings_counted(data, tmp_path):
    out = tmp_path / "run"
    watcher = _Watcher(out)
    run = finetunekit.fit({**TINY, "data": {**TINY["data"], "path": str(data["train"]), "val": str(data["val"]),
                                            "test": str(data["test"])}, "out": str(out)}, addons=[watcher])
    assert [epoch for epoch, _, _ in watcher.seen] == [1, 2]
    for epoch, rows, progress in watcher.seen:
        assert [int(r["epoch"]) for r in rows] == list(range(1, epoch + 1))  # every epoch so far
        assert progress["status"] == "running" and progress["epoch"] == epoch and progress["epochs"] == 2
        assert progress["last"]["epoch"] == epoch
        assert progress["last"]["val_loss"] == pytest.approx(float(rows[-1]["val_loss"]), rel=1e-12)
        assert progress["monitor"] == "accuracy" and progress["best_epoch"] in range(1, epoch + 1)
        assert set(progress["best"]) == {"accuracy", "macro_f1", "loss", "samples"}  # scalars only
    final = json.loads((out / "progress.json").read_text())
    assert final["status"] == "done" and final["epoch"] == 2
    metrics = run.metrics
    assert metrics["warnings"] == [
        "the validation set has 9 samples (< 50): its scores are noisy, and so is the choice of the best epoch "
        "(give --val more data, or raise --val-fraction)",
        "the validation set has no samples of 1 class the training set has (cat): its scores say nothing about it",
        "the validation set has fewer than 5 samples of 3 classes (airplane 3, automobile 3, bird 3): their "
        "per-class scores are noisy",
        "3 test images are byte-identical to training images (leakage: test scores will be optimistic)"]
    assert json.loads((out / "metrics.json").read_text())["warnings"] == metrics["warnings"]
    log = (out / "log.txt").read_text()
    assert all(f"WARNING warning: {w}" in log for w in metrics["warnings"])
    for split in ("val", "test"):  # the matrix names its rows and columns
        assert metrics[split]["confusion_matrix_classes"] == CLASSES
        assert len(metrics[split]["confusion_matrix"]) == 4
    assert sum(map(sum, metrics["test"]["confusion_matrix"])) == metrics["test"]["samples"] == 19
    # recipe.yaml names the data by absolute paths: --resume and --config read it from anywhere
    saved = yaml.safe_load((out / "recipe.yaml").read_text())["data"]
    assert saved["path"] == str(data["train"]) and Path(saved["test"]).is_absolute()

    # `finetunekit evaluate` prints the matrix under the per-class table
    from finetunekit.confusion import table

    code, stdout, stderr = cli("evaluate", str(out), "--data", str(data["test"]))
    assert code == 0, stderr
    scored = finetunekit.evaluate(out, data["test"])
    expected = ("\nconfusion matrix (rows: true class, columns: predicted)\n"
                + table(scored["confusion_matrix"], CLASSES))
    assert stdout.endswith(expected)
    assert expected.splitlines()[2].split() == ["true", "\\", "predicted", *CLASSES]


def test_resume_reads_recipe_yaml_from_anywhere(data, tmp_path, monkeypatch):
    """recipe.yaml's paths are absolute, so --resume finds the data from any directory; a run written before (its
    paths relative to where it ran) still resolves them against the current directory."""
    from finetunekit.resume import resume_recipe

    monkeypatch.chdir(data["train"].parent)
    out = tmp_path / "run"
    finetunekit.fit({**TINY, "train": {**TINY["train"], "epochs": 1},
                     "data": {**TINY["data"], "path": data["train"].name}, "out": str(out)})  # relative --data
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["data"]["path"] == str(data["train"]) and saved["out"] == str(out)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    recipe, resume = resume_recipe(finetunekit.Recipe(resume=str(out), train={"epochs": 2}))
    assert recipe.data.path == data["train"] and recipe.train.epochs == 2 and resume is not None
    saved["data"]["path"] = data["train"].name  # as a run before this release wrote it
    (out / "recipe.yaml").write_text(yaml.safe_dump(saved))
    monkeypatch.chdir(data["train"].parent)
    recipe, _ = resume_recipe(finetunekit.Recipe(resume=str(out)))
    assert recipe.data.path == Path(data["train"].name) and recipe.data.path.is_file()


def test_a_failed_run_says_so_in_progress_json(data, tmp_path):
    class Boom(AddOn):
        def after_epoch(self, epoch, val):
            raise RuntimeError("disk on fire")

    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        finetunekit.fit({**TINY, "data": {**TINY["data"], "path": str(data["train"])}, "out": str(out)},
                        addons=[Boom()])
    progress = json.loads((out / "progress.json").read_text())
    assert progress["status"] == "failed" and progress["error"] == "RuntimeError: disk on fire"
    assert progress["epoch"] == 1


def test_a_manifest_that_labels_one_file_twice(data, tmp_path):
    rows = list(csv.reader(data["train"].open()))[1:]
    first = rows[0][0]
    bad = _manifest(tmp_path / "bad.csv", rows + [(first, "cat")])
    with pytest.raises(UserError) as e:
        finetunekit.fit({**TINY, "data": {**TINY["data"], "path": str(bad)}, "out": str(tmp_path / "x")})
    assert str(e.value) == (f"--data {bad}, line {len(rows) + 2}: {first} is labelled 'cat' here and 'airplane' on "
                            f"line 2; a single-label manifest gives each file one label (for several labels per "
                            f"image: --task image-multilabel)")
    # multi-label: a warning, each row stays a sample
    from finetunekit.data.sources import resolve_table_splits

    table = tmp_path / "multi.csv"
    with table.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "labels"])
        w.writerows([(p, "a|b" if i % 2 else "b") for i, (p, _) in enumerate(rows[:20])] + [(first, "a")])
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("finetunekit").addHandler(handler)
    try:
        splits = resolve_table_splits("image-multilabel", table, None, None, label_column=None, label_delimiter=None,
                                      val_fraction=0.2, seed=0, max_bad_fraction=0.05)
    finally:
        logging.getLogger("finetunekit").removeHandler(handler)
    assert len(splits.train) + len(splits.val) == 21
    assert [m for m in lines if "listed with the labels" in m] == [
        f"warning: --data {table}: {first} is listed with the labels 'b' and 'a'; each row trains as a sample of its own "
        f"(to give one image several labels, list it once with its labels delimited)"]


def test_confusion_table_past_20_classes_keeps_every_sum():
    from finetunekit.confusion import table

    n = 25
    classes = [f"c{i:02d}" for i in range(n)]
    matrix = [[(3 * i + 7 * j) % 5 if i != j else 10 for j in range(n)] for i in range(n)]
    matrix[4][9] = 40  # c04 and c09: the most errors
    text = table(matrix, classes).splitlines()
    head = text[0].split()[3:]
    assert len(head) == 21 and head[-2:] == ["others)"] or head[-1] == "others)"
    rows = text[1:-1]
    assert len(rows) == 21 and rows[-1].startswith("(5 others)")
    assert text[-1] == "(25 classes: the 20 with the most errors shown, the other 5 summed)"
    numbers = [[int(v) for v in r.split()[-21:]] for r in rows]
    assert sum(map(sum, numbers)) == sum(map(sum, matrix))  # nothing lost
    assert any(r.startswith("c04 ") for r in rows) and any(r.startswith("c09 ") for r in rows)
    assert table([[5, 1], [2, 7]], ["cat", "dog"]) == ("true \\ predicted  cat  dog\n"
                                                       "cat                 5    1\n"
                                                       "dog                 2    7\n")


def test_progress_bar_on_a_terminal_lines_when_piped(monkeypatch):
    from finetunekit.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for tty in (True, False):
        err = Terminal() if tty else io.StringIO()
        monkeypatch.setattr(sys, "stderr", err)
        monkeypatch.setenv("FINETUNEKIT_PROGRESS_SECONDS", "0")
        lines = []
        handler = logging.Handler()
        handler.emit = lambda record: lines.append(record.getMessage())
        log = logging.getLogger("finetunekit")
        log.addHandler(handler)
        level = log.level
        log.setLevel(logging.INFO)
        try:
            bar = Progress(range(4), desc="epoch 2/10", total=4, every=2)
            for n, _ in enumerate(bar, start=1):
                if bar.due(n):
                    bar.show({"loss": "0.4100", "samples/s": "212"}, n)
            bar.close()
        finally:
            log.removeHandler(handler)
            log.setLevel(level)
        if tty:  # tqdm's bar (carriage returns, the postfix), no log lines
            assert "\r" in err.getvalue() and "loss=0.4100" in err.getvalue() and lines == []
        else:  # no bar: one line per due batch
            assert err.getvalue() == ""
            assert lines == [f"epoch 2/10: batch {n}/4, loss 0.4100, 212 samples/s" for n in (1, 2, 3, 4)]
