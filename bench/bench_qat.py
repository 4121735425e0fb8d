"""QAT against post-training quantization of the same model: minilm on SST-2, int8 every way we have.

    .venv/bin/python bench/bench_qat.py [--train-rows 2000] [--epochs 1] [--out /tmp/fk-qat]

1. fine-tune minilm (all-MiniLM-L6-v2) on the first `--train-rows` SST-2 training sentences, validate on the
   872 dev sentences: the fp32 baseline;
2. torchao PTQ of the baseline's weights (finetunekit.addons.qat.ptq: Int8DynamicActivationInt8WeightConfig,
   the scheme --qat simulates);
3. the same run with `--qat`: its int8 model (metrics.json's "qat" entry);
4. ONNX Runtime dynamic int8 (`finetunekit export --quantize dynamic`) of both runs' fp32 weights;
5. latency at batch 1 (median over the first 50 dev sentences, each run alone) of each form.

Rows go to bench/qat.jsonl (one per model form, then a summary: how much of PTQ's loss QAT recovers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
SST2 = ROOT.parent / "shared" / "data" / "sst2"
LATENCY_SAMPLES = 50


def subset(src: Path, dst: Path, rows: int | None) -> Path:
    lines = src.read_text(encoding="utf-8").splitlines()
    dst.write_text("\n".join(lines[: None if rows is None else rows + 1]) + "\n", encoding="utf-8")
    return dst


def dev_set(path: Path) -> tuple[list[tuple[str]], list[str]]:
    rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()[1:]]
    return [(s,) for s, _ in rows], [lab for _, lab in rows]


def accuracy(model, texts, labels) -> float:
    pred = model.logits(texts).argmax(-1).tolist()
    return sum(model.classes[i] == lab for i, lab in zip(pred, labels)) / len(labels)


def torch_latency_ms(model, texts) -> float:
    import torch

    times = []
    with torch.inference_mode():
        model.logits(texts[:3], batch_size=1)  # warm-up
        for t in texts[:LATENCY_SAMPLES]:
            start = time.perf_counter()
            model.logits([t], batch_size=1)
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def ort_latency_ms(folder: Path, file: str, texts) -> float:
    from finetunekit import runtime

    model = runtime.load(folder / file)
    model.predict([t[0] for t in texts[:3]])
    times = []
    for (t,) in texts[:LATENCY_SAMPLES]:
        start = time.perf_counter()
        model.predict([t])
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-rows", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("/tmp/fk-qat"))
    ap.add_argument("--jsonl", type=Path, default=ROOT / "bench" / "qat.jsonl")
    ap.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime rows")
    ap.add_argument("--reuse", action="store_true", help="reuse the two runs already in --out (their metrics.json)")
    args = ap.parse_args()

    import torch

    import finetunekit
    from finetunekit.addons import qat
    from finetunekit.export.bundle import export_run

    args.out.mkdir(parents=True, exist_ok=True)
    train = subset(SST2 / "train.tsv", args.out / "train.tsv", args.train_rows)
    dev = subset(SST2 / "dev.tsv", args.out / "dev.tsv", None)
    texts, labels = dev_set(dev)
    common = {"task": "text-classification", "quiet": True, "overwrite": True,
              "data": {"path": str(train), "val": str(dev)}, "model": {"name": "minilm"},
              "train": {"epochs": args.epochs, "seed": 0}}
    setup = {"model": "minilm", "train_rows": args.train_rows, "val_rows": len(texts), "epochs": args.epochs,
             "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or "cpu",
             "load_1min": os.getloadavg()[0]}
    rows = []

    def row(form: str, weights: str, acc: float, latency: float | None, **extra) -> None:
        r = {**setup, "form": form, "weights": weights, "val_accuracy": round(acc, 4),
             "latency_ms_b1": None if latency is None else round(latency, 2), **extra}
        rows.append(r)
        print(json.dumps(r), flush=True)

    started = time.perf_counter()
    def fit(name: str, **overrides):
        run = args.out / name
        if args.reuse and (run / "metrics.json").is_file():
            return SimpleNamespace(run_dir=run, metrics=json.loads((run / "metrics.json").read_text()))
        return finetunekit.fit(common, out=str(run), **overrides)

    base = fit("fp32")
    base_seconds = base.metrics["train_seconds"]
    m = finetunekit.load(base.run_dir)
    row("fp32 (PyTorch)", "fine-tuned", accuracy(m, texts, labels), torch_latency_ms(m, texts),
        train_seconds=base_seconds)
    qat.ptq(m.module)
    row("int8 torchao PTQ", "fine-tuned", accuracy(m, texts, labels), torch_latency_ms(m, texts))

    q = fit("qat", **{"train.qat": True})
    entry = q.metrics["qat"]
    row("fp32 (PyTorch), fake quantization off", "--qat", entry["fp32"]["accuracy"], None,
        train_seconds=q.metrics["train_seconds"])
    row("fake-quantized (PyTorch)", "--qat", entry["fake_quant"]["accuracy"], None)
    mq = qat.load_int8(q.run_dir)
    acc8 = accuracy(mq, texts, labels)
    assert abs(acc8 - entry["int8"]["accuracy"]) < 1e-6, (acc8, entry["int8"])  # the run's figure is float32
    row("int8 torchao (QAT convert)", "--qat", acc8, torch_latency_ms(mq, texts))

    if not args.no_onnx:
        for name, run in (("fine-tuned", base.run_dir), ("--qat", q.run_dir)):
            out = args.out / f"export-{name.strip('-')}"
            config = export_run(run, "onnx", out=out, overwrite=True, quantize="dynamic", max_accuracy_drop=100)
            a = config["int8"]["accuracy"]
            row("fp32 ONNX Runtime", name, a["fp32"], ort_latency_ms(out, "model.onnx", texts))
            row("int8 ONNX Runtime dynamic PTQ", name, a["int8"], ort_latency_ms(out, "model.int8.onnx", texts))

    fp32, ptq = rows[0]["val_accuracy"], rows[1]["val_accuracy"]
    qat8 = acc8
    lost = fp32 - ptq
    summary = {**setup, "form": "summary", "fp32": fp32, "ptq_int8": ptq, "qat_int8": round(qat8, 4),
               "ptq_loss_points": round(100 * lost, 2), "qat_gain_over_ptq_points": round(100 * (qat8 - ptq), 2),
               "recovered_fraction": round((qat8 - ptq) / lost, 2) if lost > 0 else None,
               "goal_met": (qat8 - ptq) >= lost / 2 if lost > 0 else None,
               "wall_seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(summary), flush=True)
    with args.jsonl.open("a", encoding="utf-8") as f:
        for r in [*rows, summary]:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
