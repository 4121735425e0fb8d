"""Detection training throughput: `finetunekit fit --task detection` against a plain loop written like
torchvision's `references/detection/train.py`, side by side in one process.

Same model (the built-in Faster R-CNN on EfficientNet-Lite0, top 3 backbone stages trainable), same training
images (raccoon's seeded 160-image split), same detector input size (shorter side 384, longer at most 640),
batch 4, optimizer (AdamW lr 2e-4, weight decay 1e-4: recipes/raccoon-detection.yaml's), loader workers
and threads. The reference loop is that script's `train_one_epoch`: a VOC dataset, the reference's "hflip"
preset (random horizontal flip, PIL to a float tensor; the model's transform resizes), `collate_fn =
tuple(zip(*batch))`, a linear warm-up over the first epoch, `loss = sum(model(images, targets).values())`,
zero_grad, backward, step. finetunekit runs with its default `--augment light` (flip, and a scale jitter of
0.8-1.2 around the shorter side: on average 2 % more pixels). Rounds alternate (reference, finetunekit, ...);
only the training phase is timed (finetunekit reports train-phase images/s; its validation is excluded);
the ratio is the median of the per-round ratios.

    .venv/bin/python bench/bench_detection_vs_reference.py          # about 10 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RACCOON = ROOT.parent / "shared" / "data" / "raccoon"
MIN_SIZE, MAX_SIZE, BATCH, LR, WD = 384, 640, 4, 2e-4, 1e-4


class VOCDataset(torch.utils.data.Dataset):
    """The reference's dataset shape: (image, {"boxes", "labels"}), the transform applied to both."""

    def __init__(self, paths: list[str], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image
        from torchvision import tv_tensors

        path = Path(self.paths[i])
        root = ET.parse(path.parent.parent / "annotations" / f"{path.stem}.xml").getroot()
        boxes = [[float(o.find("bndbox").find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")]
                 for o in root.findall("object")]
        image = Image.open(path).convert("RGB")
        target = {"boxes": tv_tensors.BoundingBoxes(torch.tensor(boxes).reshape(-1, 4), format="XYXY",
                                                    canvas_size=(image.height, image.width)),
                  "labels": torch.ones(len(boxes), dtype=torch.int64)}
        return self.transform(image, target)


def reference_epoch(paths: list[str], workers: int) -> float:
    """One epoch of references/detection/train.py's train_one_epoch; training images/s."""
    from torchvision.transforms import v2 as T

    from finetunekit.models.detection import BUILTIN_DETECTOR, DetectorOptions, build

    torch.manual_seed(0)
    args = DetectorOptions(min_size=MIN_SIZE, max_size=MAX_SIZE, trainable_layers=3).args(
        BUILTIN_DETECTOR, 2, MIN_SIZE, MAX_SIZE)
    model = build(args, pretrained=True)
    transform = T.Compose([T.RandomHorizontalFlip(0.5), T.PILToTensor(), T.ToDtype(torch.float, scale=True),
                           T.ToPureTensor()])  # the "hflip" DetectionPresetTrain
    loader = torch.utils.data.DataLoader(VOCDataset(paths, transform), batch_size=BATCH, shuffle=True,
                                         num_workers=workers, collate_fn=lambda batch: tuple(zip(*batch)))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WD)
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / 1000,
                                               total_iters=min(1000, len(loader) - 1))
    model.train()
    seen, start = 0, time.perf_counter()
    for images, targets in loader:
        loss_dict = model(list(images), [dict(t) for t in targets])
        losses = sum(loss for loss in loss_dict.values())
        optimizer.zero_grad()
        losses.backward()
        optimizer.step()
        warmup.step()
        seen += len(images)
    return seen / (time.perf_counter() - start)


def finetunekit_epoch(out: Path, workers: int) -> tuple[float, list[str]]:
    import json

    import finetunekit

    result = finetunekit.fit({
        "task": "detection", "quiet": True, "out": str(out),
        "data": {"path": str(RACCOON), "val_fraction": 0.2, "num_workers": workers},
        "model": {"min_size": MIN_SIZE, "max_size": MAX_SIZE, "trainable_layers": 3},
        "train": {"epochs": 1, "batch_size": BATCH, "lr": LR, "weight_decay": WD, "seed": 0}})
    return result.metrics["train_samples_per_s"], json.loads((out / "split.json").read_text())["train"]


def main() -> None:
    from finetunekit.data import default_workers

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workers", type=int, default=default_workers())
    args = p.parse_args()
    ratios, ref_rates, our_rates = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        train = None
        for i in range(args.rounds):
            if train is None:  # finetunekit's seeded split, for the reference loop too
                ours, train = finetunekit_epoch(Path(tmp) / "split", args.workers)
            ref = reference_epoch(train, args.workers)
            ours, _ = finetunekit_epoch(Path(tmp) / f"run{i}", args.workers)
            ref_rates.append(ref)
            our_rates.append(ours)
            ratios.append(ours / ref)
            print(f"round {i + 1}: reference loop {ref:.2f} img/s, finetunekit {ours:.2f} img/s, ratio "
                  f"{ours / ref:.3f}", flush=True)
    print(f"SUMMARY detection fit-vs-reference: {len(train)} images, shorter side {MIN_SIZE}, batch {BATCH}, "
          f"workers {args.workers}, threads {torch.get_num_threads()}: reference {statistics.median(ref_rates):.2f} "
          f"img/s, finetunekit {statistics.median(our_rates):.2f} img/s, ratio {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
