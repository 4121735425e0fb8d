"""Seconds per explanation on this machine: Grad-CAM (and variants) per image with EfficientNet-Lite0 at 224 px,
integrated gradients per sentence with MiniLM (all-MiniLM-L6-v2), as `finetunekit explain` computes them.

Each figure is the median over the inputs after one untimed warm-up input; the first call's extra cost (the
target-layer probe, one forward and backward) is printed apart. Without --image-run / --text-run the
models are the built-in backbones with ImageNet / MiniLM weights and a fresh head (5 / 2 classes): the
cost does not depend on the head's training.

    .venv/bin/python bench/bench_explain.py                             # ~2 minutes on 2 CPU cores
    .venv/bin/python bench/bench_explain.py --methods gradcam --images 10 --sentences 0
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"


def _image_model(run: str | None):
    import finetunekit
    from finetunekit.inference import ImageModel
    from finetunekit.models import create_backbone
    from finetunekit.tasks import build_task

    if run:
        return finetunekit.load(run)
    classes = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]
    backbone = create_backbone("efficientnet_lite0", len(classes))
    backbone.module.eval()
    return ImageModel(backbone, build_task("image-classification", classes), Path("."))


def _text_model(run: str | None):
    import finetunekit
    from finetunekit.inference import TextModel
    from finetunekit.models import create_text_backbone
    from finetunekit.tasks import build_task

    if run:
        return finetunekit.load(run)
    classes = ["negative", "positive"]
    backbone = create_text_backbone("minilm", classes, "classification")
    return TextModel(backbone, build_task("text-classification", classes), Path("."), {"max_length": 128},
                     "text-classification")


def _timed(fn, items) -> tuple[float, list[float]]:
    start = time.perf_counter()
    fn(items[0])
    first = time.perf_counter() - start
    times = []
    for item in items[1:]:
        start = time.perf_counter()
        fn(item)
        times.append(time.perf_counter() - start)
    return first, times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="gradcam,gradcam++,eigencam,scorecam")
    p.add_argument("--images", type=int, default=11, help="flowers-mini val photos (the first is the warm-up)")
    p.add_argument("--sentences", type=int, default=11, help="SST-2 dev sentences (the first is the warm-up)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--image-run")
    p.add_argument("--text-run")
    args = p.parse_args()
    from finetunekit.explain import cam, tokens

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.images:
        model = _image_model(args.image_run)
        photos = sorted((DATA / "flowers-mini" / "val").glob("*/*.jpg"))[::40][:args.images]
        start = time.perf_counter()
        layer = cam.target_layer(model)
        print(f"target layer {layer.name} {list(layer.shape)}: found in {time.perf_counter() - start:.2f} s")
        for method in args.methods.split(","):
            first, times = _timed(lambda path: cam.explain(model, path, method), photos)
            print(f"{method}: {statistics.median(times):.3f} s per image (median of {len(times)}; first "
                  f"{first:.2f} s), {model.backbone.architecture} at {model.backbone.preprocessing.input_size} px")
    if args.sentences:
        model = _text_model(args.text_run)
        lines = (DATA / "sst2" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
        sentences = [line.split("\t")[0] for line in lines[:args.sentences]]
        lengths = [len(model.tokenizer(s)["input_ids"]) for s in sentences[1:]]
        first, times = _timed(lambda s: tokens.attribute(model, s, steps=args.steps), sentences)
        print(f"integrated-gradients: {statistics.median(times):.3f} s per sentence (median of {len(times)}; first "
              f"{first:.2f} s), {args.steps} steps, {statistics.median(lengths):.0f} tokens (median, with "
              f"[CLS]/[SEP]), MiniLM-L6")


if __name__ == "__main__":
    main()
