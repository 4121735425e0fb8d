"""Temperature scaling, measured: ECE and NLL before and after, read from finished runs, plus a held-out figure.

    PYTHONPATH=. .venv/bin/python bench/bench_calibration.py RUN [RUN...] [--dev-halves]

For each run (a `finetunekit fit` run directory with a calibrated model) one row goes to bench/calibration.jsonl:
the temperature, validation ECE/NLL before and after (the data T was fitted on), test ECE/NLL before and after
when the run had a test set, and validation/test accuracy (argmax-invariant: the same before and after).

--dev-halves (for a run whose validation set is also the set you report on, as SST-2 dev): the fair figure.
--scale X: a deliberately over-confident model, the run's validation logits times X; T fitted and scored on
validation (the fitted T is X times the run's own).

The dev logits are recomputed with the saved model, T is fitted on the even-indexed half of the validation
samples and ECE/NLL measured on the odd-indexed half (and the other way round); one more row per run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "calibration.jsonl"


def _row(run: Path) -> dict:
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    c = metrics.get("calibration")
    if not c:
        sys.exit(f"{run}: no calibration in metrics.json")
    row = {"run": str(run), "task": metrics["task"], "model": metrics["model"], "temperature": c["temperature"],
           "val_samples": c["samples"], "val_ece_before": c["ece_before"], "val_ece_after": c["ece_after"],
           "val_nll_before": c["nll_before"], "val_nll_after": c["nll_after"],
           "val_accuracy": metrics["val"].get("accuracy")}
    if "test" in c:
        t = c["test"]
        row.update(test_samples=t["samples"], test_ece_before=t["ece_before"], test_ece_after=t["ece_after"],
                   test_nll_before=t["nll_before"], test_nll_after=t["nll_after"],
                   test_accuracy=metrics["test"].get("accuracy"))
    return row


def _dev_halves(run: Path) -> dict:
    """T fitted on one half of the validation samples, ECE/NLL on the other (both ways)."""
    import csv

    import torch

    import finetunekit
    from finetunekit import calibration

    model = finetunekit.load(run)
    rows = list(csv.DictReader((run / "val_predictions.csv").open(encoding="utf-8", newline="")))
    texts = [tuple(r["item"].split(" [SEP] ")) for r in rows]
    items = texts if hasattr(model, "tokenizer") else [r["item"] for r in rows]
    logits = model.logits(items).double()
    y = torch.tensor([model.classes.index(r["label"]) for r in rows])
    out = {"run": str(run), "protocol": "T fitted on the even-indexed half of the validation samples, scored on "
                                        "the odd-indexed half, and the other way round"}
    for name, fit_on, score_on in (("even->odd", slice(0, None, 2), slice(1, None, 2)),
                                   ("odd->even", slice(1, None, 2), slice(0, None, 2))):
        t = calibration.fit("classification", logits[fit_on], y[fit_on])
        before = calibration.figures("classification", logits[score_on], y[score_on])
        after = calibration.figures("classification", logits[score_on], y[score_on], t)
        accuracy = float((logits[score_on].argmax(-1) == y[score_on]).double().mean())
        out[name] = {"temperature": t, "samples": int(len(y[score_on])), "ece_before": before["ece"],
                     "ece_after": after["ece"], "nll_before": before["nll"], "nll_after": after["nll"],
                     "accuracy": accuracy}
    return out


def _scaled(run: Path, factor: float) -> dict:
    """A deliberately over-confident version of the run's model: its validation logits times `factor`."""
    import csv

    import torch

    import finetunekit
    from finetunekit import calibration

    model = finetunekit.load(run)
    rows = list(csv.DictReader((run / "val_predictions.csv").open(encoding="utf-8", newline="")))
    items = [tuple(r["item"].split(" [SEP] ")) for r in rows] if hasattr(model, "tokenizer") else \
        [r["item"] for r in rows]
    logits = model.logits(items).double() * factor
    y = torch.tensor([model.classes.index(r["label"]) for r in rows])
    entry = calibration.calibrate("classification", logits, y)
    return {"run": str(run), "protocol": f"validation logits x{factor:g} (over-confident), T fitted and scored on "
                                         f"validation", **{k: entry[k] for k in ("temperature", "samples", "ece_before",
                                                                                "ece_after", "nll_before", "nll_after")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--dev-halves", action="store_true")
    parser.add_argument("--scale", type=float, help="also: the validation logits times this (over-confident)")
    args = parser.parse_args()
    import torch

    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or "cpu",
           "load_1min": os.getloadavg()[0]}
    with OUT.open("a", encoding="utf-8") as f:
        for run in args.runs:
            rows = [_row(run)] if not args.scale else []  # --scale: the scaled row alone
            rows += [_dev_halves(run)] if args.dev_halves else []
            rows += [_scaled(run, args.scale)] if args.scale else []
            for row in rows:
                row = {**row, **env}
                print(json.dumps(row))
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
