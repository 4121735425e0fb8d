"""The linear probe's default learning rate, swept: `finetunekit fit --strategy linear-probe --lr X` with every
other option at its default, on the image datasets of bench_defaults.py and on bench_linear_probe.py's
2,500 CIFAR-10 mini images at 96 px (scored on 1,000 test images). One feature cache per dataset is shared
by its runs (the features do not depend on the lr), so this measures accuracy, not time. The lr is given per
64 samples (the default's reference batch) and scaled to each run's batch, as the default is.

    .venv/bin/python bench/sweep_probe_lr.py                         # about 10 minutes on 2 cores
    .venv/bin/python bench/sweep_probe_lr.py --lrs 1e-2,3e-3 --only flowers

Rows are appended to bench/probe_lr.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CIFAR = ROOT.parent / "shared" / "data" / "cifar10-mini"


def main() -> None:
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    sys.path.insert(0, str(ROOT / "tests"))
    from bench_defaults import datasets
    from conftest import write_manifest

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lrs", default="1e-2,5e-3,2e-3,1e-3", help="per 64 samples, comma-separated")
    p.add_argument("--only", help="comma-separated datasets (default: flowers,raccoon-crops,cifar10,digits,cifar96)")
    args = p.parse_args()
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sets = {k: v for k, v in datasets(tmp).items() if v["kind"] == "image"}
        sets["cifar96"] = {"kind": "image", "image_size": 96, "train": write_manifest(tmp / "c96-train.csv",
                           CIFAR / "train", 250), "test": write_manifest(tmp / "c96-test.csv", CIFAR / "test", 100)}
        names = args.only.split(",") if args.only else list(sets)
        for name in names:
            ds = sets[name]
            env = {**os.environ, "FINETUNEKIT_CACHE": str(tmp / f"cache-{name}")}
            for lr64 in [float(x) for x in args.lrs.split(",")]:
                out = tmp / f"run-{name}-{lr64}"
                cmd = [str(ROOT / ".venv" / "bin" / "finetunekit"), "fit", "--data", str(ds["train"]),
                       "--strategy", "linear-probe", "--out", str(out), "--quiet"]
                cmd += ["--val", str(ds["val"])] if "val" in ds else ["--test", str(ds["test"])]
                if ds.get("image_size"):
                    cmd += ["--image-size", str(ds["image_size"])]
                batch = 32  # the default --batch-size
                lr = lr64 * batch / 64
                subprocess.run(cmd + ["--lr", f"{lr:g}"], check=True, env=env, stdout=subprocess.DEVNULL)
                m = json.loads((out / "metrics.json").read_text())
                row = {"dataset": name, "lr_per_64": lr64, "lr": lr, "batch": batch, "commit": commit,
                       "val_accuracy": m["val"]["accuracy"], "best_epoch": m["best_epoch"],
                       "test_accuracy": m.get("test", {}).get("accuracy")}
                print(json.dumps(row), flush=True)
                with (ROOT / "bench" / "probe_lr.jsonl").open("a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
