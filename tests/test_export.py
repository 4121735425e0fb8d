"""`finetunekit export` and the torch-free runtime: a tiny real image run (timm's test_efficientnet, 32 px) and a
tiny real text run (a 2-layer BERT), exported to ONNX and TorchScript through the parity gate; predict through
onnxruntime against `finetunekit predict` on the run; the gate refusing a broken graph."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import finetunekit
from finetunekit.export import onnx as onnx_exporter
from finetunekit.export.parity import ParityFailed

from conftest import CIFAR, ROOT, cli, save_tiny_bert, write_manifest

CLASSES = ["cat", "dog"]



@pytest.fixture(scope="module")
def image_run(tmp_path_factory) -> dict:
    if not CIFAR.is_dir():
        pytest.skip(f"{CIFAR} not found (the shared datasets sit beside the repo)")
    d = tmp_path_factory.mktemp("img")
    train = write_manifest(d / "train.csv", CIFAR / "train", 10, CLASSES)
    run = finetunekit.fit({"quiet": True, "out": str(d / "run"),
                           "data": {"path": str(train), "image_size": 32, "augment": "none", "num_workers": 0,
                                    "tta": "flip"},
                           "model": {"name": "timm:test_efficientnet", "pretrained": False},
                           "train": {"epochs": 1, "batch_size": 4, "lr": 0.01, "seed": 0, "strategy": "full"}})
    images = sorted((CIFAR / "test" / "cat").glob("*.jpg"))[:3] + sorted((CIFAR / "test" / "dog").glob("*.jpg"))[:3]
    return {"run": run.run_dir, "images": [str(p) for p in images], "dir": d}


@pytest.fixture(scope="module")
def text_run(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("txt")
    bert = save_tiny_bert(d / "bert")
    rows = [("the movie was good and great", "positive"), ("a bad and boring plot", "negative"),
            ("really wonderful story", "positive"), ("awful film", "negative")] * 20
    with (d / "train.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *rows])
    run = finetunekit.fit({"task": "text-classification", "quiet": True, "out": str(d / "run"),
                           "data": {"path": str(d / "train.csv")}, "model": {"name": f"hf:{bert}"},
                           "train": {"epochs": 1, "batch_size": 16, "lr": 3e-3, "seed": 0}})
    return {"run": run.run_dir, "dir": d}


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _assert_gate(config: dict) -> None:
    parity = config["parity"]
    assert parity["passed"] and parity["max_abs_diff"] <= 1e-4 and parity["top1_agreement"] == 1.0, parity
    assert parity["batch_sizes"][0] == 1 and parity["batch_sizes"][1] >= 2


# 1. images: ONNX through the gate, the runtime's preprocessing and predictions equal to the run's

def test_image_onnx_export_matches_pytorch(image_run, tmp_path):
    from finetunekit.data import build_transform, load_rgb
    from finetunekit.runtime import load as load_export

    code, out, err = cli("export", str(image_run["run"]))
    assert code == 0, err
    folder = image_run["run"] / "export"
    config = _config(folder)
    assert (folder / "model.onnx").is_file() and config["format"] == "onnx"
    _assert_gate(config)
    assert config["classes"] == CLASSES and config["kind"] == "classification" and config["tta"] == "flip"
    pre = config["preprocessing"]
    assert pre["input_size"] == 32 and pre["resize"] == int(32 / pre["crop_pct"]) and pre["layout"] == "NCHW"
    assert "parity max |Δlogit|" in out

    # the runtime's Pillow + numpy preprocessing is torch's eval transform, also on a non-square image
    model = finetunekit.load(image_run["run"])
    runtime = load_export(folder / "model.onnx")
    wide = tmp_path / "wide.png"
    load_rgb(image_run["images"][0]).resize((57, 31)).save(wide)
    tf = build_transform(model.backbone.preprocessing)
    for path in [image_run["images"][0], str(wide)]:
        expected = tf(load_rgb(path)).numpy()
        assert np.abs(runtime.preprocess(load_rgb(path)) - expected).max() < 1e-6

    ours = model.predict(image_run["images"], top_k=2)
    theirs = runtime.predict(image_run["images"], top_k=2)
    assert [p["label"] for p in theirs] == [p["label"] for p in ours]
    assert [p["path"] for p in theirs] == image_run["images"]
    for a, b in zip(ours, theirs):
        assert [t["label"] for t in a["top_k"]] == [t["label"] for t in b["top_k"]]
        assert b["score"] == pytest.approx(a["score"], abs=1e-5)

    # the command line: same csv from the run and from the export
    code, from_run, err = cli("predict", str(image_run["run"]), *image_run["images"], "--format", "csv")
    assert code == 0, err
    code, from_export, err = cli("predict", str(folder / "model.onnx"), *image_run["images"], "--format", "csv")
    assert code == 0, err
    assert from_export == from_run


def test_runtime_predict_does_not_import_torch(image_run, text_run):
    """A fresh process predicting with both exports through the CLI never imports torch."""
    for run, fmt in ((image_run["run"], "onnx"), (text_run["run"], "onnx")):
        if not (run / "export").exists():
            assert cli("export", str(run), "--format", fmt)[0] == 0
    script = (
        "import io, contextlib, json, sys\n"
        "from finetunekit.cli import run\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        f"    a = run(['predict', {str(image_run['run'] / 'export')!r}, {image_run['images'][0]!r}, '--format', 'json'])\n"
        f"    b = run(['predict', {str(text_run['run'] / 'export' / 'model.onnx')!r}, '--text', 'a good film'])\n"
        "print(json.dumps({'codes': [a, b], 'torch': 'torch' in sys.modules, 'ort': 'onnxruntime' in sys.modules,\n"
        "                  'out': buf.getvalue()}))\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["codes"] == [0, 0]
    assert result["ort"] and not result["torch"], "the runtime path imported torch"
    assert '"label": "' in result["out"] and "a good film" in result["out"]


# 2. text: ONNX with dynamic batch and sequence axes, the tokenizer files beside it

def test_text_onnx_export_matches_pytorch(text_run):
    from finetunekit.runtime import load as load_export

    code, out, err = cli("export", str(text_run["run"]), "--overwrite")
    assert code == 0, err
    folder = text_run["run"] / "export"
    config = _config(folder)
    _assert_gate(config)
    assert config["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert (folder / "tokenizer.json").is_file() and config["text"]["max_length"] == 64
    texts = ["the movie was good", "awful", "a bad and boring plot " * 20, "really wonderful story and actors"]
    model = finetunekit.load(text_run["run"])
    runtime = load_export(folder)
    # the tokenizers library alone gives the ids transformers' tokenizer gives (truncated at max_length)
    from finetunekit.data.text import tokenize

    assert runtime.encode([(t,) for t in texts]) == tokenize(model.tokenizer, [(t,) for t in texts], 64)
    ours, theirs = model.predict(texts), runtime.predict(texts, batch_size=3)  # padded batches of varied length
    assert [p["label"] for p in theirs] == [p["label"] for p in ours]
    assert [p["score"] for p in theirs] == pytest.approx([p["score"] for p in ours], abs=1e-5)
    code, from_run, _ = cli("predict", str(text_run["run"]), *sum((["--text", t] for t in texts), []), "--format", "csv")
    code2, from_export, _ = cli("predict", str(folder), *sum((["--text", t] for t in texts), []), "--format", "csv")
    assert code == code2 == 0 and from_export == from_run


def test_torchscript_export(text_run, image_run, tmp_path):
    for run in (image_run["run"], text_run["run"]):
        out = tmp_path / run.parent.name
        code, _, err = cli("export", str(run), "--format", "torchscript", "--out", str(out))
        assert code == 0, err
        config = _config(out)
        _assert_gate(config)
        assert config["exporter"] == "torch.jit.trace" and (out / "model.pt").is_file()
        traced = torch.jit.load(str(out / "model.pt"))
        assert isinstance(traced, torch.jit.ScriptModule)
    code, _, err = cli("predict", str(out / "model.pt"), "--text", "x")
    assert code == 2 and "torch.jit.load" in err


# 3. the gate: a wrong graph falls back to the other exporter path, or is refused

def _shift_logits(path: Path, delta: float) -> None:
    """Rewrite an exported graph so its logits come out `delta` too high (a wrong model that still runs)."""
    import onnx
    from onnx import helper

    m = onnx.load(str(path))
    for node in m.graph.node:
        node.output[:] = ["logits_raw" if o == "logits" else o for o in node.output]
    m.graph.node.append(helper.make_node("Constant", [], ["delta"], value_float=delta))
    m.graph.node.append(helper.make_node("Add", ["logits_raw", "delta"], ["logits"]))
    onnx.save(m, str(path))


def test_gate_falls_back_then_refuses(image_run, tmp_path, monkeypatch):
    real = onnx_exporter.convert
    broken: set[bool] = set()

    def convert(*args, dynamo, **kwargs):
        real(*args, dynamo=dynamo, **kwargs)
        if dynamo in broken:
            _shift_logits(args[3], 1e-3)

    monkeypatch.setattr(onnx_exporter, "convert", convert)
    broken.add(True)  # the dynamo path ships a wrong graph: the TorchScript-based path is kept
    code, _, err = cli("export", str(image_run["run"]), "--out", str(tmp_path / "a"))
    assert code == 0, err
    config = _config(tmp_path / "a")
    assert config["exporter"] == "torch.onnx.export(dynamo=False)"
    _assert_gate(config)
    assert config["rejected_exporters"][0].startswith("dynamo: max |Δlogit| 0.001")
    assert "rejected dynamo" in err

    broken.add(False)  # both paths wrong: a one-line error, exit 1, nothing written
    code, _, err = cli("export", str(image_run["run"]), "--out", str(tmp_path / "b"))
    assert code == 1
    assert err.startswith("finetunekit: error: ONNX export: no exporter path reproduces eager PyTorch")
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.partial").exists()
    assert ParityFailed.exit_code == 1


def test_runtime_task_formats_match_the_tasks():
    """The numpy prediction formats equal the torch tasks' (multi-label, regression, classification)."""
    from finetunekit.runtime import Task
    from finetunekit.tasks import build_task

    logits = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    for name, top_k in (("image-classification", 3), ("image-multilabel", 1)):
        ours = build_task(name, ["a", "b", "c"]).predict(torch.from_numpy(logits), top_k=top_k)
        theirs = Task("multilabel" if "multi" in name else "classification", ["a", "b", "c"]).predict(logits, top_k)
        assert _close(theirs, ours), name
    ours = build_task("image-regression", []).predict(torch.from_numpy(logits[:, :1]))
    assert _close(Task("regression", []).predict(logits[:, :1]), ours)


def _close(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return abs(a - b) < 1e-6
    return a == b


# 4. bad input: one line, exit 2, before any work

@pytest.mark.parametrize("args, expected", [
    (["NOT_A_RUN"], "NOT_A_RUN: not a finetunekit run or model folder"),
    (["{run}", "--format", "xyz"], "--format xyz: expected one of onnx, torchscript"),
    (["{run}", "--format", "torchscript", "--quantize", "static"], "--quantize static: int8 quantization is for"),
    (["{run}", "--samples", "nowhere"], "--samples nowhere: no such file or folder"),
])
def test_bad_export_options(args, expected, image_run, tmp_path):
    args = [a.replace("{run}", str(image_run["run"])) for a in args]
    code, _, err = cli("export", *args, "--out", str(tmp_path / "x"))
    assert code == 2 and err.startswith(f"finetunekit: error: ") and expected in err
    assert len(err.strip().splitlines()) == 1


def test_existing_export_is_kept_without_overwrite(image_run, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = cli("export", str(image_run["run"]), "--out", str(out))
    assert code == 2 and "already exists; pass --overwrite" in err
    assert (out / "notes.txt").read_text() == "mine"


def test_detection_export_is_not_supported_yet(tmp_path):
    folder = tmp_path / "det" / "model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"finetunekit": {"task": "detection"}}))
    code, _, err = cli("export", str(tmp_path / "det"))
    assert code == 2 and "export of detection models is not supported yet" in err


# 5. int8 (ONNX Runtime): static QDQ for images, judged by validation accuracy next to fp32's

def test_int8_static_beside_fp32(image_run, tmp_path):
    from finetunekit.runtime import load as load_export

    out = tmp_path / "q"
    code, stdout, err = cli("export", str(image_run["run"]), "--quantize", "static", "--out", str(out),
                            "--max-accuracy-drop", "100")
    assert code == 0, err
    q = _config(out)["int8"]
    assert (out / "model.int8.onnx").is_file() and (out / "model.onnx").is_file()
    assert q["mode"] == "static" and q["format"] == "QDQ" and q["per_channel"]
    assert q["calibration_samples"] == 18 and q["validation_samples"] == 2  # 20 images: 18 train, 2 val
    assert set(q["accuracy"]) >= {"fp32", "int8", "drop_points"} and "warning" not in q
    assert "validation accuracy fp32" in stdout
    import onnx

    ops = {n.op_type for n in onnx.load(str(out / "model.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    preds = load_export(out / "model.int8.onnx").predict(image_run["images"])
    assert len(preds) == 6 and all(p["label"] in CLASSES for p in preds)
    code, _, err = cli("export", str(image_run["run"]), "--quantize", "dynamic", "--out", str(tmp_path / "d"))
    assert code == 2 and "--quantize dynamic: for transformer text encoders" in err


def test_int8_reads_the_train_folder_of_a_train_test_layout(tmp_path):
    """--data with train/ and test/ folders (cifar10-mini's layout): static int8 calibrates on train/ images
    only, and the validation labels are the class folders under train/, not 'train' and 'test'."""
    from finetunekit.export import int8

    if not CIFAR.is_dir():
        pytest.skip(f"{CIFAR} not found (the shared datasets sit beside the repo)")
    (tmp_path / "recipe.yaml").write_text(f"data:\n  path: {CIFAR}\n", encoding="utf-8")
    classes = sorted(p.name for p in (CIFAR / "train").iterdir() if p.is_dir())
    val = [str(p) for p in sorted((CIFAR / "train" / "dog").glob("*.jpg"))[:2]]
    calibration = int8.training_images(tmp_path, val, n=50)
    assert len(calibration) == 50 and not set(calibration) & set(val)
    assert all(Path(p).parent.parent == CIFAR / "train" for p in calibration)
    assert int8.validation_labels(tmp_path, val, classes) == [classes.index("dog")] * 2
