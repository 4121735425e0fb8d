"""The playbook table: accuracy and wall time of each strategy (and of augmentation and MixUp/CutMix), measured
on CIFAR-10 mini (EfficientNet-Lite0, 64 px) and on a 2,000-sentence subset of SST-2 (minilm), with fixed
epochs. Each run is a fresh `finetunekit fit` subprocess; results are appended to a JSON-lines file as they
finish (so a long sweep can be stopped and resumed with --skip-done), and a Markdown table is printed.

    .venv/bin/python bench/bench_strategies.py                        # everything, ~40 min on 2 CPU cores
    .venv/bin/python bench/bench_strategies.py --only images          # or: text
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"

STRATEGIES = [("linear-probe", []), ("full", []), ("freeze-unfreeze", []), ("gradual", []), ("lp-ft", []),
              ("bitfit", []), ("full + layer decay 0.75", ["--strategy", "full", "--layer-decay", "0.75"])]
IMAGE_EXTRAS = [("full + augment standard", ["--strategy", "full", "--augment", "standard"]),
                ("full + mixup 0.2 / cutmix 1.0", ["--strategy", "full", "--mixup", "0.2", "--cutmix", "1.0"])]


def runs(only: str | None) -> list[tuple[str, str, list[str]]]:
    out = []
    if only in (None, "images"):
        base = ["--data", str(DATA / "cifar10-mini"), "--model", "efficientnet_lite0", "--image-size", "64",
                "--augment", "light", "--epochs", "3", "--batch-size", "32"]
        for name, extra in STRATEGIES + IMAGE_EXTRAS:
            out.append(("cifar10-mini", name, base + (extra or ["--strategy", name])))
    if only in (None, "text"):
        base = ["--task", "text-classification", "--model", "minilm", "--max-length", "128", "--epochs", "3",
                "--batch-size", "32", "--val", str(DATA / "sst2" / "dev.tsv")]
        for name, extra in STRATEGIES:
            out.append(("sst2-2000", name, base + (extra or ["--strategy", name])))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=("images", "text"))
    p.add_argument("--results", default=str(ROOT / "bench" / "strategies.jsonl"))
    p.add_argument("--skip-done", action="store_true", help="keep results already in --results")
    args = p.parse_args()
    results = Path(args.results)
    done = set()
    if args.skip_done and results.exists():
        done = {(r["data"], r["setting"]) for r in map(json.loads, results.read_text().splitlines())}
    with tempfile.TemporaryDirectory() as tmp:
        subset = Path(tmp) / "sst2-2000.tsv"
        lines = (DATA / "sst2" / "train.tsv").read_text(encoding="utf-8").splitlines()
        subset.write_text("\n".join(lines[:2001]) + "\n", encoding="utf-8")
        for data, setting, flags in runs(args.only):
            if (data, setting) in done:
                continue
            if data == "sst2-2000":
                flags = ["--data", str(subset)] + flags
            out = Path(tmp) / "run"
            cmd = [sys.executable, "-m", "finetunekit.cli", "fit", *flags, "--out", str(out), "--overwrite", "--quiet"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                print(f"FAILED {data} {setting}: {r.stderr.strip().splitlines()[-1]}", flush=True)
                continue
            m = json.loads((out / "metrics.json").read_text())
            final = m.get("test", m["val"])
            row = {"data": data, "setting": setting, "flags": " ".join(flags[flags.index("--strategy"):] if
                                                                      "--strategy" in flags else []),
                   "split": "test" if "test" in m else "val", "accuracy": round(final["accuracy"], 4),
                   "macro_f1": round(final["macro_f1"], 4), "best_epoch": m["best_epoch"],
                   "wall_seconds": m["wall_seconds"], "train_samples_per_s": m["train_samples_per_s"]}
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{data:<13} {setting:<30} {row['split']} accuracy {row['accuracy']:.4f}  "
                  f"{row['wall_seconds']:.0f} s", flush=True)
    rows = [json.loads(x) for x in results.read_text().splitlines()] if results.exists() else []
    print("\n| data | setting | accuracy | macro-F1 | best epoch | wall |\n| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['data']} ({r['split']}) | {r['setting']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | "
              f"{r['best_epoch']} | {r['wall_seconds']:.0f} s |")
    print(f"SUMMARY {len(rows)} settings measured; best: " + ", ".join(
        f"{d}: {max((r for r in rows if r['data'] == d), key=lambda r: r['accuracy'])['setting']}"
        for d in sorted({r['data'] for r in rows})))


if __name__ == "__main__":
    main()
