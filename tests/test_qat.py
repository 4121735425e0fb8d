"""`--qat`: torchao fake quantization during fine-tuning (a tiny real text run, a 2-layer BERT), the int8 model
it converts to (written as safetensors, loaded back), its agreement with the fake-quantized model, and the
refusals (CNNs, detection, a bad --max-accuracy-drop)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import finetunekit
from finetunekit.addons import qat

from conftest import CIFAR, cli, save_tiny_bert, write_manifest

AGREEMENT = 0.95  # top-1 agreement of the int8 model with the fake-quantized one on the validation texts
POSITIVE = ["the movie was good and great", "really wonderful story", "a great cast and a fine plot",
            "lovely, warm and funny"]
NEGATIVE = ["a bad and boring plot", "awful film", "dull, slow and badly acted", "a terrible waste of time"]



def _write(path: Path, rows) -> Path:
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *rows])
    return path


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("qat")
    bert = save_tiny_bert(d / "bert")
    train = [(t, "positive") for t in POSITIVE] + [(t, "negative") for t in NEGATIVE]
    val = [(f"{a} {b}", lab) for lab, group in (("positive", POSITIVE), ("negative", NEGATIVE))
           for a in group for b in group]  # 32 texts the model never trained on
    run = finetunekit.fit({"task": "text-classification", "quiet": True, "out": str(d / "run"),
                           "data": {"path": str(_write(d / "train.csv", train * 10)),
                                    "val": str(_write(d / "val.csv", val))},
                           "model": {"name": f"hf:{bert}"},
                           "train": {"epochs": 2, "batch_size": 16, "lr": 3e-3, "seed": 0, "qat": True}})
    return {"run": run.run_dir, "metrics": run.metrics, "val": val, "dir": d}


def _tiny_classifier():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64, num_labels=2,
                                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


# 1. during training: fake-quantized Linear layers, the optimizer's parameters untouched, gradients through them

def test_fake_quant_modules_during_training_and_gradients_flow():
    from torchao.quantization.qat import FakeQuantizedLinear

    model = _tiny_classifier()
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    params, keys = dict(model.named_parameters()), list(model.state_dict())
    x = torch.randint(0, 100, (4, 12))
    with torch.no_grad():
        fp32 = model(input_ids=x).logits
    addon = qat.QAT(SimpleNamespace(module=model, architecture="bert"))
    assert addon.wrap_model(model) is model
    assert sum(isinstance(m, FakeQuantizedLinear) for m in model.modules()) == linears == 2 * 6 + 2
    # the same Parameter objects under the same names: an optimizer built before the swap trains them
    assert all(params[n] is p for n, p in model.named_parameters()) and len(params) == len(list(model.parameters()))
    assert list(model.state_dict()) == keys  # checkpoints and the model folder see the plain model
    model.train()
    out = model(input_ids=x, labels=torch.tensor([0, 1, 0, 1]))
    out.loss.backward()
    for name in ("bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.1.output.dense.weight",
                 "classifier.weight"):
        g = params[name].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
    model.eval()
    with torch.no_grad():
        fake = model(input_ids=x).logits
        qat.set_fake_quant(model, False)
        off = model(input_ids=x).logits
    assert torch.equal(off, fp32)  # off: exactly the fp32 model
    assert not torch.equal(fake, fp32) and (fake - fp32).abs().max() < 0.1  # on: int8 rounding, small


# 2. the run: three validation scores, the int8 file, a plain model folder

def test_qat_run_reports_int8_next_to_fp32(qat_run):
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification

    q = qat_run["metrics"]["qat"]
    assert q["file"] == qat.FILE and q["samples"] == len(qat_run["val"])
    for form in ("fp32", "fake_quant", "int8"):
        assert 0 <= q[form]["accuracy"] <= 1 and "loss" in q[form], form
    assert q["drop_points"] == pytest.approx(100 * (q["fp32"]["accuracy"] - q["int8"]["accuracy"]))
    assert q["max_drop_points"] == 1.0
    # the best epoch was chosen by the fake-quantized model: metrics' val is its score
    assert qat_run["metrics"]["val"]["accuracy"] == pytest.approx(q["fake_quant"]["accuracy"])
    assert json.loads((qat_run["run"] / "metrics.json").read_text())["qat"]["int8"] == q["int8"]

    folder = qat_run["run"] / "model"
    with safe_open(str(folder / qat.FILE), "pt") as f:
        assert f.metadata()["format"] == qat.FORMAT
        w = f.get_tensor("bert.encoder.layer.0.attention.self.query.weight.qdata")
        assert w.dtype == torch.int8 and w.shape == (32, 32)
        assert f.get_tensor("bert.encoder.layer.0.attention.self.query.weight.scale").shape == (32, 1)
        assert f.get_tensor("bert.embeddings.word_embeddings.weight").dtype == torch.float32  # not a Linear
    assert json.loads((folder / "config.json").read_text())["finetunekit"]["qat"]["file"] == qat.FILE
    # the model folder holds the plain fp32 weights: plain transformers loads it, no fake-quant keys
    AutoModelForSequenceClassification.from_pretrained(folder)


# 3. the int8 model computes what training simulated

def test_int8_model_agrees_with_the_fake_quantized_one(qat_run):
    texts = [(t,) for t, _ in qat_run["val"]]
    labels = [lab for _, lab in qat_run["val"]]
    fake = finetunekit.load(qat_run["run"])
    qat.prepare(fake.module)
    fake_logits = fake.logits(texts)
    int8 = qat.load_int8(qat_run["run"])
    from torchao.quantization import Int8Tensor

    assert isinstance(int8.module.bert.encoder.layer[0].attention.self.query.weight, Int8Tensor)
    int8_logits = int8.logits(texts)
    agreement = (fake_logits.argmax(-1) == int8_logits.argmax(-1)).float().mean().item()
    assert agreement >= AGREEMENT, agreement
    assert (fake_logits - int8_logits).abs().max() < 0.05
    # the loaded int8 model scores what the run reported
    accuracy = sum(fake.classes[i] == lab for i, lab in zip(int8_logits.argmax(-1).tolist(), labels)) / len(labels)
    assert accuracy == pytest.approx(qat_run["metrics"]["qat"]["int8"]["accuracy"])
    assert int8.predict([texts[0]])[0]["label"] in fake.classes


# 4. the warning, and the refusals

def test_warning_when_int8_drops_more_than_allowed(caplog):
    model = _tiny_classifier()
    addon = qat.QAT(SimpleNamespace(module=model, architecture="bert"), max_accuracy_drop=1.0)
    addon.wrap_model(model)
    scores = iter([{"accuracy": 0.90, "samples": 10}, {"accuracy": 0.92, "samples": 10},
                   {"accuracy": 0.88, "samples": 10}])  # fake-quantized, fp32, int8: the order finish scores them
    with caplog.at_level(logging.WARNING, logger="finetunekit"):
        out = addon.finish(lambda: model, None, lambda m: next(scores))["qat"]
    assert out["drop_points"] == pytest.approx(4.0)
    assert "4.0 points below the fp32 weights' 0.9200 (more than --max-accuracy-drop 1)" in out["warning"]
    assert "more than --max-accuracy-drop" in caplog.text


def test_qat_refuses_a_cnn(tmp_path):
    if not CIFAR.is_dir():
        pytest.skip(f"{CIFAR} not found")
    train = write_manifest(tmp_path / "train.csv", CIFAR / "train", 6, ["cat", "dog"])
    code, _, err = cli("fit", "--data", str(train), "--model", "timm:test_efficientnet", "--no-pretrained",
                       "--image-size", "32", "--epochs", "1", "--num-workers", "0", "--qat", "--quiet",
                       "--out", str(tmp_path / "run"))
    errors = [line for line in err.splitlines() if "error:" in line]  # after the run's own log lines
    assert code == 2 and len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    assert "--qat: test_efficientnet keeps" in err and "convolutions" in err and "--quantize static" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, expected", [
    (["--task", "detection", "--qat"], "--qat: does not apply to --task detection"),
    (["--qat", "--max-accuracy-drop", "-1"], "--max-accuracy-drop"),
])
def test_bad_qat_options(args, expected, tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("path,label\n")
    code, _, err = cli("fit", "--data", str(data), *args, "--out", str(tmp_path / "run"))
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err


def test_load_int8_needs_a_qat_run(qat_run, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(qat_run["run"] / "model", folder)
    (folder / qat.FILE).unlink()
    with pytest.raises(finetunekit.errors.UserError, match="written by `finetunekit fit --qat`"):
        qat.load_int8(folder)


def test_qat_without_torchao_is_a_one_line_error(tmp_path):
    """torchao is the `qat` extra: without it --qat stops before any work, naming the extra."""
    import subprocess
    import sys

    data = tmp_path / "d.csv"
    data.write_text("text,label\na,pos\nb,neg\n")
    hide = ("import sys\n"
            "sys.modules['torchao'] = None  # import torchao raises ImportError, as when it is not installed\n"
            "from finetunekit.cli import main\n"
            "sys.exit(main())\n")
    r = subprocess.run([sys.executable, "-c", hide, "fit", "--task", "text-classification", "--data", str(data),
                        "--qat", "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == ("finetunekit: error: --qat: needs torchao, which is not installed "
                                "(pip install 'finetunekit[qat]')"), r.stderr
    assert not (tmp_path / "run").exists()
