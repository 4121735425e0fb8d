"""Predict with an exported ONNX model, without torch: onnxruntime, numpy, Pillow and `tokenizers` only
(`pip install finetunekit[runtime]`). Same results, and the same output format, as a loaded run's predict.

    model = finetunekit.runtime.load("runs/pets/export")     # or .../export/model.onnx
    model.predict(["cat.jpg"], top_k=3)

This module must not import torch (tests/test_export.py checks it in a fresh process); neither may the
modules it imports: errors, imagefiles.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import UserError
from .imagefiles import expand_inputs, load_rgb, to_rgb
from .predictor import Predictor

CONFIG = "config.json"
_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
             "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
             "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}
TEXT_FILE_SUFFIXES = {".txt", ".csv", ".tsv", ".tab", ".jsonl", ".ndjson"}


def export_format(path: str | os.PathLike) -> str | None:
    """"onnx" for a .onnx file or an ONNX export's folder, "torchscript" for model.pt or its folder, else None."""
    p = Path(path)
    if p.suffix.lower() in (".onnx", ".pt"):
        return "onnx" if p.suffix.lower() == ".onnx" else "torchscript"
    try:
        fmt = json.loads((p / CONFIG).read_text(encoding="utf-8")).get("format") if p.is_dir() else None
    except (OSError, ValueError):
        return None
    return fmt if fmt in ("onnx", "torchscript") else None


def is_export(path: str | os.PathLike) -> bool:
    """Whether `path` is an ONNX export (onnxruntime predicts it)."""
    return export_format(path) == "onnx"


class Task:
    """A task's prediction format on numpy logits (tasks/*.py `predict`, without torch)."""

    def __init__(self, kind: str, classes: list[str], threshold: float = 0.5):
        self.kind, self.classes, self.threshold = kind, classes, threshold

    def predict(self, logits: np.ndarray, top_k: int = 1) -> list[dict]:
        logits = logits.astype(np.float32)
        if self.kind == "regression":
            return [{"value": float(v)} for v in logits.reshape(len(logits), -1)[:, 0]]
        if self.kind == "multilabel":
            probs = 1.0 / (1.0 + np.exp(-logits))
            return [{"labels": [c for c, p in zip(self.classes, row) if p > self.threshold],
                     "scores": {c: float(p) for c, p in zip(self.classes, row)}} for row in probs]
        e = np.exp(logits - logits.max(-1, keepdims=True))
        probs = e / e.sum(-1, keepdims=True)
        k = min(top_k, probs.shape[-1])
        out = []
        for row in probs:
            idx = np.argsort(-row, kind="stable")[:k]
            out.append({"label": self.classes[int(idx[0])], "score": float(row[idx[0]]),
                        "top_k": [{"label": self.classes[int(j)], "score": float(row[j])} for j in idx]})
        return out


class RuntimeModel(Predictor):
    """An exported model in an onnxruntime session: `predict` as FineTunedModel.predict."""

    def __init__(self, folder: Path, config: dict, model_file: Path, providers: Sequence[str] | None = None,
                 session_options: Any = None):
        import onnxruntime as ort

        self.folder, self.config = folder, config
        self.task = Task(config["kind"], list(config["classes"]), float(config.get("threshold", 0.5)))
        self.calibration = config.get("calibration")  # predict divides the graph's logits by its temperature
        self.session = ort.InferenceSession(str(model_file), sess_options=session_options,
                                            providers=list(providers or ["CPUExecutionProvider"]))
        self.inputs = list(config["inputs"])
        self.modality = config.get("modality", "image")

    @property
    def classes(self) -> list[str]:
        return self.task.classes

    def logits(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([self.config["outputs"][0]], feeds)[0]


class ImageRuntime(RuntimeModel):
    def __init__(self, folder: Path, config: dict, model_file: Path, **session: Any):
        super().__init__(folder, config, model_file, **session)
        self.pre = config["preprocessing"]
        if self.pre.get("crop_mode", "center") not in ("center", "squash"):
            raise UserError(f"{folder / CONFIG}: crop_mode {self.pre['crop_mode']!r} is not supported by the "
                            f"onnxruntime path yet (center, squash)")

    def preprocess(self, im: Image.Image) -> np.ndarray:
        """RGB image -> float32 [3, H, W]: timm's eval transform (torchvision Resize, CenterCrop, ToTensor,
        Normalize) with Pillow and numpy."""
        size, scale = int(self.pre["input_size"]), int(self.pre["resize"])
        resample = _RESAMPLE.get(self.pre.get("interpolation", "bilinear"), Image.Resampling.BILINEAR)
        w, h = im.size
        if self.pre.get("crop_mode") == "squash":
            new = (scale, scale)
        elif w <= h:
            new = (scale, int(scale * h / w))
        else:
            new = (int(scale * w / h), scale)
        if new != (w, h):
            im = im.resize(new, resample)
        w, h = im.size
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
        im = im.crop((left, top, left + size, top + size))
        x = np.asarray(im, dtype=np.uint8).astype(np.float32) / np.float32(255)
        x = x.transpose(2, 0, 1)
        mean = np.asarray(self.pre["mean"], dtype=np.float32)[:, None, None]
        std = np.asarray(self.pre["std"], dtype=np.float32)[:, None, None]
        return (x - mean) / std

    def _image(self, item: Any) -> Image.Image:
        if isinstance(item, Image.Image):
            return to_rgb(item)
        if isinstance(item, np.ndarray):
            return to_rgb(Image.fromarray(item))
        return load_rgb(item)

    def _scores(self, items: list[Any], batch_size: int, skip: bool) -> tuple[np.ndarray, dict[int, str]]:
        out, failed = [], {}
        for start in range(0, len(items), batch_size):
            xs = []
            for i in range(start, min(start + batch_size, len(items))):
                try:
                    xs.append(self.preprocess(self._image(items[i])))
                except Exception as e:  # noqa: BLE001 - any decoding failure: name the file, no traceback
                    first = str(e).splitlines()[0] if str(e) else ""
                    reason = f"cannot read as an image ({type(e).__name__}: {first})"
                    if not skip:
                        raise UserError(f"{items[i]}: {reason}") from None
                    failed[i] = reason
            if xs:
                out.append(self.logits({self.inputs[0]: np.stack(xs)}))
        n = len(self.task.classes) or 1
        return (np.concatenate(out) if out else np.empty((0, n), np.float32)), failed

    def _inputs(self, inputs: Any) -> tuple[list[Any], list[dict]]:
        items = expand_inputs(inputs)
        return items, [{"path": str(i)} if isinstance(i, (str, os.PathLike)) else {} for i in items]


class TextRuntime(RuntimeModel):
    def __init__(self, folder: Path, config: dict, model_file: Path, **session: Any):
        super().__init__(folder, config, model_file, **session)
        from tokenizers import Tokenizer

        self.text = config["text"]
        self.text_columns = list(self.text.get("text_columns") or ["text"])
        self.tokenizer = Tokenizer.from_file(str(folder / self.text["tokenizer"]))
        self.tokenizer.no_padding()  # padded per batch below, as the training-side PadCollate does
        self.tokenizer.enable_truncation(int(self.text["max_length"]))

    def encode(self, texts: Sequence[tuple[str, ...]]) -> dict[str, list[list[int]]]:
        """{input_ids, attention_mask, token_type_ids}: unpadded, truncated to max_length (as data.text.tokenize)."""
        encs = self.tokenizer.encode_batch([t[0] if len(t) == 1 else (t[0], t[1]) for t in texts])
        fields = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
        return {name: [list(getattr(e, fields[name])) for e in encs] for name in self.inputs}

    def _scores(self, texts: list[tuple[str, ...]], batch_size: int, skip: bool) -> tuple[np.ndarray, dict]:
        n = len(self.task.classes) or 1
        out = np.empty((len(texts), n), np.float32)
        if not texts:
            return out, {}
        enc = self.encode(texts)
        order = sorted(range(len(texts)), key=lambda i: len(enc["input_ids"][i]))  # least padding
        pad, left = int(self.text["pad_id"]), self.text.get("padding_side") == "left"
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(enc["input_ids"][i]) for i in idx)
            feeds = {}
            for key, rows in enc.items():
                fill = pad if key == "input_ids" else 0
                feeds[key] = np.array([[fill] * (width - len(rows[i])) + rows[i] if left else
                                       rows[i] + [fill] * (width - len(rows[i])) for i in idx], dtype=np.int64)
            out[idx] = self.logits(feeds)
        return out, {}

    def _inputs(self, inputs: Any) -> tuple[list[tuple[str, ...]], list[dict]]:
        if isinstance(inputs, os.PathLike) or (isinstance(inputs, str) and len(inputs) < 4096 and "\n" not in inputs
                                               and Path(inputs).suffix.lower() in TEXT_FILE_SUFFIXES
                                               and Path(inputs).is_file()):
            texts = read_texts(Path(inputs), self.text_columns)
        else:
            items = [inputs] if isinstance(inputs, (str, tuple)) else list(inputs)
            texts = [(t,) if isinstance(t, str) else tuple(t) for t in items]
        wrong = next((t for t in texts if len(t) != len(self.text_columns)), None)
        if wrong is not None:
            raise UserError(f"predict: this model reads {len(self.text_columns)} text(s) per sample "
                            f"({', '.join(self.text_columns)}), got {len(wrong)}: {wrong!r}")
        return texts, [{"text": t[0]} if len(t) == 1 else {"text": list(t)} for t in texts]


def read_texts(path: Path, columns: list[str]) -> list[tuple[str, ...]]:
    """Texts to predict from a .txt file (one per line), a CSV/TSV table or JSON lines with the model's text
    column(s). (Parquet needs the full install: finetunekit predict on the run.)"""
    suffix = path.suffix.lower()
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read it as UTF-8 text ({e})") from None
    if suffix == ".txt":
        if len(columns) > 1:
            raise UserError(f"{path}: this model reads text pairs ({', '.join(columns)}); give a table with "
                            f"those columns")
        return [(line.strip(),) for line in raw.split("\n") if line.strip()]
    if suffix in (".jsonl", ".ndjson"):
        rows = [json.loads(line) for line in raw.splitlines() if line.strip()]
    else:
        rows = list(csv.DictReader(raw.splitlines(), delimiter="," if suffix == ".csv" else "\t"))
    out = []
    for n, row in enumerate(rows, 1):
        have = {str(k).lower(): v for k, v in row.items()}
        missing = [c for c in columns if c.lower() not in have]
        if missing:
            raise UserError(f"{path}: no text column {missing[0]!r} (columns: {list(row)})")
        values = tuple(str(have[c.lower()] or "").strip() for c in columns)
        if not all(values):
            raise UserError(f"{path}, row {n}: empty text")
        out.append(values)
    return out


def load(path: str | os.PathLike, *, providers: Sequence[str] | None = None,
         session_options: Any = None) -> RuntimeModel:
    """An ONNX export (its folder, or its .onnx file with config.json beside it) in an onnxruntime session
    (`providers`: onnxruntime's execution providers, default the CPU; `session_options`: an
    onnxruntime.SessionOptions, e.g. its thread counts)."""
    p = Path(path)
    folder = p.parent if p.suffix.lower() == ".onnx" else p
    if not p.exists():
        raise UserError(f"{p}: no such file or folder")
    try:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{folder / CONFIG}: cannot read the export's config ({type(e).__name__}); expected "
                        f"a folder written by `finetunekit export`") from None
    model_file = p if p.suffix.lower() == ".onnx" else folder / config.get("file", "model.onnx")
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise UserError("predict on an ONNX export needs onnxruntime: pip install 'finetunekit[runtime]'") from None
    session = {"providers": providers, "session_options": session_options}
    if config.get("modality") == "text":
        return TextRuntime(folder, config, model_file, **session)
    return ImageRuntime(folder, config, model_file, **session)


__all__ = ["ImageRuntime", "RuntimeModel", "Task", "TextRuntime", "export_format", "is_export", "load"]
