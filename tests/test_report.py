"""report.html and `finetunekit compare`, on real tiny runs: a timm test model on real CIFAR images (default
suite); a 2-layer BERT on SST-2, multi-label, regression and a tiny Faster R-CNN on raccoon (slow); the pages
opened in headless Chromium (browser). Predictions files come from the saved models (predictions_helper)."""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

import finetunekit
import finetunekit.report
from conftest import SHARED_DATA, cli, save_tiny_bert, write_manifest
from predictions_helper import write_detection_predictions, write_predictions

CIFAR = SHARED_DATA / "cifar10-mini"
SST2 = SHARED_DATA / "sst2"
RACCOON = SHARED_DATA / "raccoon"
ANIMALS = {"bird", "cat", "deer", "dog", "frog", "horse"}


def _fit(out: Path, data: dict, task: str = "image-classification", model: str = "timm:test_efficientnet",
         **train):
    return finetunekit.fit({"task": task, "quiet": True, "out": str(out),
                            "data": {"image_size": 32, "augment": "none", "num_workers": 0, **data},
                            "model": {"name": model, "pretrained": False},
                            "train": {"epochs": 2, "batch_size": 16, "lr": 3e-3, "seed": 0, **train}})


@pytest.fixture(scope="module", autouse=True)
def reports_on():
    """conftest turns fit's report off for the rest of the suite (FINETUNEKIT_REPORT=0): on for this module's runs
    and the CLI processes they start."""
    before = os.environ.get("FINETUNEKIT_REPORT")
    os.environ["FINETUNEKIT_REPORT"] = "1"
    yield
    if before is None:
        del os.environ["FINETUNEKIT_REPORT"]
    else:
        os.environ["FINETUNEKIT_REPORT"] = before


@pytest.fixture(scope="module")
def image_run(cifar_subset, tmp_path_factory):
    """A 2-epoch image classification run on 400 CIFAR images, validated on 200 others; report.html as fit
    wrote it is kept aside (report-at-fit.html). fit wrote val_predictions.csv and the calibration itself."""
    run = _fit(tmp_path_factory.mktemp("image") / "run", {"path": str(cifar_subset["train"]),
                                                         "val": str(cifar_subset["test"])}).run_dir
    shutil.copy(run / "report.html", run / "report-at-fit.html")
    return run


def _images(page: str) -> list[Image.Image]:
    """Every <img> of a page, decoded (its data: URI must be a base64 PNG of the size the tag states)."""
    out = []
    for src, w, h in re.findall(r'<img src="([^"]*)" width="(\d+)" height="(\d+)"', page):
        assert src.startswith("data:image/png;base64,"), src[:40]
        im = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        im.load()
        assert im.size == (int(w), int(h))
        out.append(im)
    assert len(out) == page.count("<img ")
    return out


def _self_contained(page: str) -> None:
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert not re.search(r"url\((?!#)", page)  # matplotlib's clip paths refer to ids in the same SVG
    assert not re.search(r'(src|href)="(?!data:|#)', page), re.search(r'(src|href)="(?!data:|#)[^"]*', page)
    for svg in re.findall(r"<svg.*?</svg>", page, flags=re.S):  # matplotlib's SVGs refer to nothing outside
        assert not re.search(r'(xlink:href|href)="(?!#|data:)', svg)


def _section(page: str, id_: str) -> str:
    m = re.search(rf'<section id="{id_}">(.*?)</section>', page, flags=re.S)
    assert m, f"no section {id_}"
    return m.group(1)


def test_fit_writes_a_self_contained_report_of_its_own_files(image_run):
    page = (image_run / "report-at-fit.html").read_text(encoding="utf-8")
    _self_contained(page)
    for id_ in ("overview", "curves", "confusion", "per-class", "confused", "top-losses", "calibration"):
        assert f'href="#{id_}"' in page  # the table of contents
    assert 'id="montage"' not in page and 'id="per-class-ap"' not in page and 'id="regression"' not in page
    assert _section(page, "curves").count("<svg") == 4  # loss, metrics, lr, grad norm
    assert _section(page, "confusion").count("<svg") == 2  # counts and row-normalized
    metrics = json.loads((image_run / "metrics.json").read_text())
    matrix = metrics["val"]["confusion_matrix"]
    counts = _section(page, "confusion").split("val: counts")[1]
    assert f">{matrix[0][0]}<" in counts  # the cell texts are the recorded counts
    # fit wrote val_predictions.csv and the temperature before the report: nothing is omitted
    assert "Omitted" not in page
    # each of the 24 top losses: its thumbnail (96 px) and its Grad-CAM overlay (finetunekit.explain, 112 px)
    assert sorted(max(im.size) for im in _images(_section(page, "top-losses"))) == [96] * 24 + [112] * 24
    assert _section(page, "calibration").count("<svg") == 1


def test_report_with_predictions_shows_top_losses_and_the_reliability_diagram(image_run):
    page = finetunekit.report.build(image_run).read_text()
    _self_contained(page)
    rows = list(csv.DictReader((image_run / "val_predictions.csv").open()))
    worst = max(rows, key=lambda r: float(r["loss"]))
    top = _section(page, "top-losses")
    thumbs = [im for im in _images(top) if max(im.size) == 96]  # 32 px CIFAR enlarged x3 (and 24 Grad-CAMs)
    assert len(thumbs) == 24
    assert top.index(Path(worst["item"]).as_posix()) < top.index("</div></div>")  # the worst is the first tile
    # the thumbnail is the file itself, not an augmented view: enlarged by nearest-neighbour, pixel for pixel
    original = Image.open(worst["item"]).convert("RGB")
    assert thumbs[0].resize((32, 32), Image.Resampling.NEAREST).tobytes() == original.tobytes()
    # ECE before/after as the report computes them (15 bins) equals torchmetrics' on the same probabilities
    calibration = json.loads((image_run / "metrics.json").read_text())["calibration"]
    shown = re.search(r"ECE before calibration ([\d.]+), after calibration ([\d.]+)", page)
    assert shown, _section(page, "calibration")[:500]
    assert float(shown.group(1)) == pytest.approx(calibration["ece_before"], abs=1e-4)
    assert float(shown.group(2)) == pytest.approx(calibration["ece_after"], abs=1e-4)
    assert _section(page, "calibration").count("<svg") == 1
    assert f"{calibration['temperature']:.4f}" in _section(page, "calibration")


def test_reliability_bins_and_ece_match_torchmetrics():
    import torch
    from torchmetrics.functional.classification import multiclass_calibration_error

    from finetunekit.report.calibration import ece, reliability_bins

    torch.manual_seed(0)
    probs = (torch.randn(500, 4) * 2).softmax(-1)
    target = torch.randint(0, 4, (500,))
    conf, pred = probs.max(-1)
    bins = reliability_bins(conf.tolist(), (pred == target).tolist())
    assert sum(b["count"] for b in bins) == 500 and len(bins) == 15
    assert ece(bins) == pytest.approx(float(multiclass_calibration_error(probs, target, 4, n_bins=15)), abs=1e-6)
    assert reliability_bins([0.0, 1.0, 1 / 15], [True, True, False])[0]["count"] == 2  # 0 and 1/15: bin 1


def test_missing_and_damaged_inputs_each_omit_their_sections_with_a_note(image_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(image_run, run, ignore=shutil.ignore_patterns("checkpoints", "tensorboard", "model"))
    (run / "history.csv").unlink()
    (run / "metrics.json").write_text("{not json", encoding="utf-8")
    with (run / "val_predictions.csv").open("w") as f:
        f.write("item,label\n")  # a header and no rows
    page = finetunekit.report.build(run).read_text()
    _self_contained(page)
    assert "Omitted: history.csv is not in the run directory" in _section(page, "curves")
    assert "metrics.json could not be read (JSONDecodeError" in _section(page, "overview")
    assert "Omitted: val_predictions.csv" in _section(page, "top-losses")
    assert "recipe.yaml" in _section(page, "overview")  # what is there is still shown
    (run / "recipe.yaml").unlink()
    (run / "metrics.json").unlink()
    (run / "val_predictions.csv").unlink()
    (run / "split.json").unlink()
    (run / ".finetunekit-run.json").unlink()  # the run marker
    with pytest.raises(finetunekit.UserError, match="not a finetunekit run directory"):
        finetunekit.report.build(run)


def test_ema_columns_are_drawn_dashed_beside_the_raw_ones(image_run, tmp_path):
    """history.csv gains val_ema_* columns where a run records them (the contract): a copy of the real history
    with two such columns added."""
    run = tmp_path / "run"
    shutil.copytree(image_run, run, ignore=shutil.ignore_patterns("checkpoints", "tensorboard", "model"))
    rows = list(csv.DictReader((run / "history.csv").open()))
    with (run / "history.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*rows[0], "val_ema_loss", "val_ema_accuracy"])
        w.writeheader()
        w.writerows({**r, "val_ema_loss": float(r["val_loss"]) * 1.01, "val_ema_accuracy": 0.5} for r in rows)
    curves = _section(finetunekit.report.build(run).read_text(), "curves")
    assert "val ema loss" in curves and "val ema accuracy" in curves and "val accuracy" in curves
    before = _section(finetunekit.report.build(image_run, tmp_path / "before.html").read_text(), "curves")
    assert curves.count("stroke-dasharray") == before.count("stroke-dasharray") + 4  # 2 lines, 2 legend keys


@pytest.fixture(scope="module")
def second_run(cifar_subset, tmp_path_factory):
    """A 1-epoch run whose report fails to build (its renderer raises): fit must still succeed."""
    from finetunekit.report import builder

    mp = pytest.MonkeyPatch()
    mp.setattr(builder, "render", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("renderer broke")))
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("finetunekit").addHandler(handler)
    try:
        run = _fit(tmp_path_factory.mktemp("second") / "run", {"path": str(cifar_subset["train"]),
                                                              "val": str(cifar_subset["test"])}, epochs=1, lr=1e-3)
    finally:
        logging.getLogger("finetunekit").removeHandler(handler)
        mp.undo()
    return run, [r.getMessage() for r in records]


def test_a_report_that_fails_is_a_warning_and_the_run_succeeds(second_run):
    run, messages = second_run
    assert (run.run_dir / "metrics.json").is_file() and run.metrics["epochs_run"] == 1
    assert not (run.run_dir / "report.html").exists()
    assert any("report.html not written (RuntimeError: renderer broke)" in m for m in messages), messages


def test_finetunekit_report_0_skips_the_report_at_the_end_of_fit(image_run, monkeypatch):
    monkeypatch.setenv("FINETUNEKIT_REPORT", "0")
    assert finetunekit.report.write_after_fit(image_run) is None
    monkeypatch.setenv("FINETUNEKIT_REPORT", "1")
    assert finetunekit.report.write_after_fit(image_run) == image_run / "report.html"


def test_cli_report_prints_its_path_and_refuses_what_is_not_a_run(image_run, tmp_path):
    code, out, err = cli("report", str(image_run), "--out", str(tmp_path / "r.html"))
    assert code == 0 and out.strip() == str(tmp_path / "r.html") and (tmp_path / "r.html").stat().st_size > 10_000
    code, out, err = cli("report", str(tmp_path))
    assert code == 2 and err.strip() == (f"finetunekit: error: RUN {tmp_path}: not a finetunekit run directory "
                                         f"(no metrics.json, history.csv or run marker)")


def test_compare_prints_one_table_and_overlays_the_curves(image_run, second_run, tmp_path):
    first, second = str(image_run), str(second_run[0].run_dir)
    code, out, err = cli("compare", first, second, "--out", str(tmp_path / "c.html"))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["run", "task", "model", "strategy"] and "val accuracy" in lines[0]
    assert lines[2].startswith(first) and lines[3].startswith(second) and lines[-1] == f"written: {tmp_path / 'c.html'}"
    acc = json.loads((image_run / "metrics.json").read_text())["val"]["accuracy"]
    assert f"{acc:.4f}" in lines[2]
    page = (tmp_path / "c.html").read_text()
    _self_contained(page)
    curves = _section(page, "curves")
    assert curves.count("<svg") == 2 and curves.count(first) == 2 and curves.count(second) == 2  # legends


def test_compare_refuses_a_non_run_and_runs_of_different_tasks(image_run, tmp_path):
    code, _, err = cli("compare", str(image_run), str(tmp_path / "nothing"))
    assert code == 2 and "no such folder" in err and len(err.strip().splitlines()) == 1
    other = tmp_path / "regression-run"
    shutil.copytree(image_run, other, ignore=shutil.ignore_patterns("checkpoints", "tensorboard", "model"))
    metrics = json.loads((other / "metrics.json").read_text())
    (other / "metrics.json").write_text(json.dumps({**metrics, "task": "image-regression"}))
    code, _, err = cli("compare", str(image_run), str(other))
    assert code == 2 and err.strip() == (f"finetunekit: error: compare: runs of different tasks ({image_run} is "
                                         f"image-classification, {other} is image-regression); compare runs of one "
                                         f"task")


def test_draw_boxes_draws_on_a_real_photo_and_parse_boxes_reads_both_forms(tmp_path):
    if not RACCOON.is_dir():
        pytest.skip(f"{RACCOON} not found")
    from finetunekit.imagefiles import load_rgb
    from finetunekit.inference import draw, draw_boxes
    from finetunekit.report.detection import parse_boxes

    photo = RACCOON / "images" / "raccoon-1.jpg"
    image = load_rgb(photo)
    boxes, labels = parse_boxes('[{"box": [10, 20, 110, 120], "label": "raccoon", "score": 0.91}]')
    assert boxes == [[10.0, 20.0, 110.0, 120.0]] and labels == ["raccoon 0.91"]
    assert parse_boxes("[[1, 2, 3, 4, 0.5], [1, 2]]") == ([[1.0, 2.0, 3.0, 4.0]], ["0.50"])
    assert parse_boxes("not json") == ([], []) and parse_boxes("") == ([], [])
    drawn = draw_boxes(image, boxes, labels, "#1a7f37", 3)
    assert drawn.size == image.size and drawn.getpixel((60, 21)) == (0x1a, 0x7f, 0x37)  # on the top edge
    assert drawn.getpixel((60, 70)) == image.getpixel((60, 70))  # inside: untouched
    assert draw_boxes(image, [], None) is image
    saved = draw(str(photo), {"boxes": boxes, "labels": ["raccoon"], "scores": [0.91]}, tmp_path)
    assert Image.open(saved).convert("RGB").getpixel((60, 21)) == (255, 0, 0)


# --- the other task kinds (slow): real tiny runs, each report checked -------------------------------------------

def _table(path: Path, split_dir: Path, per_class: int, kind: str) -> Path:
    classes = sorted(d.name for d in split_dir.iterdir())
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "labels" if kind == "multilabel" else "value"])
        for c in classes:
            for img in sorted((split_dir / c).glob("*.jpg"))[:per_class]:
                group = "animal" if c in ANIMALS else "vehicle"
                w.writerow([img, f"{group}|{c}" if kind == "multilabel" else float(c in ANIMALS)])
    return path


@pytest.fixture(scope="module")
def table_runs(tmp_path_factory):
    if not CIFAR.is_dir():
        pytest.skip(f"{CIFAR} not found")
    runs = {}
    for kind in ("multilabel", "regression"):
        d = tmp_path_factory.mktemp(kind)
        train, val = _table(d / "train.csv", CIFAR / "train", 40, kind), _table(d / "val.csv", CIFAR / "test", 20, kind)
        run = _fit(d / "run", {"path": str(train), "val": str(val)}, task=f"image-{kind}").run_dir
        write_predictions(run)
        runs[kind] = run
    return runs


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    if not SST2.is_dir():
        pytest.skip(f"{SST2} not found")
    d = tmp_path_factory.mktemp("sst2")
    for name, rows in (("train", 600), ("dev", 200)):
        lines = (SST2 / f"{name}.tsv").read_text(encoding="utf-8").splitlines()
        (d / f"{name}.tsv").write_text("\n".join(lines[:rows + 1]) + "\n", encoding="utf-8")
    bert = save_tiny_bert(d / "bert")
    run = finetunekit.fit({"task": "text-classification", "quiet": True, "out": str(d / "run"),
                           "data": {"path": str(d / "train.tsv"), "val": str(d / "dev.tsv")},
                           "model": {"name": f"hf:{bert}"},
                           "train": {"epochs": 2, "batch_size": 32, "lr": 3e-3, "seed": 0}}).run_dir
    write_predictions(run)
    return run


@pytest.fixture(scope="module")
def detection_run(tmp_path_factory):
    pytest.importorskip("pycocotools")
    if not RACCOON.is_dir():
        pytest.skip(f"{RACCOON} not found")
    d = tmp_path_factory.mktemp("raccoon")
    sets = {"train": range(1, 9), "val": range(9, 13)}
    for name, ids in sets.items():
        for sub in ("images", "annotations"):
            (d / name / sub).mkdir(parents=True)
        for i in ids:
            shutil.copy(RACCOON / "images" / f"raccoon-{i}.jpg", d / name / "images")
            shutil.copy(RACCOON / "annotations" / f"raccoon-{i}.xml", d / name / "annotations")
    run = finetunekit.fit({"task": "detection", "quiet": True, "out": str(d / "run"),
                           "data": {"path": str(d / "train"), "val": str(d / "val"), "num_workers": 0},
                           "model": {"min_size": 96, "max_size": 160, "score_threshold": 0.0},
                           "train": {"epochs": 1, "batch_size": 2, "lr": 1e-4, "seed": 0}}).run_dir
    write_detection_predictions(run, d / "val")
    return run


@pytest.mark.slow
def test_text_report_shows_the_texts_of_the_top_losses(text_run):
    page = finetunekit.report.build(text_run).read_text()
    _self_contained(page)
    rows = list(csv.DictReader((text_run / "val_predictions.csv").open(encoding="utf-8")))
    worst = max(rows, key=lambda r: float(r["loss"]))
    top = _section(page, "top-losses")
    assert "<img" not in top and top.count("<tr>") == 21  # the header and 20 texts
    from finetunekit.report.page import esc

    assert esc(worst["item"][:60]) in top.split("</tr>")[1]  # the first row after the header
    assert _section(page, "confusion").count("<svg") == 2 and "ECE before calibration" in page


@pytest.mark.slow
def test_multilabel_report_states_the_threshold_and_counts_per_label(table_runs):
    run = table_runs["multilabel"]
    page = finetunekit.report.build(run).read_text()
    _self_contained(page)
    confusion = _section(page, "confusion")
    assert "threshold <b>0.5</b>" in confusion
    rows = list(csv.DictReader((run / "val_predictions.csv").open()))
    animal_true = sum("animal" in r["label"].split(";") for r in rows)
    animal_tp = sum("animal" in r["label"].split(";") and "animal" in r["prediction"].split(";") for r in rows)
    assert animal_true == 120 and re.search(rf"<td>animal</td><td class=\"num\">{animal_tp}</td>"
                                            rf"<td class=\"num\">{animal_true - animal_tp}</td>", confusion)
    # each of the 24 top losses: its thumbnail (96 px) and its Grad-CAM overlay (finetunekit.explain, 112 px)
    assert sorted(max(im.size) for im in _images(_section(page, "top-losses"))) == [96] * 24 + [112] * 24
    assert "label probabilities" in _section(page, "calibration")


@pytest.mark.slow
def test_regression_report_plots_predictions_against_targets(table_runs):
    page = finetunekit.report.build(table_runs["regression"]).read_text()
    _self_contained(page)
    assert _section(page, "regression").count("<svg") == 2
    assert 'id="confusion"' not in page and 'id="calibration"' not in page
    # each of the 24 top losses: its thumbnail (96 px) and its Grad-CAM overlay (finetunekit.explain, 112 px)
    assert sorted(max(im.size) for im in _images(_section(page, "top-losses"))) == [96] * 24 + [112] * 24


@pytest.mark.slow
def test_detection_report_shows_per_class_ap_and_a_montage(detection_run):
    page = finetunekit.report.build(detection_run).read_text()
    _self_contained(page)
    metrics = json.loads((detection_run / "metrics.json").read_text())
    ap = metrics["val"]["per_class"]["raccoon"]["ap"]
    assert f"{ap:.4f}" in _section(page, "per-class-ap")
    montage = _images(_section(page, "montage"))
    assert len(montage) == 4 and all(max(im.size) <= 320 for im in montage)
    assert 'id="top-losses"' not in page and 'id="confusion"' not in page


# --- in a real browser -----------------------------------------------------------------------------------------

@pytest.mark.browser
@pytest.mark.parametrize("kind", ["image", "text", "multilabel", "regression", "detection"])
def test_report_renders_in_chromium_with_every_image_and_no_request(kind, request, tmp_path):
    from browser_helper import chromium, render, shrink

    if chromium() is None:
        pytest.skip("no chromium binary (looked at $CHROMIUM, /usr/bin/chromium, chromium-browser, google-chrome, PATH)")
    pytest.importorskip("playwright", reason="pip install playwright (no `playwright install`: the system's chromium)")
    run = {"image": lambda: request.getfixturevalue("image_run"), "text": lambda: request.getfixturevalue("text_run"),
           "multilabel": lambda: request.getfixturevalue("table_runs")["multilabel"],
           "regression": lambda: request.getfixturevalue("table_runs")["regression"],
           "detection": lambda: request.getfixturevalue("detection_run")}[kind]()
    page = finetunekit.report.build(run)
    shot = tmp_path / f"report-{kind}.png"
    seen = render(page, shot)
    assert seen["requests"] == []
    assert seen["images"] or kind == "text"
    assert all(w > 0 and complete for _, w, complete in seen["images"]), seen["images"]
    assert len(seen["svgs"]) >= 4 and all(w > 50 and h > 50 for w, h in seen["svgs"]), seen["svgs"]
    assert Image.open(shot).size == (1280, seen["height"])
    keep = os.environ.get("FINETUNEKIT_REPORT_SHOTS")  # a folder: the docs' screenshots (docs/report.md)
    small = shrink(shot, Path(keep) / f"report-{kind}.png" if keep else tmp_path / "small.png")
    assert small.stat().st_size < 600_000


@pytest.mark.browser
def test_the_browser_check_catches_a_request_and_a_broken_image(tmp_path):
    from browser_helper import chromium, render

    if chromium() is None:
        pytest.skip("no chromium binary")
    pytest.importorskip("playwright")
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><img src="http://127.0.0.1:9/x.png"><img src="data:image/png;base64,AAAA">'
                   '<svg width="10" height="10"></svg></body></html>')
    seen = render(bad)
    assert seen["requests"] == ["http://127.0.0.1:9/x.png"]
    assert [w for _, w, _ in seen["images"]] == [0, 0] and seen["svgs"] == [[10, 10]]
