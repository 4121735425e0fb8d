"""Robustness of a fine-tuned image model, measured: clean accuracy beside FGSM, PGD and the common corruptions.

    PYTHONPATH=. .venv/bin/python bench/bench_robustness.py RUN [--data DIR] [--eps 1/255,2/255,8/255]
        [--severities 1,3,5] [--limit N]

RUN: a `finetunekit fit` run; docs/robustness.md trains the one measured there (cifar10-mini, EfficientNet-Lite0,
64 px, the default recipe). The bench runs the real command line,

    finetunekit evaluate RUN --attack fgsm,pgd --eps ... --corruptions all --severities ... --output TMP.json

in a subprocess, timed (wall clock, model loading included), and appends one row to bench/robustness.jsonl:
the clean accuracy, each condition's accuracy and its ratio to clean, each condition's seconds and their ratio
to the clean pass's, the environment. No --data: the run's test set.

Then, in this process, side by side on the same images at the largest eps: PGD as evaluate runs it (a sample
that is fooled keeps that iterate and leaves the batch) against plain PGD (every sample takes all the steps,
the last iterate scored): the accuracy and the seconds of each, and the ratio (row "pgd_variants").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "robustness.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--eps", default="1/255,2/255,8/255")
    parser.add_argument("--severities", default="1,3,5")
    parser.add_argument("--limit", type=int)
    args = parser.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "robustness.json"
        command = [sys.executable, "-m", "finetunekit.cli", "evaluate", str(args.run), "--attack", "fgsm,pgd",
                   "--eps", args.eps, "--corruptions", "all", "--severities", args.severities, "--output", str(out)]
        command += ["--data", str(args.data)] if args.data else []
        command += ["--limit", str(args.limit)] if args.limit else []
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        wall = time.perf_counter() - started
        if done.returncode:
            sys.exit(f"evaluate failed ({done.returncode}): {done.stderr.strip()}")
        print(done.stdout, end="")
        report = json.loads(out.read_text(encoding="utf-8"))
    metric, clean = report["metric"], report["clean"]
    conditions = {}
    for a in report["attacks"]:
        conditions[f"{a['attack']}@{a['eps_text']}"] = a
    for c in report["corruptions"]:
        conditions[f"{c['corruption']}@{c['severity']}"] = c
    row = {"run": str(args.run), "data": report["data"], "samples": report["samples"], "metric": metric,
           "clean": clean[metric], "clean_seconds": clean["seconds"],
           "accuracy": {k: v[metric] for k, v in conditions.items()},
           "accuracy_ratio": {k: round(v[metric] / clean[metric], 4) for k, v in conditions.items()},
           "seconds": {k: v["seconds"] for k, v in conditions.items()},
           "seconds_ratio": {k: round(v["seconds"] / clean["seconds"], 2) for k, v in conditions.items()},
           "success_rate": {k: v["success_rate"] for k, v in conditions.items() if "success_rate" in v},
           "pass_seconds": report["seconds"], "wall_seconds": round(wall, 1), "pgd_steps": 10,
           "device": report["device"], "torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu": platform.processor() or "cpu", "cores": len(os.sched_getaffinity(0)), "load_1min": os.getloadavg()[0],
           "date": time.strftime("%Y-%m-%d")}
    row["pgd_variants"] = pgd_variants(args.run, Path(report["data"]), args.eps.split(",")[-1], args.limit)
    print(json.dumps(row["pgd_variants"]))
    with OUT.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    worst = min(conditions, key=lambda k: conditions[k][metric])
    print(f"SUMMARY robustness: samples={row['samples']} clean={row['clean']:.4f} "
          + " ".join(f"{k}={v:.4f}" for k, v in row["accuracy"].items() if k.startswith(("fgsm", "pgd")))
          + f" worst={worst} wall={row['wall_seconds']}s")


def pgd_variants(run: Path, data: Path, eps_text: str, limit: int | None) -> dict:
    """PGD with the first success kept (evaluate's) against plain PGD (last iterate), timed on the same batches."""
    import torch

    import finetunekit
    from finetunekit import robustness
    from finetunekit.robustness import attacks, runner

    model = finetunekit.load(run)
    eps = robustness.parse_fraction(eps_text, "--eps")
    loader, net, _ = runner.pixel_loader(model, data, robustness.Plan(limit=limit))
    net.eval().requires_grad_(False)
    batches = list(loader)
    x, y = batches[0]
    attacks.pgd(net, x, y, model.task.eval_loss, eps, range(len(x)), steps=2, keep_first_success=False)  # warm-up
    out = {"eps": eps_text, "steps": 10}
    for name, keep in (("first_success", True), ("last_iterate", False)):
        right = n = 0
        started = time.perf_counter()
        for x, y in batches:
            seeds = [n + i for i in range(len(x))]  # as evaluate seeds them with --seed 0
            adv = attacks.pgd(net, x, y, model.task.eval_loss, eps, seeds, steps=10, keep_first_success=keep)
            with torch.no_grad():
                right += int((net(adv).argmax(-1) == y).sum())
            n += len(x)
        out[name] = {"accuracy": right / n, "seconds": round(time.perf_counter() - started, 2)}
    out["seconds_ratio_last_over_first"] = round(out["last_iterate"]["seconds"] / out["first_success"]["seconds"], 2)
    return out


if __name__ == "__main__":
    main()
