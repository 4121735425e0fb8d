"""int8 with ONNX Runtime, beside the fp32 model.onnx (which passed the parity gate):

    static    image models: QDQ, per-channel int8 weights, activations calibrated (MinMax) on up to 300
              training images, not the validation ones
    dynamic   transformer encoders: int8 weights, activations quantized at run time (no calibration)

int8 cannot pass the fp32 gate (|Δlogit| is far above 1e-4 by design), so it is judged by the task: the
validation accuracy of the int8 model next to fp32's (classification), and a warning when it drops more
than `max_accuracy_drop` points.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError

FILE = "model.int8.onnx"
CALIBRATION = 300  # training images read by static calibration
log = logging.getLogger("finetunekit")


def quantize(folder: Path, model: Any, mode: str, *, calibration: Sequence[Any], validation: Sequence[Any],
             labels: Sequence[int] | None, max_accuracy_drop: float = 1.0, batch: int = 16) -> dict:
    """Write folder/model.int8.onnx from folder/model.onnx; returns the int8 entry of config.json."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)

    from . import graph as G

    src, dst = folder / "model.onnx", folder / FILE
    if mode == "static":
        batches = list(_feeds(model, calibration, batch))

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter(batches)

            def get_next(self):
                return next(self.it, None)

        with _no_preprocessing_advice():
            quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    else:
        with _no_preprocessing_advice():
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True)
    fp32, int8 = _outputs(src, model, validation, batch), _outputs(dst, model, validation, batch)
    entry: dict[str, Any] = {"file": FILE, "mode": mode, "format": "QDQ" if mode == "static" else "dynamic",
                             "per_channel": True, "calibration_samples": len(calibration) if mode == "static" else 0,
                             "validation_samples": len(validation),
                             "max_abs_diff": float(np.abs(fp32 - int8).max()) if len(validation) else None}
    if fp32.ndim == 2 and fp32.shape[1] > 1 and len(validation):
        entry["top1_agreement"] = float((fp32.argmax(-1) == int8.argmax(-1)).mean())
    if labels is not None and len(validation) and model.task.kind == "classification":
        y = np.asarray(labels)
        acc32, acc8 = float((fp32.argmax(-1) == y).mean()), float((int8.argmax(-1) == y).mean())
        drop = 100 * (acc32 - acc8)
        entry["accuracy"] = {"fp32": acc32, "int8": acc8, "drop_points": drop, "max_drop_points": max_accuracy_drop}
        if drop > max_accuracy_drop:
            entry["warning"] = (f"int8 validation accuracy {acc8:.4f} is {drop:.1f} points below fp32's {acc32:.4f} "
                                f"(more than --max-accuracy-drop {max_accuracy_drop:g}); prefer model.onnx")
    return entry


@contextmanager
def _no_preprocessing_advice():
    """onnxruntime's quantizer logs 'Please consider to run pre-processing before quantization' on the root
    logger for every model; its quant_pre_process changed nothing here (docs/export.md), so the line goes."""

    def keep(record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _feeds(model: Any, samples: Sequence[Any], batch: int):
    """The samples as the exported model's input batches (images: the eval transform; text: padded ids)."""
    from . import graph as G

    if G.is_text(model.backbone):
        from ..data.text import tokenize

        tok = model.tokenizer
        enc = tokenize(tok, list(samples), model.max_length)
        for start in range(0, len(samples), batch):
            yield G.pad_tokens(enc, range(start, min(start + batch, len(samples))), tok.pad_token_id,
                               tok.padding_side == "left")
        return
    import torch

    from ..data import build_transform, load_rgb

    tf = build_transform(model.backbone.preprocessing, augment="none")
    for start in range(0, len(samples), batch):
        yield {G.PIXELS: torch.stack([tf(load_rgb(p)) for p in samples[start:start + batch]]).numpy()}


def _outputs(path: Path, model: Any, samples: Sequence[Any], batch: int) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = [session.run(["logits"], feeds)[0] for feeds in _feeds(model, samples, batch)]
    return np.concatenate(out) if out else np.empty((0, 1), np.float32)


def training_images(run: Path, validation: Sequence[str], n: int = CALIBRATION, seed: int = 0) -> list[str]:
    """Up to `n` of the run's training images (the validation ones left out), a seeded sample."""
    from ..config import read_yaml
    from ..data.sources import read_labeled_files, train_folder

    try:
        data = train_folder(Path(read_yaml(run / "recipe.yaml")["data"]["path"]))
        paths = read_labeled_files(data, "--data").paths
    except (UserError, OSError, KeyError, TypeError):
        return []
    held = set(validation)
    paths = [p for p in paths if p not in held]
    return sorted(random.Random(seed).sample(paths, min(n, len(paths))))


def validation_labels(run: Path, files: Sequence[str], classes: list[str]) -> list[int] | None:
    """The class index of each validation image, from the run's data (folder of class folders or manifest)."""
    from ..config import read_yaml
    from ..data.sources import read_labeled_files, train_folder

    try:
        data = read_yaml(run / "recipe.yaml")["data"]
        found: dict[str, str] = {}
        for key in ("path", "val"):
            if data.get(key):
                lf = read_labeled_files(train_folder(Path(data[key])), "--data")
                found.update(zip(lf.paths, lf.labels))
        return [classes.index(found[f]) for f in files]
    except (UserError, OSError, KeyError, TypeError, ValueError):
        return None
