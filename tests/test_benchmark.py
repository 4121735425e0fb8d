"""`finetunekit benchmark`: a tiny real image run (timm's test_efficientnet, 32 px) measured as eager PyTorch,
ONNX fp32 and ONNX int8 (the exports written by the command itself), each in its own process; the JSON's
figures and files; the one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import finetunekit
from finetunekit import benchmark as B

from conftest import CIFAR, write_manifest
from test_export import cli

CLASSES = ["cat", "dog"]
FAST = ("--runs", "3", "--warmup", "1", "--threads", "1", "--batch", "4")


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    if not CIFAR.is_dir():
        pytest.skip(f"{CIFAR} not found (the shared datasets sit beside the repo)")
    d = tmp_path_factory.mktemp("bench")
    train = write_manifest(d / "train.csv", CIFAR / "train", 12, CLASSES)
    run = finetunekit.fit({"quiet": True, "out": str(d / "run"),
                           "data": {"path": str(train), "image_size": 32, "augment": "none", "num_workers": 0,
                                    "val_fraction": 0.25},
                           "model": {"name": "timm:test_efficientnet", "pretrained": False},
                           "train": {"epochs": 1, "batch_size": 4, "lr": 0.01, "seed": 0, "strategy": "full"}})
    code, out, err = cli("benchmark", str(run.run_dir), "--variants", "eager-fp32,onnx-fp32,onnx-int8", *FAST)
    assert code == 0, err
    return {"run": run.run_dir, "dir": d, "out": out, "err": err,
            "json": json.loads((run.run_dir / "benchmark.json").read_text())}


def test_benchmark_json_and_table(measured):
    result, run = measured["json"], measured["run"]
    assert "exporting onnx with int8 (static)" in measured["err"]  # no export yet: written through `export`
    assert (run / "export" / "model.int8.onnx").is_file()
    m = result["machine"]
    assert m["cpu"] and m["logical_cores"] >= 1 and m["torch"] and m["onnxruntime"]
    assert set(m["flags"]) >= {"avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16"}
    s = result["settings"]
    assert (s["threads"], s["batch"], s["runs"], s["warmup"], s["provider"]) == (1, 4, 3, 1, "cpu")
    assert s["samples"] >= 4 and s["labelled"] and s["pinned_cpus"] == [B.usable_cpus()[0]]
    variants = {v["variant"]: v for v in result["variants"]}
    assert list(variants) == ["eager-fp32", "onnx-fp32", "onnx-int8"]
    for v in variants.values():
        lat = v["latency_ms"]
        assert 0 < lat["p50"] <= lat["p95"] and lat["calls"] == 3
        assert v["throughput"]["samples_per_s"] > 0 and v["throughput"]["batch"] == 4
        assert v["peak_rss_mb"] > 0 and v["preprocess_ms"]["mean"] > 0 and v["load_s"] > 0
        assert v["samples"] == s["samples"]
        assert v["file_bytes"] == Path(v["file"]).stat().st_size  # the weights file, or the .onnx
    assert Path(variants["eager-fp32"]["file"]).name == "model.safetensors"
    assert Path(variants["onnx-fp32"]["file"]).name == "model.onnx"
    assert Path(variants["onnx-int8"]["file"]).name == "model.int8.onnx"
    # the exported graph reproduces eager PyTorch on the validation split: same accuracy, every argmax agrees
    assert variants["onnx-fp32"]["accuracy"] == variants["eager-fp32"]["accuracy"]
    assert variants["onnx-fp32"]["agreement"] == 1.0 and variants["onnx-fp32"]["max_abs_diff"] <= 1e-4
    assert variants["eager-fp32"]["agreement"] == 1.0 and variants["eager-fp32"]["max_abs_diff"] == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert variants["eager-fp32"]["accuracy"] == pytest.approx(metrics["val"]["accuracy"], abs=1e-6)
    assert 0 <= variants["onnx-int8"]["accuracy"] <= 1 and 0 <= variants["onnx-int8"]["agreement"] <= 1
    # the ONNX variants run as a server with the runtime extra would: no torch in their process
    assert not variants["onnx-fp32"]["torch_imported"] and variants["eager-fp32"]["torch_imported"]
    assert variants["onnx-fp32"]["providers"] == ["CPUExecutionProvider"]
    out = measured["out"]
    assert out.startswith("machine: ") and "amx_bf16" in out and "eager-fp32" in out and "onnx-int8" in out
    assert f"written: {run / 'benchmark.json'}" in out


def test_benchmark_data_option_and_no_overwrite(measured):
    """--data: another labelled set; an existing benchmark.json is kept and the next is benchmark-2.json."""
    test = write_manifest(measured["dir"] / "test.csv", CIFAR / "test", 3, CLASSES)
    code, out, err = cli("benchmark", str(measured["run"]), "--variants", "onnx-fp32", "--data", str(test), *FAST)
    assert code == 0, err
    second = json.loads((measured["run"] / "benchmark-2.json").read_text())
    assert second["settings"]["samples"] == 6 and second["settings"]["data"] == str(test)
    assert [v["variant"] for v in second["variants"]] == ["onnx-fp32"]
    assert second["variants"][0]["agreement"] is None  # no eager-fp32 to compare with
    assert json.loads((measured["run"] / "benchmark.json").read_text()) == measured["json"]


@pytest.mark.parametrize("args, message", [
    (("--variants", "onnx-fp16"), "--variants onnx-fp16: expected some of eager-fp32"),
    (("--threads", "0"), "--threads 0: expected a value >= 1"),
    (("--runs", "0"), "--runs 0: expected a value >= 1"),
    (("--provider", "cuda"), "--provider cuda: CUDAExecutionProvider is not in this onnxruntime"),
    (("--provider", "gpu"), "--provider gpu: expected one of cpu, cuda, tensorrt"),
    (("--data", "/nonexistent/val"), "--data /nonexistent/val: no such file or folder"),
])
def test_benchmark_errors(measured, args, message):
    if args[:2] == ("--provider", "cuda"):
        import onnxruntime

        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            pytest.skip("this onnxruntime has CUDA")
    code, out, err = cli("benchmark", str(measured["run"]), *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_benchmark_refuses_before_loading(tmp_path, measured, monkeypatch):
    code, _, err = cli("benchmark", str(tmp_path))
    assert code == 2 and "not a finetunekit run directory" in err
    monkeypatch.setattr(B, "_bf16_flag", lambda: None)  # a CPU without AVX512-BF16 or AMX
    code, _, err = cli("benchmark", str(measured["run"]), "--variants", "eager-bf16")
    assert code == 2 and "bf16 would be emulated" in err
    assert [v for v in B.check(measured["run"]).variants] == ["eager-fp32", "onnx-fp32", "onnx-int8"]
    code, _, err = cli("benchmark", str(measured["run"]), "--variants", "torchao-int8")  # a CNN
    assert code == 2 and "in convolutions and torchao's int8 here quantizes Linear layers" in err


def test_benchmark_text_run(tmp_path):
    """A tiny BERT run: tokenization as the preprocessing, dynamic int8 written through `export`, the
    validation texts made again from recipe.yaml."""
    import csv

    from conftest import save_tiny_bert

    bert = save_tiny_bert(tmp_path / "bert")
    rows = [("the movie was good and great", "positive"), ("a bad and boring plot", "negative"),
            ("really wonderful story", "positive"), ("awful film", "negative")] * 10
    with (tmp_path / "train.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *rows])
    run = finetunekit.fit({"task": "text-classification", "quiet": True, "out": str(tmp_path / "run"),
                           "data": {"path": str(tmp_path / "train.csv")}, "model": {"name": f"hf:{bert}"},
                           "train": {"epochs": 1, "batch_size": 16, "lr": 3e-3, "seed": 0}})
    code, out, err = cli("benchmark", str(run.run_dir), "--variants", "eager-fp32,onnx-fp32,onnx-int8,torchao-int8",
                         *FAST)
    assert code == 0, err
    assert "exporting onnx with int8 (dynamic)" in err
    result = json.loads((run.run_dir / "benchmark.json").read_text())
    variants = {v["variant"]: v for v in result["variants"]}
    assert result["settings"]["samples"] >= 2 and result["settings"]["labelled"]
    assert variants["onnx-fp32"]["agreement"] == 1.0
    assert variants["onnx-fp32"]["accuracy"] == variants["eager-fp32"]["accuracy"]
    assert not variants["onnx-int8"]["torch_imported"] and variants["onnx-int8"]["preprocess_ms"]["mean"] > 0
    ao = variants["torchao-int8"]  # no --qat: post-training quantization of the fp32 weights
    assert ao["int8"] == "post-training quantization of the fp32 weights" and ao["engine"].endswith("torchao int8")
    assert ao["agreement"] is not None and ao["accuracy"] is not None
