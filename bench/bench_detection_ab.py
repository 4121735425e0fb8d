"""The A/B of the detection options on raccoon: `recipes/raccoon-detection.yaml` (the built-in Faster R-CNN on
EfficientNet-Lite0, the seeded 160/40 split, shorter side 384) as it is, with `--hard-examples K`, and with
`--anchors auto`, each for the same number of epochs, in its own process, one after the other.

Each row: the best epoch's validation mAP@0.5 and mAP@[.5:.95] (COCO 101-point), that epoch, the anchors the
run used (from its log), and the wall time. Rows are appended to bench/detection_ab.jsonl.

    .venv/bin/python bench/bench_detection_ab.py                  # 3 runs x 6 epochs: ~40 minutes on 2 CPU cores
    .venv/bin/python bench/bench_detection_ab.py --settings default,hard-128 --epochs 4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"default": [], "hard-128": ["--hard-examples", "128"], "anchors-auto": ["--anchors", "auto"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated of " + ", ".join(SETTINGS))
    p.add_argument("--epochs", type=int, default=6)
    args = p.parse_args()
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.settings.split(","):
            out = Path(tmp) / name
            cmd = [str(ROOT / ".venv" / "bin" / "finetunekit"), "fit", "--config",
                   str(ROOT / "recipes" / "raccoon-detection.yaml"), "--data", str(ROOT.parent / "shared" / "data" /
                   "raccoon"), "--epochs", str(args.epochs), "--out", str(out), "--quiet", *SETTINGS[name]]
            started = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - started
            m = json.loads((out / "metrics.json").read_text())
            anchors = [line.strip() for line in (out / "log.txt").read_text().splitlines() if "anchors" in line]
            row = {"setting": name, "epochs": args.epochs, "commit": commit, "map50": m["val"]["map50"],
                   "map": m["val"]["map"], "best_epoch": m["best_epoch"], "wall_s": round(wall, 1),
                   "anchors_log": anchors[:2], "cmd": " ".join(cmd[1:])}
            print(json.dumps(row), flush=True)
            with (ROOT / "bench" / "detection_ab.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
