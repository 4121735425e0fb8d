"""Linear probe, 10 epochs, end to end: finetunekit (cached backbone features) against a plain PyTorch loop
with a frozen backbone (the backbone runs every epoch), on CIFAR-10 mini with the built-in
EfficientNet-Lite0 at 64 px, batch 64, no augmentation. Both use the same training images (finetunekit's
split: 4,500; the 500 it holds out for validation are left out of the plain loop), the same transform,
optimizer (AdamW lr 1e-2, weight decay 0.05 on the weight, label smoothing 0.1) and schedule (cosine per
step to 0, no warmup, no gradient clipping), the same threads and loader workers; both are scored on
the 1,000 test images. finetunekit keeps the epoch with the lowest validation loss (`--metric loss`;
with its default, validation accuracy on 500 images, this lr overfits and epoch 1 wins by chance), the
plain loop its last epoch. finetunekit runs twice: with an empty feature cache (it computes the features) and again (a second run
reads them: another head lr, say). Times are from process start to the test accuracy.

    .venv/bin/python bench/bench_linear_probe.py     # ~5 minutes on 2 CPU cores

`--defaults` measures what a user gets with no option but the strategy: `finetunekit fit --data D
--strategy linear-probe --image-size 96` on 2,500 CIFAR-10 mini images (250 a class; every other option at
its default, augmentation included) against the guides' frozen-backbone loop with the same light
augmentation (random resized crop + flip), 10 epochs, batch 32, AdamW lr 1e-3, on the same training images.

    .venv/bin/python bench/bench_linear_probe.py --defaults     # ~5 minutes on 2 CPU cores
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CIFAR = ROOT.parent / "shared" / "data" / "cifar10-mini"
EPOCHS, BATCH, SIZE, LR = 10, 64, 64, 1e-2


def finetunekit_run(out: Path, env: dict) -> tuple[float, float]:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "finetunekit.cli", "fit", "--data", str(CIFAR), "--image-size", str(SIZE),
                    "--augment", "none", "--strategy", "linear-probe", "--epochs", str(EPOCHS), "--batch-size",
                    str(BATCH), "--lr", str(LR), "--warmup", "0", "--min-lr-ratio", "0", "--clip-grad", "none",
                    "--metric", "loss", "--out", str(out), "--quiet"],
                   check=True, env=env,
                   capture_output=True)
    wall = time.perf_counter() - start
    return wall, json.loads((out / "metrics.json").read_text())["test"]["accuracy"]


PLAIN = r'''
import json, sys, time
start = time.perf_counter()
import torch, torch.nn.functional as F
from finetunekit.data import ImageDataset, Split, build_transform, make_loader
from finetunekit.data.sources import read_labeled_files
from finetunekit.models import create_backbone
cifar, split_json, epochs, batch, size, lr = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
augment, train_spec, test_spec = sys.argv[7], sys.argv[8], sys.argv[9]
held_out = set(json.load(open(split_json))["val"]["files"])
train = read_labeled_files(__import__("pathlib").Path(train_spec), "--data")
test = read_labeled_files(__import__("pathlib").Path(test_spec), "--data")
classes = sorted(set(train.labels))
keep = [(p, c) for p, c in zip(train.paths, train.labels) if p not in held_out]
torch.manual_seed(0)
backbone = create_backbone("efficientnet_lite0", len(classes))
pre = backbone.preprocessing.with_size(size)
tf = build_transform(pre, "none")
loader = make_loader(ImageDataset(Split([p for p, _ in keep], [classes.index(c) for _, c in keep]), build_transform(pre, augment)), batch,
                     train=True, workers=1, seed=0)
model = backbone.module
for p in model.parameters():
    p.requires_grad_(False)
head = model.get_submodule(backbone.heads[0])
for p in head.parameters():
    p.requires_grad_(True)
opt = torch.optim.AdamW([{"params": [head.weight], "weight_decay": 0.05}, {"params": [head.bias], "weight_decay": 0.0}], lr=lr)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(loader))
model.eval()  # a frozen backbone: fixed BatchNorm statistics
for epoch in range(epochs):
    for x, y in loader:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y, label_smoothing=0.1).backward()
        opt.step()
        sched.step()
correct = 0
with torch.inference_mode():
    for x, y in make_loader(ImageDataset(Split(test.paths, [classes.index(c) for c in test.labels]), tf), 128, train=False, workers=1, seed=0):
        correct += (model(x).argmax(1) == y).sum().item()
print(json.dumps({"wall": time.perf_counter() - start, "accuracy": correct / len(test.paths)}))
'''


def defaults() -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import write_manifest

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "FINETUNEKIT_CACHE": str(tmp / "cache")}
        train = write_manifest(tmp / "train.csv", CIFAR / "train", 250)
        test = write_manifest(tmp / "test.csv", CIFAR / "test", 100)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "finetunekit.cli", "fit", "--data", str(train), "--test", str(test),
                        "--strategy", "linear-probe", "--image-size", "96", "--out", str(tmp / "run"), "--quiet"],
                       check=True, env=env, capture_output=True)
        ours = time.perf_counter() - start
        acc = json.loads((tmp / "run" / "metrics.json").read_text())["test"]["accuracy"]
        start = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", PLAIN, str(CIFAR), str(tmp / "run" / "split.json"), "10", "32", "96",
                            "1e-3", "light", str(train), str(test)], check=True, capture_output=True, text=True, env=env)
        plain_wall = time.perf_counter() - start
        plain = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"plain loop (frozen backbone, light augmentation, every epoch): {plain_wall:.1f} s, test accuracy "
          f"{plain['accuracy']:.4f}")
    print(f"finetunekit fit --strategy linear-probe, defaults: {ours:.1f} s, test accuracy {acc:.4f}")
    print(f"SUMMARY linear probe with defaults, 2,500 images at 96 px, 10 epochs, end to end: finetunekit "
          f"{plain_wall / ours:.2f}x faster; test accuracy {acc:.4f} vs {plain['accuracy']:.4f}")


def main() -> None:
    if "--defaults" in sys.argv[1:]:
        return defaults()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "FINETUNEKIT_CACHE": str(tmp / "cache")}
        cold, acc_cold = finetunekit_run(tmp / "cold", env)
        warm, acc_warm = finetunekit_run(tmp / "warm", env)
        start = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", PLAIN, str(CIFAR), str(tmp / "cold" / "split.json"), str(EPOCHS),
                            str(BATCH), str(SIZE), str(LR), "none", str(CIFAR / "train"), str(CIFAR / "test")],
                           check=True, capture_output=True, text=True, env=env)
        plain_wall = time.perf_counter() - start
        plain = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"plain loop (frozen backbone every epoch): {plain_wall:.1f} s, test accuracy {plain['accuracy']:.4f}")
    print(f"finetunekit, features computed:           {cold:.1f} s, test accuracy {acc_cold:.4f}")
    print(f"finetunekit, features from the cache:     {warm:.1f} s, test accuracy {acc_warm:.4f}")
    print(f"SUMMARY linear probe {EPOCHS} epochs end to end (process start to test accuracy): finetunekit "
          f"{plain_wall / cold:.2f}x faster than the plain loop with a cold cache, {plain_wall / warm:.2f}x with a "
          f"warm one; test accuracy {acc_cold:.4f} vs {plain['accuracy']:.4f} "
          f"({100 * (acc_cold - plain['accuracy']):+.1f} points)")


if __name__ == "__main__":
    main()
