"""The defaults across datasets: `--strategy auto` against linear-probe, full and lp-ft, and the guides' plain loop.

For each dataset, every finetunekit run is `finetunekit fit` with nothing but the data (and the strategy
for the three fixed rows), in its own process with a cold feature cache, so its wall time includes
everything a user waits for (data scan, model load, feature extraction, training, validation). The
plain loop is the guides' (the one `bench_fit_vs_plain.py` times): AdamW lr 1e-4, batch 16, 8 epochs,
RandomResizedCrop + flip, validation every epoch, the best epoch's accuracy; "frozen" trains the head only.
For text the plain row is the Hugging Face Trainer's usual recipe (2 epochs, lr 5e-5, batch 32;
bench_text_vs_trainer.py's trainer side), timed end to end.

    .venv/bin/python bench/bench_defaults.py                       # every dataset: about 75 min on 2 cores
    .venv/bin/python bench/bench_defaults.py --only flowers,digits
    .venv/bin/python bench/bench_defaults.py --only sst2-800 --settings auto

Datasets (all offline): flowers (../shared/data/flowers-mini, 100 photos a class at native resolution),
raccoon-crops (the raccoon boxes of ../shared/data/raccoon against background crops of the same photos),
cifar10 (2,000 cifar10-mini training images, 500 of its test images for validation, 32 px), digits (scikit-learn's 8x8 scans, the demo's split), sst2 (full train,
dev), sst2-800 (the first 800 training sentences, 2 epochs, dev). Image datasets at low resolution run at
`--image-size` 64 on both sides (the model's 224 px would take about an hour per run here). Rows are
appended to bench/defaults.jsonl.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SETTINGS = ("auto", "linear-probe", "full", "lp-ft", "plain", "plain-frozen")


def _manifest(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows(rows)
    return path


def _folder_rows(root: Path, per_class: int | None = None) -> list[tuple[str, str]]:
    return [(str(p), d.name) for d in sorted(root.iterdir()) if d.is_dir() for p in sorted(d.iterdir())[:per_class]]


def raccoon_crops(out: Path) -> tuple[Path, Path]:
    """Each raccoon box, and one background crop of the same size from the same photo (overlapping no
    box by more than 10 % of its area), as 2-class image folders; photos split 80/20 by a seeded shuffle."""
    from PIL import Image

    rng = random.Random(0)
    photos = sorted((DATA / "raccoon" / "images").glob("*.jpg"))
    rng.shuffle(photos)
    val_photos = set(photos[: len(photos) // 5])
    rows: dict[str, list[tuple[str, str]]] = {"train": [], "val": []}
    for photo in photos:
        split = "val" if photo in val_photos else "train"
        tree = ET.parse(DATA / "raccoon" / "annotations" / f"{photo.stem}.xml")
        boxes = [[int(float(o.find("bndbox").find(k).text)) for k in ("xmin", "ymin", "xmax", "ymax")]
                 for o in tree.findall("object")]
        with Image.open(photo) as im:
            im = im.convert("RGB")
            for j, (x1, y1, x2, y2) in enumerate(boxes):
                if x2 - x1 < 16 or y2 - y1 < 16:
                    continue
                folder = out / split / "raccoon"
                folder.mkdir(parents=True, exist_ok=True)
                im.crop((x1, y1, x2, y2)).save(folder / f"{photo.stem}-{j}.jpg", quality=95)
                rows[split].append((str(folder / f"{photo.stem}-{j}.jpg"), "raccoon"))
                for scale in (1.0, 0.75, 0.5, 0.35, 0.25):  # the box's size, or smaller where the box fills the photo
                    w, h = max(16, int((x2 - x1) * scale)), max(16, int((y2 - y1) * scale))
                    spot = _background(rng, im.width, im.height, w, h, boxes)
                    if spot is not None:
                        folder = out / split / "background"
                        folder.mkdir(parents=True, exist_ok=True)
                        im.crop((spot[0], spot[1], spot[0] + w, spot[1] + h)).save(
                            folder / f"{photo.stem}-{j}.jpg", quality=95)
                        rows[split].append((str(folder / f"{photo.stem}-{j}.jpg"), "background"))
                        break
    return _manifest(out / "train.csv", rows["train"]), _manifest(out / "val.csv", rows["val"])


def _background(rng, width, height, w, h, boxes, tries=40):
    """The top-left corner of a w x h crop that overlaps the boxes by at most 10 % of its area, or None."""
    if w > width or h > height:
        return None
    for _ in range(tries):
        bx, by = rng.randint(0, width - w), rng.randint(0, height - h)
        inter = sum(max(0, min(bx + w, b[2]) - max(bx, b[0])) * max(0, min(by + h, b[3]) - max(by, b[1]))
                    for b in boxes)
        if inter <= 0.1 * w * h:
            return bx, by
    return None


def datasets(tmp: Path) -> dict[str, dict]:
    """name -> {kind, train, val, image_size (None: the model's), epochs (None: the default)}."""
    from finetunekit.demo import write_digits

    out: dict[str, dict] = {}
    flowers = DATA / "flowers-mini"
    out["flowers"] = {"kind": "image", "train": _manifest(tmp / "flowers-train.csv", _folder_rows(flowers / "train")),
                      "val": _manifest(tmp / "flowers-val.csv", _folder_rows(flowers / "val"))}
    out["raccoon-crops"] = {"kind": "image", **dict(zip(("train", "val"), raccoon_crops(tmp / "raccoon-crops")))}
    cifar = DATA / "cifar10-mini"
    out["cifar10"] = {"kind": "image", "image_size": 64,  # 200 a class of cifar10-mini's train, 50 of its test
                      "train": _manifest(tmp / "cifar-train.csv", _folder_rows(cifar / "train", 200)),
                      "val": _manifest(tmp / "cifar-val.csv", _folder_rows(cifar / "test", 50))}
    digits = write_digits(tmp / "digits")
    out["digits"] = {"kind": "image", "image_size": 64,
                     "train": _manifest(tmp / "digits-train.csv", _folder_rows(digits / "train")),
                     "val": _manifest(tmp / "digits-val.csv", _folder_rows(digits / "test"))}
    sst2 = DATA / "sst2"
    out["sst2"] = {"kind": "text", "train": sst2 / "train.tsv", "val": sst2 / "dev.tsv"}
    lines = (sst2 / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp / "sst2-800.tsv").write_text("".join(lines[:801]), encoding="utf-8")
    out["sst2-800"] = {"kind": "text", "train": tmp / "sst2-800.tsv", "val": sst2 / "dev.tsv", "epochs": 2}
    return out


def run_fit(name: str, ds: dict, setting: str, tmp: Path, extra: tuple[str, ...] = ()) -> dict:
    """`finetunekit fit` with the data only (plus the strategy and `extra`), in a child with a cold cache."""
    cmd = [str(ROOT / ".venv" / "bin" / "finetunekit"), "fit", "--data", str(ds["train"]), "--val", str(ds["val"]),
           "--out", str(tmp / f"run-{name}-{setting}{''.join(extra)}"), "--quiet"]
    if ds["kind"] == "text":
        cmd += ["--task", "text-classification", "--model", "minilm"]
    if ds.get("image_size"):
        cmd += ["--image-size", str(ds["image_size"])]
    if ds.get("epochs"):
        cmd += ["--epochs", str(ds["epochs"])]
    if setting != "auto":
        cmd += ["--strategy", setting]
    cmd += list(extra)
    env = {**os.environ, "FINETUNEKIT_CACHE": tempfile.mkdtemp(dir=tmp, prefix="cache-")}
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    run = tmp / f"run-{name}-{setting}{''.join(extra)}"
    metrics = json.loads((run / "metrics.json").read_text())
    log = (run / "log.txt").read_text()
    chosen = next((line.split("strategy auto -> ")[1].split(":")[0] for line in log.splitlines()
                   if "strategy auto -> " in line), setting)
    return {"accuracy": metrics["val"]["accuracy"], "best_epoch": metrics["best_epoch"], "wall_s": round(wall, 1),
            "strategy": chosen, "cmd": " ".join(cmd[1:])}


def plain_images(ds: dict, frozen: bool, threads: int) -> dict:
    """The guides' loop: AdamW lr 1e-4, batch 16, 8 epochs, the best validation accuracy; timed end to end."""
    import torch
    import torch.nn.functional as F

    from finetunekit.data import ImageDataset, Split, build_transform, make_loader
    from finetunekit.data.sources import read_labeled_files
    from finetunekit.models import create_backbone

    torch.set_num_threads(threads)
    started = time.perf_counter()
    train, val = read_labeled_files(ds["train"], "--data"), read_labeled_files(ds["val"], "--val")
    classes = sorted(set(train.labels))
    torch.manual_seed(0)
    backbone = create_backbone("efficientnet_lite0", len(classes))
    pre = backbone.preprocessing.with_size(ds["image_size"]) if ds.get("image_size") else backbone.preprocessing
    loaders = [make_loader(ImageDataset(Split(f.paths, [classes.index(c) for c in f.labels]),
                                        build_transform(pre, "light" if is_train else "none")),
                           16, train=is_train, workers=1, seed=0) for f, is_train in ((train, True), (val, False))]
    model = backbone.module
    if frozen:
        for n, p in model.named_parameters():
            p.requires_grad_(backbone.is_head(n))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    best = 0.0
    for epoch in range(8):
        model.train()
        if frozen:
            model.eval()  # a fixed feature extractor: BatchNorm statistics stay
        for x, y in loaders[0]:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        model.eval()
        right = seen = 0
        with torch.no_grad():
            for x, y in loaders[1]:
                right += (model(x).argmax(1) == y).sum().item()
                seen += len(y)
        best = max(best, right / seen)
    return {"accuracy": best, "wall_s": round(time.perf_counter() - started, 1), "strategy": setting_name(frozen)}


def setting_name(frozen: bool) -> str:
    return "plain loop, frozen backbone" if frozen else "plain loop, full"


def plain_text(ds: dict, threads: int) -> dict:
    """The Hugging Face Trainer's usual recipe (bench_text_vs_trainer.run_trainer), timed end to end."""
    import bench_text_vs_trainer as btt

    args = argparse.Namespace(epochs=2, batch_size=32, max_length=128, lr=5e-5, weight_decay=0.01, threads=threads)
    btt.SST2 = Path(ds["val"]).parent
    train_file = Path(ds["train"])
    if train_file.name != "train.tsv":  # the Trainer side reads SST2/train.tsv: point it at a folder holding ours
        folder = train_file.parent / f"{train_file.stem}-dir"
        folder.mkdir(exist_ok=True)
        for name, src in (("train.tsv", train_file), ("dev.tsv", Path(ds["val"]))):
            if not (folder / name).exists():
                (folder / name).symlink_to(src.resolve())
        btt.SST2 = folder
    started = time.perf_counter()
    result = btt.run_trainer(args)
    return {"accuracy": result["accuracy"], "wall_s": round(time.perf_counter() - started, 1),
            "strategy": "HF Trainer, 2 epochs, lr 5e-5"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="comma-separated datasets (default: all)")
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated of " + ", ".join(SETTINGS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--side", help=argparse.SUPPRESS)  # name:setting, run in a child process
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        name, setting = args.side.split(":")
        ds = datasets(Path(args.tmp))[name]
        if ds["kind"] == "text":
            result = plain_text(ds, args.threads)
        else:
            result = plain_images(ds, setting == "plain-frozen", args.threads)
        print("RESULT " + json.dumps(result))
        return
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        all_sets = datasets(tmp)
        names = args.only.split(",") if args.only else list(all_sets)
        for name in names:
            ds = all_sets[name]
            chosen = None
            for setting in args.settings.split(","):
                if setting == "plain-frozen" and ds["kind"] == "text":
                    continue
                if setting == chosen:  # the very run auto made (same command but the flag; bit-identical)
                    result = {**auto_row, "strategy": setting, "note": "the auto run: auto chose this"}
                elif setting.startswith("plain"):
                    out = subprocess.run([sys.executable, __file__, "--side", f"{name}:{setting}", "--tmp", str(tmp),
                                          "--threads", str(args.threads)], capture_output=True, text=True, check=True)
                    result = json.loads(next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))[7:])
                else:
                    result = run_fit(name, ds, setting, tmp)
                if setting == "auto":
                    chosen, auto_row = result["strategy"], result
                row = {"dataset": name, "setting": setting, "commit": commit, **result}
                print(json.dumps(row), flush=True)
                with (ROOT / "bench" / "defaults.jsonl").open("a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
