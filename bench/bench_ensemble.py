"""Does an ensemble pay? Three runs that differ only by --seed, each member's test accuracy against the
ensemble's (the mean of the members' calibrated probabilities: finetunekit/ensemble.py), side by side.

Images: the built-in EfficientNet-Lite0 on cifar10-mini (4,500 train images, 500 held out for validation and the
temperature; scored on the 1,000 test images), 64 px, 2 epochs, the default recipe otherwise (auto: full).
Text (skipped with --no-text): minilm on SST-2's first 3,000 training sentences (300 held out for validation and
the temperature), --max-length 64, 1 epoch; scored on the 872 dev sentences, which no run sees. (Short runs:
the machine's 2 CPU cores are shared.)

Each member is an ordinary `finetunekit fit` (fitted here unless RUNS/<name>/metrics.json exists, so runs fitted
earlier with the same command are reused); the scores come from `finetunekit.ensemble.evaluate`, the function
behind `finetunekit evaluate RUN_A RUN_B RUN_C --data D`. Rows go to bench/ensemble.jsonl.

    .venv/bin/python bench/bench_ensemble.py --runs /tmp/ftk19-init/runs     # about 4 minutes here (2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's finetunekit, also where another one is installed
DATA = ROOT.parent / "shared" / "data"
CIFAR, SST2 = DATA / "cifar10-mini", DATA / "sst2"
RESULTS = ROOT / "bench" / "ensemble.jsonl"
SEEDS = (0, 1, 2)

SETUPS = {
    "cifar10-mini": {"name": "cifar-s{seed}", "test": CIFAR / "test",
                     "fit": ["--data", str(CIFAR / "train"), "--test", str(CIFAR / "test"), "--model",
                             "efficientnet_lite0", "--image-size", "64", "--epochs", "2"]},
    "sst2": {"name": "sst2-s{seed}", "test": SST2 / "dev.tsv", "rows": 3000,
             "fit": ["--task", "text-classification", "--data", "{train}", "--test",
                     str(SST2 / "dev.tsv"), "--model", "minilm", "--max-length", "64", "--epochs", "1"]},
}


def fit(out: Path, args: list[str], seed: int) -> None:
    if (out / "metrics.json").is_file():
        print(f"reusing {out}", flush=True)
        return
    r = subprocess.run([sys.executable, "-m", "finetunekit.cli", "fit", *args, "--seed", str(seed), "--out",
                        str(out), "--quiet"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "FINETUNEKIT_REPORT": "0"})
    if r.returncode:
        sys.exit(f"fit {out.name} failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")


def machine() -> dict:
    import torch

    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "loadavg": round(os.getloadavg()[0], 2), "date": time.strftime("%Y-%m-%d %H:%M")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, default=Path("/tmp/ftk-ensemble"), help="where the member runs are")
    ap.add_argument("--no-text", action="store_true", help="skip SST-2")
    args = ap.parse_args()
    from finetunekit.ensemble import evaluate

    for dataset, setup in SETUPS.items():
        if dataset == "sst2" and args.no_text:
            continue
        runs = [args.runs / setup["name"].format(seed=s) for s in SEEDS]
        if "rows" in setup:  # SST-2: the first N training sentences (written beside the runs)
            args.runs.mkdir(parents=True, exist_ok=True)
            train = args.runs / f"sst2-train{setup['rows']}.tsv"
            lines = (SST2 / "train.tsv").read_text(encoding="utf-8").splitlines()[:setup["rows"] + 1]
            train.write_text("\n".join(lines) + "\n", encoding="utf-8")
            setup = {**setup, "fit": [str(train) if a == "{train}" else a for a in setup["fit"]]}
        for seed, run in zip(SEEDS, runs):
            fit(run, setup["fit"], seed)
        started = time.perf_counter()
        result = evaluate(runs, setup["test"], batch_size=64)
        seconds = time.perf_counter() - started
        keep = ("accuracy", "macro_f1", "nll", "ece", "temperature")
        row = {"dataset": dataset, "scored_on": str(setup["test"].relative_to(DATA)),
               "fit": " ".join(setup["fit"]), "seeds": list(SEEDS),
               "members": [{"run": r["run"], **{k: r[k] for k in keep if k in r}} for r in result["members"]],
               "ensemble": {k: result["ensemble"][k] for k in keep if k in result["ensemble"]},
               "gain": result["gain"], "evaluate_seconds": round(seconds, 1), **machine()}
        with RESULTS.open("a") as f:
            f.write(json.dumps(row) + "\n")
        accs = [m["accuracy"] for m in row["members"]]
        nlls = ", ".join(f"{m['nll']:.4f}" for m in row["members"] if "nll" in m)
        print(f"{dataset}: members {', '.join(f'{a:.4f}' for a in accs)} (mean {sum(accs) / len(accs):.4f}); "
              f"ensemble {row['ensemble']['accuracy']:.4f}: {result['gain']['vs_best_member']:+.4f} over the best, "
              f"{result['gain']['vs_mean_member']:+.4f} over the mean; NLL members {nlls}, ensemble "
              f"{row['ensemble'].get('nll', float('nan')):.4f}", flush=True)


if __name__ == "__main__":
    main()
