"""`finetunekit demo`: the main job, offline, on an embedded dataset.

Fine-tunes the built-in EfficientNet-Lite0 (real ImageNet weights) on scikit-learn's bundled handwritten
digits (1,797 real 8x8 scans), written out as an ordinary image folder so the demo runs the same path as
any user's data: train/ (a validation split is held out from it) and test/ (20 %, stratified, seeded).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .data.sources import stratified_split
from .run import fit
from .rundir import is_run

DEMO_RECIPE = {
    "description": "the demo: EfficientNet-Lite0 on scikit-learn's digits, offline",
    "model": {"name": "efficientnet_lite0"},
    "data": {"image_size": 64, "augment": "none"},
    "train": {"strategy": "full", "epochs": 6, "batch_size": 32, "lr": 2e-3, "warmup": 0.5, "seed": 0},
}


def write_digits(root: Path) -> Path:
    """The digits as PNG files in root/train/<digit>/ and root/test/<digit>/ (written once)."""
    done = root / ".complete"
    if done.exists():
        return root
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = [str(t) for t in digits.target]
    test = stratified_split(labels, 0.2, seed=0)
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # [1797, 8, 8], 0..16 -> 0..255
    for i, (img, label, is_test) in enumerate(zip(pixels, labels, test)):
        folder = root / ("test" if is_test else "train") / label
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, "L").save(folder / f"{i:04d}.png")
    done.touch()
    return root


def run_demo(out: Path, epochs: int | None = None, quiet: bool = False, verbose: bool = False):
    data = write_digits(Path("runs") / ".data" / "digits")
    replacing = is_run(out)
    if replacing:
        print(f"replacing the previous demo run in {out}")
    recipe = {**DEMO_RECIPE, "data": {**DEMO_RECIPE["data"], "path": str(data)},
              "train": {**DEMO_RECIPE["train"], **({"epochs": epochs} if epochs else {})},
              "out": str(out), "overwrite": replacing, "quiet": quiet, "verbose": verbose}
    result = fit(recipe)
    test = result.metrics["test"]
    print(f"\ndemo: test accuracy {test['accuracy']:.4f} (macro-F1 {test['macro_f1']:.4f}) on "
          f"{test['samples']} held-out digits, in {result.metrics['wall_seconds']:.0f}s")
    print(f"model:   {result.model_dir}   (finetunekit predict {out} IMAGE...)")
    print(f"metrics: {out / 'metrics.json'}")
    if (out / "report.html").is_file():
        print(f"report:  {out / 'report.html'}   (open it in a browser; finetunekit report {out} writes it again)")
    return result
