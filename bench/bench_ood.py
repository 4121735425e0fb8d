"""The out-of-distribution flag, measured: a CIFAR-10 model shown scikit-learn's digits.

    PYTHONPATH=. .venv/bin/python bench/bench_ood.py RUN [--cifar-test DIR]

RUN: a calibrated `finetunekit fit` run on cifar10-mini (docs/calibration.md gives the command). The digits
(sklearn.datasets.load_digits, 1,797 8x8 scans) are written as an image folder exactly as `finetunekit demo`
writes them (finetunekit.demo.write_digits; all of them, train and test), and the run's model scores them
and the 1,000 cifar10-mini test images (one pass each; the scores as `predict(uncertainty=True)` computes them
from the calibrated logits). For each OOD score (energy, the
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
    from finetunekit.calibration import scale
    from finetunekit.uncertainty import ood_score

    # one pass over each set; both scores from its calibrated logits, as predict(uncertainty=True) computes them
    z_digits = scale(model.logits(digits, batch_size=128).double(), model.temperature).numpy()
    z_cifar = scale(model.logits(cifar, batch_size=128).double(), model.temperature).numpy()
    for score in ("energy", "msp"):
        a, b = ood_score(z_digits, score), ood_score(z_cifar, score)
        threshold = ood["thresholds"][score]
        labels = [1] * len(a) + [0] * len(b)  # 1 = out of distribution
        auroc = roc_auc_score(labels, [-v for v in list(a) + list(b)])
        row = {"run": str(args.run), "score": score, "threshold": threshold, "tpr": ood["tpr"],
               "digits": len(a), "cifar_test": len(b), "detection_rate": float((a < threshold).mean()),
               "false_positive_rate": float((b < threshold).mean()), "auroc": float(auroc),
               "default": score == ood["score"], **env}
        print(json.dumps(row))
        with OUT.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
