"""`finetunekit fit --task seq2seq` against Hugging Face's `Seq2SeqTrainer`: training tokens/s, side by side; and
the BLEU/chrF of a small T5 before and after fine-tuning.

No pretrained seq2seq model is installable offline, so both parts use a small T5 built from a config (random init:
d_model 128, d_ff 256, 2 encoder + 2 decoder layers, 4 heads) with a word-level tokenizer trained on the SST-2
sentences (train and dev; the `tokenizers` library), on a parallel corpus built offline from real SST-2 sentences:
the target is the sentence's words in reverse order (tests/seq2seq_helper.py).

Speed (`--part speed`): both sides train the same model (same seed, same init), on the same pairs (SST-2 train
sentences of up to --max-words words), batch size, max length, lr, warmup (10 %) and linear decay, weight decay,
label smoothing 0.1, gradient clipping 1.0, precision (fp32: `--precision no`) and threads, 1 epoch. The Trainer
gets what the Hugging Face translation example uses: a pre-tokenized dataset and `DataCollatorForSeq2Seq` (dynamic
padding, labels padded with -100, decoder inputs from the model), random batches (its default); a third row runs it
with `train_sampling_strategy="group_by_length"`. finetunekit runs its defaults (length-grouped batches). Training tokens = the
non-padding source + target tokens of the training pairs; tokens/s = tokens / training seconds (the Trainer's
`train_runtime`, finetunekit's `train_seconds`: training only, validation excluded on both sides). Each side runs
in its own subprocess, alternating; each side's best round is reported (the machine is shared: a disturbed round
only runs slower), every round is in the .jsonl row.

Quality (`--part quality`): finetunekit fine-tunes the same random-init T5 for --quality-epochs epochs and scores
SST-2 dev pairs (BLEU, chrF by generation) before (the random model, `finetunekit evaluate`) and after; the copy
baseline (output = input) is printed for scale.

    .venv/bin/python bench/bench_seq2seq_vs_trainer.py --part speed     # ~10 minutes on 2 CPU cores
    .venv/bin/python bench/bench_seq2seq_vs_trainer.py --part quality   # ~10 minutes
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from seq2seq_helper import reverse, save_tiny_t5, sst2_sentences, write_pairs  # noqa: E402

OUT = ROOT / "bench" / "seq2seq.jsonl"


def material(work: Path, args) -> dict:
    """The corpus files and the model folder (built once per process, the same bytes every time: seeded)."""
    train = sst2_sentences("train", max_words=args.max_words, limit=args.pairs)
    dev = sst2_sentences("dev", max_words=args.max_words, limit=args.dev_pairs)
    every = sst2_sentences("train", max_words=10_000) + sst2_sentences("dev", max_words=10_000)
    folder = save_tiny_t5(work / "t5", every + [reverse(s) for s in every], d_model=128, layers=2, seed=0, heads=4)
    return {"train": write_pairs(work / "train.csv", train), "dev": write_pairs(work / "dev.csv", dev),
            "model": folder, "train_sentences": train, "dev_sentences": dev}


def tokens_of(folder: Path, sentences: list[str], max_length: int) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    src = tok(sentences, truncation=True, max_length=max_length)["input_ids"]
    tgt = tok(text_target=[reverse(s) for s in sentences], truncation=True, max_length=max_length)["input_ids"]
    return sum(len(x) for x in src) + sum(len(x) for x in tgt)


def run_trainer(args, grouped: bool) -> dict:
    import torch
    from transformers import (AutoModelForSeq2SeqLM, AutoTokenizer, DataCollatorForSeq2Seq, Seq2SeqTrainer,
                              Seq2SeqTrainingArguments)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as work:
        m = material(Path(work), args)
        tok = AutoTokenizer.from_pretrained(m["model"])
        src = m["train_sentences"]
        enc = tok(src, truncation=True, max_length=args.max_length)
        labels = tok(text_target=[reverse(s) for s in src], truncation=True, max_length=args.max_length)["input_ids"]
        train = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": labels[i]}
                 for i in range(len(src))]
        torch.manual_seed(0)
        model = AutoModelForSeq2SeqLM.from_pretrained(m["model"])
        targs = Seq2SeqTrainingArguments(
            output_dir=str(Path(work) / "out"), per_device_train_batch_size=args.batch_size, num_train_epochs=1,
            learning_rate=args.lr, weight_decay=0.05, warmup_steps=0.1, lr_scheduler_type="linear", max_grad_norm=1.0,
            label_smoothing_factor=0.1, logging_steps=50, save_strategy="no", eval_strategy="no", report_to=[], seed=0,
            dataloader_num_workers=0, use_cpu=True, disable_tqdm=True,
            train_sampling_strategy="group_by_length" if grouped else "random")
        trainer = Seq2SeqTrainer(model=model, args=targs, train_dataset=train,
                                 data_collator=DataCollatorForSeq2Seq(tok, model=model))
        stats = trainer.train().metrics
        tokens = tokens_of(m["model"], src, args.max_length)
    return {"tokens_per_s": tokens / stats["train_runtime"], "train_seconds": stats["train_runtime"],
            "tokens": tokens, "train_loss": stats["train_loss"]}


def _fit(m: dict, out: Path, args, epochs: int, generate_max: int, test: bool = False):
    import finetunekit

    return finetunekit.fit({
        "task": "seq2seq", "quiet": True, "out": str(out), "log_with": "none",
        "data": {"path": str(m["train"]), "val": str(m["dev"]), **({"test": str(m["dev"])} if test else {}),
                 "max_length": args.max_length},
        "model": {"name": f"hf:{m['model']}", "num_beams": args.num_beams, "max_new_tokens": args.max_length},
        "train": {"epochs": epochs, "batch_size": args.batch_size, "lr": args.lr, "weight_decay": 0.05,
                  "warmup": 0.1 * epochs, "scheduler": "linear", "label_smoothing": 0.1, "clip_grad": 1.0,
                  "precision": "no", "seed": 0, "eval_generate_max": generate_max, "calibration": False,
                  "metric": getattr(args, "metric", "auto")}})


def run_finetunekit(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as work:
        m = material(Path(work), args)
        run = _fit(m, Path(work) / "run", args, epochs=1, generate_max=0)
        tokens = tokens_of(m["model"], m["train_sentences"], args.max_length)
        history = run.metrics
    return {"tokens_per_s": tokens / history["train_seconds"], "train_seconds": history["train_seconds"],
            "tokens": tokens, "train_loss": None}


def quality(args) -> dict:
    import os

    import torch
    from sacrebleu import corpus_bleu, corpus_chrf

    from finetunekit.run import evaluate

    torch.set_num_threads(args.threads)
    os.environ.setdefault("FINETUNEKIT_REPORT", "0")
    with tempfile.TemporaryDirectory() as work:
        m = material(Path(work), args)
        refs = [reverse(s) for s in m["dev_sentences"]]
        copy = {"bleu": corpus_bleu(m["dev_sentences"], [refs]).score, "chrf": corpus_chrf(m["dev_sentences"], [refs]).score}
        # before: the random-init model as a finetunekit model folder (0 epochs is not a run: 1 epoch at lr ~0)
        before_args = argparse.Namespace(**{**vars(args), "lr": 1e-12})
        before_run = _fit(m, Path(work) / "before", before_args, epochs=1, generate_max=0)
        before = evaluate(before_run.run_dir, m["dev"], batch_size=64)
        started = time.perf_counter()
        run = _fit(m, Path(work) / "after", args, epochs=args.quality_epochs, generate_max=200)
        after = run.metrics["val"]
        history = [{k: r[k] for k in ("epoch", "train_loss", "val_loss", "val_bleu", "val_chrf")}
                   for r in __import__("csv").DictReader((run.run_dir / "history.csv").open())]
    return {"copy": copy, "before": {k: before[k] for k in ("bleu", "chrf", "rouge_l", "loss")},
            "after": {k: after[k] for k in ("bleu", "chrf", "rouge_l", "loss")}, "history": history,
            "wall_seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("speed", "quality"), default="speed")
    p.add_argument("--pairs", type=int, default=2000, help="training pairs (SST-2 train sentences)")
    p.add_argument("--dev-pairs", type=int, default=200)
    p.add_argument("--max-words", type=int, default=40)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--num-beams", type=int, default=4)
    p.add_argument("--quality-epochs", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--metric", default="auto", help="quality: the monitor that picks the best epoch")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--side", choices=("trainer", "trainer-grouped", "finetunekit"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        result = run_finetunekit(args) if args.side == "finetunekit" else run_trainer(args, args.side != "trainer")
        print("RESULT " + json.dumps(result))
        return
    setup = {k: getattr(args, k) for k in ("pairs", "dev_pairs", "max_words", "max_length", "batch_size", "lr",
                                           "threads")}
    if args.part == "quality":
        q = quality(args)
        print(json.dumps(q, indent=1))
        print(f"SUMMARY seq2seq quality (random-init T5 d128, reversal of SST-2 sentences, {args.pairs} pairs, "
              f"{args.quality_epochs} epochs, beam {args.num_beams}): dev BLEU {q['before']['bleu']:.2f} -> "
              f"{q['after']['bleu']:.2f}, chrF {q['before']['chrf']:.2f} -> {q['after']['chrf']:.2f} (copying the "
              f"source: BLEU {q['copy']['bleu']:.2f}, chrF {q['copy']['chrf']:.2f})")
        with OUT.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"part": "quality", **setup, "epochs": args.quality_epochs,
                                "num_beams": args.num_beams, **q}) + "\n")
        return
    sides = ("trainer", "finetunekit", "trainer-grouped")
    results: dict[str, list[dict]] = {s: [] for s in sides}
    for r in range(args.rounds):
        for side in (sides if r % 2 == 0 else tuple(reversed(sides))):
            child = [a for a in sys.argv[1:]] + ["--side", side]
            out = subprocess.run([sys.executable, __file__, *child], capture_output=True, text=True)
            if out.returncode:
                print(out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(out.returncode)
            line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
            results[side].append(json.loads(line[7:]))
            print(f"round {r + 1} {side:<16} {results[side][-1]['tokens_per_s']:8.0f} tokens/s  "
                  f"({results[side][-1]['train_seconds']:.1f}s)", flush=True)
    # the best round of each side: the machine is shared, and a disturbed round only ever runs slower
    mean = {s: max(x["tokens_per_s"] for x in v) for s, v in results.items()}
    ratio, grouped = mean["finetunekit"] / mean["trainer"], mean["finetunekit"] / mean["trainer-grouped"]
    print(f"SUMMARY seq2seq training (random-init T5 d128, {args.pairs} SST-2 pairs, batch {args.batch_size}, "
          f"fp32, {args.threads} threads, best of {args.rounds} rounds): finetunekit {mean['finetunekit']:.0f} vs Seq2SeqTrainer "
          f"{mean['trainer']:.0f} tokens/s, ratio {ratio:.2f}x (Seq2SeqTrainer grouped by length: "
          f"{mean['trainer-grouped']:.0f} tokens/s, ratio {grouped:.2f}x)")
    with OUT.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"part": "speed", **setup, "tokens_per_s": mean, "ratio_vs_trainer": round(ratio, 3),
                            "ratio_vs_trainer_grouped": round(grouped, 3), "runs": results}) + "\n")


if __name__ == "__main__":
    main()
