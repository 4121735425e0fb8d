"""How close two processes (batch B each) come to one process with the global batch 2B, against the noise floor
of one process run with 1 and with 2 threads (the same arithmetic in another reduction order).

    PYTHONPATH=. python bench/ddp_parity.py [--strategies full,freeze-unfreeze,lp-ft,gradual] [--out DIR]

The data is tests/test_distributed.py's: 64 CIFAR-10-mini training images, 21 validation images, timm's tiny
test ViT at 32 px, 2 epochs (gradual: 3). Prints one JSON line per strategy and appends it to
bench/ddp_parity.jsonl: the largest |difference| of any final parameter between the runs.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import CIFAR, write_manifest  # noqa: E402

EXTRA = {"full": [], "freeze-unfreeze": [], "lp-ft": ["--head-epochs", "1"],
         "gradual": ["--epochs", "3", "--unfreeze-every", "1"]}


def data(d: Path) -> tuple[Path, Path]:
    out = []
    for name, split, per_class, rows in (("train", "train", 7, 64), ("val", "test", 3, 21)):
        lines = write_manifest(d / f"{name}-all.csv", CIFAR / split, per_class).read_text().splitlines()
        (d / f"{name}.csv").write_text("\n".join(lines[:rows + 1]) + "\n")
        out.append(d / f"{name}.csv")
    return out[0], out[1]


def final(run: Path):
    return load_file(sorted(glob.glob(str(run / "checkpoints" / "step-*")))[-1] + "/model.safetensors")


def diff(a, b) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategies", default="full,freeze-unfreeze,lp-ft,gradual")
    ap.add_argument("--lr", default="1e-3")
    ap.add_argument("--extra", default="", help="more fit options, space-separated")
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="ddp-parity-")))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train, val = data(args.out)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FINETUNEKIT_CPU_BF16": "0", "PYTHONUNBUFFERED": "1"}
    for strategy in args.strategies.split(","):
        def fit(out: Path, batch: int, launcher: list[str], threads: int) -> None:
            cmd = [sys.executable, "-m", *launcher, "finetunekit.cli", "fit", "--data", str(train), "--val", str(val),
                   "--model", "timm:test_vit", "--no-pretrained", "--image-size", "32", "--epochs", "2",
                   "--batch-size", str(batch), "--lr", args.lr, "--num-workers", "0", "--cache-features", "off",
                   "--cpu", "--quiet", "--strategy", strategy, *EXTRA.get(strategy, []), *args.extra.split(), "--out", str(out)]
            subprocess.run(cmd, check=True, env={**env, "OMP_NUM_THREADS": str(threads)}, capture_output=True)

        base = args.out / strategy
        fit(base / "two", 8, ["torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"], 1)
        fit(base / "one-1t", 16, [], 1)
        fit(base / "one-2t", 16, [], 2)
        two, one1, one2 = (final(base / n) for n in ("two", "one-1t", "one-2t"))
        opt = args.extra.split("--optimizer")[1].split()[0] if "--optimizer" in args.extra else "adamw"
        row = {"strategy": strategy, "lr": args.lr, "optimizer": opt, "two_vs_one_1thread": diff(two, one1), "two_vs_one_2threads": diff(two, one2),
               "one_1thread_vs_2threads": diff(one1, one2),
               "in_step": json.loads((base / "two" / "metrics.json").read_text())["processes"]}
        print(json.dumps(row))
        with (ROOT / "bench" / "ddp_parity.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
