"""Object detection: the VOC/COCO/YOLO readers and their lint, boxes that move with the pixels, the option
checks, and a tiny Faster R-CNN on real raccoon images through fit, the model folder, predict and evaluate."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from finetunekit.config import Recipe
from finetunekit.data.detection import layout, lint, looks_like_detection, read_annotated, resolve_detection_splits
from finetunekit.errors import UserError
from finetunekit.preflight import preflight

from conftest import torch_threads

ROOT = Path(__file__).resolve().parent.parent
RACCOON = ROOT.parent / "shared" / "data" / "raccoon"


def _voc_xml(filename: str, objects: list[tuple[str, tuple]]) -> str:
    objs = "".join(f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
                   f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b in objects)
    return f"<annotation><filename>{filename}</filename>{objs}</annotation>"


@pytest.fixture
def voc(tmp_path) -> Path:
    """A VOC folder of 64x48 images with one of each problem the lint reports."""
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    for i in range(6):
        Image.new("RGB", (64, 48), (i * 40, 0, 0)).save(tmp_path / "images" / f"{i}.jpg")
    (tmp_path / "images" / "bad.jpg").write_bytes(b"not a jpeg")
    ann = {"0": [("cat", (1, 2, 30, 40))],
           "1": [("dog", (10, 10, 20, 20)), ("cat", (30, 10, 20, 20))],  # the second is degenerate
           "2": [("cat", (-5, 0, 80, 40))],  # clipped to (0, 0, 64, 40)
           "3": [],  # a negative
           "4": [("cat", (100, 100, 120, 120))],  # entirely outside
           "5": [("dog", (0, 0, 64, 48))],
           "bad": [("cat", (1, 1, 5, 5))],
           "gone": [("cat", (1, 1, 5, 5))]}
    for name, objects in ann.items():
        (tmp_path / "annotations" / f"{name}.xml").write_text(_voc_xml(f"{name}.jpg", objects))
    return tmp_path


def test_voc_lint_counts_every_problem_and_names_the_files(voc):
    assert layout(voc) == "voc"
    items, declared = read_annotated(voc, "--data")
    assert declared is None and len(items) == 8
    counts, skipped = Counter(), []
    kept = lint(items, ["cat", "dog"], counts, skipped)
    assert dict(counts) == {"degenerate boxes (skipped)": 1, "boxes outside the image (clipped)": 1,
                            "boxes entirely outside the image (skipped)": 1, "missing images": 1,
                            "unreadable images": 1, "images without boxes (kept as negatives)": 2}
    assert sorted(Path(p).name for p, _ in skipped) == ["bad.jpg", "gone.jpg"]
    assert "missing (named by" in dict((Path(p).name, r) for p, r in skipped)["gone.jpg"]
    by_name = {Path(a.path).stem: a for a in kept}
    assert by_name["2"].boxes == [[0, 0, 64, 40]]
    assert by_name["1"].names == ["dog"] and by_name["3"].boxes == []


def test_unknown_classes_are_skipped_and_counted(voc):
    items, _ = read_annotated(voc, "--data")
    counts = Counter()
    lint(items, ["cat"], counts, [])
    assert counts["boxes of unknown classes (skipped)"] == 2


def test_split_is_seeded_and_too_many_bad_images_stop(voc):
    a = resolve_detection_splits(voc, None, None, 0.34, 3, max_bad_fraction=0.5)
    b = resolve_detection_splits(voc, None, None, 0.34, 3, max_bad_fraction=0.5)
    assert a.classes == ["cat", "dog"] and (len(a.train), len(a.val)) == (4, 2)
    assert a.train.paths == b.train.paths
    assert any(line.startswith("boxes per class (train): ") for line in a.summary)
    with pytest.raises(UserError, match=r"2 of 8 images cannot be used"):
        resolve_detection_splits(voc, None, None, 0.34, 3, max_bad_fraction=0.05)


def test_coco_and_yolo_layouts(tmp_path):
    Image.new("RGB", (100, 50)).save(tmp_path / "a.jpg")
    Image.new("RGB", (100, 50)).save(tmp_path / "b.jpg")
    coco = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 5, 20, 10]}],
            "categories": [{"id": 7, "name": "defect"}]}
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    assert layout(tmp_path / "ann.json") == "coco"
    items, classes = read_annotated(tmp_path / "ann.json", "--data")
    assert classes == ["defect"] and items[0].boxes == [[10, 5, 30, 15]] and items[1].boxes == []

    yolo = tmp_path / "yolo"
    (yolo / "images").mkdir(parents=True)
    (yolo / "labels").mkdir()
    Image.new("RGB", (100, 50)).save(yolo / "images" / "x.png")
    (yolo / "labels" / "x.txt").write_text("1 0.5 0.5 0.2 0.4\n")
    (yolo / "classes.txt").write_text("a\nb\n")
    assert layout(yolo) == "yolo"
    items, classes = read_annotated(yolo, "--data")
    assert classes == ["a", "b"] and items[0].names == ["b"]
    assert [round(v, 4) for v in items[0].boxes[0]] == [40.0, 15.0, 60.0, 35.0]


def test_a_known_box_moves_with_the_pixels():
    """A white rectangle on black: after the training transform (flip and scale jitter, per-sample seeds),
    the box is where the white pixels are."""
    from finetunekit.data.boxes import detection_transform, make_target
    from finetunekit.data.order import sample_rng
    from torchvision import tv_tensors

    image = torch.zeros(3, 60, 100, dtype=torch.uint8)
    image[:, 10:30, 5:45] = 255  # box (5, 10, 45, 30)
    tf = detection_transform("light", 120, 400)
    flipped = 0
    for seed in range(6):
        target = make_target([[5, 10, 45, 30]], [0], [False], (60, 100))
        with sample_rng(seed):
            x, t = tf(tv_tensors.Image(image), target)
        white = (x[0] > 0.5).nonzero()
        x1, y1, x2, y2 = t["boxes"][0].tolist()
        assert abs(white[:, 1].min().item() - x1) <= 1.5 and abs(white[:, 1].max().item() + 1 - x2) <= 1.5
        assert abs(white[:, 0].min().item() - y1) <= 1.5 and abs(white[:, 0].max().item() + 1 - y2) <= 1.5
        flipped += x1 > x.shape[-1] / 2
    assert 0 < flipped < 6  # both sides seen


@pytest.mark.parametrize("options, message", [
    ({"task": "image-classification", "model": {"nms_threshold": 0.3}}, "--nms-threshold: does not apply"),
    ({"task": "image-classification", "model": {"anchor_sizes": "16,32"}}, "--anchor-sizes: does not apply"),
    ({"task": "detection", "data": {"image_size": 128}}, "--image-size: does not apply to --task detection"),
    ({"task": "detection", "data": {"mixup": 0.2}}, "--mixup: does not apply"),
    ({"task": "detection", "model": {"name": "efficientnet_lite0"}}, "a classification model"),
    ({"task": "detection", "model": {"name": "torchvision:fasterrcnn_resnet51_fpn"}}, "not a supported torchvision"),
    ({"task": "detection", "model": {"anchor_sizes": "16,x"}}, "--anchor-sizes 16,x: expected"),
    ({"task": "detection", "model": {"min_size": 400, "max_size": 300}}, "--max-size 300: must be at least"),
    ({"task": "image-classification", "model": {"name": "fasterrcnn_efficientnet_lite0"}}, "a detector"),
    ({"task": "image-classification", "model": {"hard_examples": 64}}, "--hard-examples: does not apply"),
    ({"task": "image-classification", "model": {"anchors": "auto"}}, "--anchors: does not apply"),
    ({"task": "detection", "model": {"anchors": "auto", "anchor_sizes": "16,32"}}, "--anchors auto: fits the anchor"),
])
def test_options_that_do_not_fit_are_one_line(voc, options, message):
    recipe = Recipe(**{**options, "data": {"path": str(voc), **options.get("data", {})}})
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        preflight(recipe)


def test_a_detection_set_given_to_classification_says_so(voc):
    with pytest.raises(UserError, match=r"looks like a Pascal VOC detection set.*--task detection"):
        preflight(Recipe(data={"path": str(voc)}))
    assert looks_like_detection(voc / "images") is None


@pytest.fixture(scope="module")
def raccoon6(tmp_path_factory) -> Path:
    if not RACCOON.is_dir():
        pytest.skip(f"{RACCOON} not found")
    d = tmp_path_factory.mktemp("raccoon6")
    (d / "images").mkdir()
    (d / "annotations").mkdir()
    for i in range(1, 7):
        shutil.copy(RACCOON / "images" / f"raccoon-{i}.jpg", d / "images")
        shutil.copy(RACCOON / "annotations" / f"raccoon-{i}.xml", d / "annotations")
    return d


@pytest.fixture
def one_thread():
    """One intra-op thread (as the fresh process below gets), and torch's setting back for the other tests."""
    with torch_threads(1):
        yield


def test_tiny_detector_fits_saves_and_predicts_the_same_in_a_fresh_process(raccoon6, tmp_path, one_thread):
    pytest.importorskip("pycocotools")
    import finetunekit

    out = tmp_path / "run"
    result = finetunekit.fit({"task": "detection", "quiet": True, "out": str(out),
                              "data": {"path": str(raccoon6), "val_fraction": 0.34, "num_workers": 0},
                              "model": {"min_size": 96, "max_size": 160, "score_threshold": 0.0},
                              "train": {"epochs": 1, "batch_size": 2, "lr": 1e-4, "seed": 0}})
    val = result.metrics["val"]
    assert result.metrics["monitor"] == "map50" and val["samples"] == 2
    assert set(val) >= {"map50", "map", "mar", "loss", "per_class"} and val["ap_definition"].startswith("COCO")
    assert val["loss"] > 0 and 0 <= val["map50"] <= 1
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["detector"]["num_classes"] == 2 and config["detector"]["min_size"] == 96
    assert config["label_names"] == ["raccoon"]

    model = finetunekit.load(out)
    images = sorted(str(p) for p in (raccoon6 / "images").glob("*.jpg"))[:2]
    here = model.predict(images)
    assert set(here[0]) == {"path", "boxes", "labels", "scores"} and here[0]["boxes"]
    code = ("import json, sys, finetunekit; m = finetunekit.load(sys.argv[1]); "
            "print(json.dumps(m.predict(sys.argv[2:])))")
    r = subprocess.run([sys.executable, "-c", code, str(out), *images], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout) == here

    metrics = finetunekit.evaluate(out, raccoon6)
    assert metrics["samples"] == 6 and "map50" in metrics


def test_recipes_parse_and_the_hub_one_validates_its_anchors():
    from finetunekit.inputs import detector_options

    raccoon = Recipe.load(ROOT / "recipes" / "raccoon-detection.yaml")
    assert raccoon.task == "detection" and raccoon.model_name == "fasterrcnn_efficientnet_lite0"
    hub = Recipe.load(ROOT / "recipes" / "defect-detection-hub.yaml")
    options = detector_options(hub.model)
    args = options.args("fasterrcnn_resnet50_fpn_v2", 3, 800, 1333)
    assert args.anchor_sizes == ((8,), (16,), (32,), (64,), (128,)) and args.nms_threshold == 0.3
    assert args.aspect_ratios == ((0.25, 0.5, 1.0, 2.0, 4.0),) * 5


def test_plain_torchvision_rebuilds_a_saved_torchvision_detector(tmp_path):
    """A torchvision Faster R-CNN (random init: no hub here) with custom anchors: saved as a model folder,
    rebuilt with torchvision.models.get_model alone (load_native), the same detections as finetunekit.load."""
    from finetunekit.models.detection import DetectorOptions, DetectorSource
    from finetunekit.artifacts import load, save_model_folder

    torch.manual_seed(0)
    options = DetectorOptions(pretrained=False, anchor_sizes=(16, 32, 64), aspect_ratios=(0.5, 1.0),
                              min_size=64, max_size=96, score_threshold=0.0)
    backbone = DetectorSource.create("fasterrcnn_mobilenet_v3_large_320_fpn", 2, options)
    save_model_folder(tmp_path / "model", backbone, ["a", "b"], "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn",
                      "detection")
    native = DetectorSource.load_native(tmp_path / "model")
    ours = load(tmp_path / "model").module
    x = [torch.rand(3, 70, 90)]
    with torch.inference_mode():
        a, b = native(x)[0], ours(x)[0]
    assert len(a["boxes"]) > 0 and torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])


def test_anchor_kmeans_recovers_planted_sizes_and_ratios():
    import numpy as np

    from finetunekit.models import anchors

    planted = [(s / r ** 0.5, s * r ** 0.5) for s in (20, 50, 120, 300) for r in (0.5, 1.0, 2.0) for _ in range(5)]
    fit = anchors.fit(np.array(planted), levels=4)
    assert fit.sizes == (20, 50, 120, 300) and fit.ratios == (0.5, 1.0, 2.0)
    assert fit.recall == 1.0 and fit.mean_iou == pytest.approx(1.0)
    # a 100 x 50 box against one 50 x 50 anchor: IoU 0.5 (not a positive at 0.7)
    assert anchors.fitness(np.array([[100.0, 50.0]]), (50,), (1.0,)) == (0.0, pytest.approx(0.5))
    with pytest.raises(ValueError, match="needs at least 4"):
        anchors.fit(np.array([[10.0, 10.0]]), levels=4)


def test_anchors_auto_on_raccoon_fits_its_large_boxes():
    """Raccoon's boxes are large (median sqrt area ~190 px at 384 px): the built-in's 32-256 anchors cover a
    third of them at IoU 0.7; the fitted ones nearly all (exact numbers of the seeded 160/40 split)."""
    if not RACCOON.is_dir():
        pytest.skip(f"{RACCOON} not found")
    from finetunekit.models import anchors

    splits = resolve_detection_splits(RACCOON, None, None, 0.2, 0, 0.1)
    fit, line, record = anchors.choose(splits.train.boxes, splits.train.sizes, 384, 640, (32, 64, 128, 256),
                                       (0.5, 1.0, 2.0))
    assert fit.sizes == (163, 254, 320, 388) and fit.ratios == (0.69, 1.01, 1.43) and fit.boxes == 172
    assert record["fitted"]["recall_at_0.7"] == 0.9826 and record["model"]["recall_at_0.7"] == 0.3547
    assert record["used"] == "fitted" and "fitted ones used" in line


def test_hard_example_loss_is_torchvisions_when_k_covers_every_roi_and_keeps_the_hardest():
    from torchvision.models.detection.roi_heads import fastrcnn_loss

    from finetunekit.models.hard_examples import mined_loss

    torch.manual_seed(0)
    logits, regression = torch.randn(20, 3), torch.randn(20, 12)
    labels, targets = [torch.randint(0, 3, (12,)), torch.randint(0, 3, (8,))], [torch.randn(12, 4), torch.randn(8, 4)]
    full = fastrcnn_loss(logits, regression, labels, targets)
    mined = mined_loss(logits, regression, labels, targets, 12)  # every RoI: the same sums, in another order
    assert all(torch.allclose(a, b, rtol=1e-6, atol=0) for a, b in zip(mined, full)) and full[1] > 0
    # k = 1 and no box targets: each image's single hardest RoI by classification loss
    cls, box = mined_loss(logits, regression, [torch.zeros(12, dtype=torch.long), torch.zeros(8, dtype=torch.long)],
                          targets, 1)
    ce0 = torch.nn.functional.cross_entropy(logits, torch.zeros(20, dtype=torch.long), reduction="none")
    assert cls == pytest.approx(((ce0[:12].max() + ce0[12:].max()) / 2).item()) and box == 0


def test_tiny_detector_with_fitted_anchors_and_hard_examples(raccoon6, tmp_path, one_thread):
    pytest.importorskip("pycocotools")
    import finetunekit
    from finetunekit.models.hard_examples import HardExampleRoIHeads

    out = tmp_path / "run"
    result = finetunekit.fit({"task": "detection", "quiet": True, "out": str(out),
                              "data": {"path": str(raccoon6), "val_fraction": 0.34, "num_workers": 0},
                              "model": {"min_size": 96, "max_size": 160, "score_threshold": 0.0, "anchors": "auto",
                                        "hard_examples": 64},
                              "train": {"epochs": 1, "batch_size": 2, "lr": 1e-4, "seed": 0}})
    assert result.metrics["val"]["loss"] > 0
    det = json.loads((out / "model" / "config.json").read_text())["detector"]
    record = json.loads((out / "split.json").read_text())["anchors_auto"]
    assert record["used"] == "fitted" and det["hard_examples"] == 64
    assert det["anchor_sizes"] == [[s] for s in record["fitted"]["sizes"]]
    assert det["aspect_ratios"] == [record["fitted"]["aspect_ratios"]] * 4
    assert "anchors auto: k-means over" in (out / "log.txt").read_text()
    model = finetunekit.load(out)
    assert isinstance(model.module.roi_heads, HardExampleRoIHeads) and model.module.roi_heads.hard_examples == 64
    assert model.module.rpn.anchor_generator.sizes == tuple((s,) for s in record["fitted"]["sizes"])


def _detection_args(data: Path, out: Path, *extra: str) -> tuple[str, ...]:
    return ("fit", "--task", "detection", "--data", str(data), "--val-fraction", "0.34", "--no-pretrained",
            "--min-size", "64", "--max-size", "96", "--hard-examples", "64", "--epochs", "2", "--batch-size", "1",
            "--grad-accum", "2", "--ema", "0.9", "--num-workers", "0", "--checkpoint-every", "1",
            "--out", str(out), "--quiet", *extra)


def _detection_outcome(run: Path):
    import csv

    from safetensors.torch import load_file

    final = sorted((run / "checkpoints").glob("step-*"))[-1]
    history = [{k: v for k, v in row.items() if k not in ("train_samples_per_s", "epoch_seconds")}
               for row in csv.DictReader((run / "history.csv").open())]
    return load_file(str(final / "model.safetensors")), (run / "steps.csv").read_text(), history


def test_a_killed_detection_run_resumes_exactly(raccoon6, tmp_path):
    """kill -9 inside an accumulation window of the first epoch (4 training images, batch 1 x 2), resumed:
    the same final weights (EMA included), per-step losses and per-epoch mAP as an uninterrupted run (the
    RoI and RPN samplers draw from the restored random stream)."""
    pytest.importorskip("pycocotools")
    from conftest import run_cli

    reference = tmp_path / "reference"
    r = run_cli(*_detection_args(raccoon6, reference))
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "run"
    killed = run_cli(*_detection_args(raccoon6, out), env={"FINETUNEKIT_FAULT": "batch@3"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run_cli(*_detection_args(raccoon6, out, "--resume", str(out)))
    assert resumed.returncode == 0 and "resuming from" in resumed.stderr, resumed.stderr[-2000:]
    (wa, steps_a, hist_a), (wb, steps_b, hist_b) = _detection_outcome(reference), _detection_outcome(out)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), "final weights differ"
    assert steps_a == steps_b and len(steps_a.splitlines()) == 9  # a header and 2 epochs x 4 batches
    assert hist_a == hist_b and "val_map50" in hist_a[0]


def test_batch_size_auto_for_detection_aims_at_8_and_halves_when_out_of_memory(raccoon6, tmp_path):
    pytest.importorskip("pycocotools")
    import yaml

    from conftest import run_cli

    out = tmp_path / "auto"
    r = run_cli("fit", "--task", "detection", "--data", str(raccoon6), "--val-fraction", "0.34", "--no-pretrained",
                "--min-size", "64", "--max-size", "96", "--epochs", "1", "--batch-size", "auto", "--num-workers", "0",
                "--out", str(out), "--quiet", env={"FINETUNEKIT_FAULT": "probe@1:oom"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--batch-size auto: 8 does not fit" in r.stderr and "4 x --grad-accum 2 (effective batch 8)" in r.stderr
    saved = yaml.safe_load((out / "recipe.yaml").read_text())["train"]
    assert (saved["batch_size"], saved["grad_accum"]) == (4, 2)
