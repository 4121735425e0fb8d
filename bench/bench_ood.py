"""The out-of-distribution flag, measured: a CIFAR-10 model shown scikit-learn's digits.

    PYTHONPATH=. .venv/bin/python bench/bench_ood.py RUN [--cifar-test DIR]

RUN: a calibrated `finetunekit fit` run on cifar10-mini (docs/calibration.md gives the command). The digits
(sklearn.datasets.load_digits, 1,797 8x8 scans) are written as an image folder exactly as `finetunekit demo`
writes them (finetunekit.demo.write_digits; all of them, train and test), and the run's model predicts them
and the 1,000 cifar10-mini test images with `predict(uncertainty=True)`. For each OOD score (energy, the
default, and msp), with the threshold fitted at fit time on validation (95 % kept):
    detection rate        the fraction of digits images flagged ood (higher is better)
    false-positive rate   the fraction of cifar10-mini test images flagged ood (about 5 % if test looks like val)
    auroc                 the threshold-free separation of the two by the score (sklearn's roc_auc_score)
One row per score goes to bench/ood.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "ood.jsonl"
CIFAR_TEST = ROOT.parent / "shared" / "data" / "cifar10-mini" / "test"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--cifar-test", type=Path, default=CIFAR_TEST)
    args = parser.parse_args()
    import torch
    from sklearn.metrics import roc_auc_score

    import finetunekit
    from finetunekit.demo import write_digits
    from finetunekit.imagefiles import expand_inputs

    model = finetunekit.load(args.run)
    ood = model.calibration["ood"]
    digits_root = write_digits(Path(tempfile.gettempdir()) / "finetunekit-bench-digits")
    digits = expand_inputs(str(digits_root))
    cifar = expand_inputs(str(args.cifar_test))
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or "cpu",
           "load_1min": os.getloadavg()[0]}
    for score in ("energy", "msp"):
        a = model.predict(digits, batch_size=128, ood_score=score)
        b = model.predict(cifar, batch_size=128, ood_score=score)
        labels = [1] * len(a) + [0] * len(b)  # 1 = out of distribution
        auroc = roc_auc_score(labels, [-p["ood_score"] for p in a + b])
        row = {"run": str(args.run), "score": score, "threshold": ood["thresholds"][score], "tpr": ood["tpr"],
               "digits": len(a), "cifar_test": len(b),
               "detection_rate": sum(p["ood"] for p in a) / len(a),
               "false_positive_rate": sum(p["ood"] for p in b) / len(b), "auroc": auroc,
               "default": score == ood["score"], **env}
        print(json.dumps(row))
        with OUT.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
