"""The model folder (save, load, predict) and the run directory's files.

A model folder holds `model.safetensors` (the source library's own state-dict names) and a `config.json`
in timm's hub format (architecture, num_classes, pretrained_cfg, label_names) plus a `finetunekit`
section. A timm-backed folder therefore also loads with plain timm:

    timm.create_model("local-dir:runs/x/model")
    timm.create_model(arch, pretrained=True, num_classes=N,
                      pretrained_cfg_overlay=dict(file="runs/x/model/model.safetensors", num_classes=N))
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import __version__
from .data import Preprocessing, build_transform, load_rgb, to_rgb
from .errors import UserError
from .models import Backbone, rebuild_backbone
from .tasks import Classification

MODEL_DIR = "model"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_history(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def save_model_folder(folder: Path, backbone: Backbone, classes: Sequence[str], spec: str,
                      task: str = "image-classification") -> None:
    """Write the folder beside its final place, then swap it in: a crash never leaves half a model."""
    from safetensors.torch import save_file

    module = backbone.module
    module = getattr(module, "_orig_mod", module)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
    pre = backbone.preprocessing
    config = {
        "architecture": backbone.architecture,
        "num_classes": len(classes),
        "num_features": backbone.num_features,
        "pretrained_cfg": {"input_size": [3, pre.input_size, pre.input_size], "mean": list(pre.mean),
                           "std": list(pre.std), "interpolation": pre.interpolation, "crop_pct": pre.crop_pct,
                           "crop_mode": pre.crop_mode, "num_classes": len(classes), "classifier": backbone.head},
        "label_names": list(classes),
        "finetunekit": {"version": __version__, "task": task, "source": backbone.source, "model": spec,
                        "head": backbone.head, "preprocessing": pre.to_dict()},
    }
    write_json(tmp / CONFIG, config)
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def _model_dir(path: Path) -> Path:
    path = Path(path)
    if (path / CONFIG).is_file() and (path / WEIGHTS).is_file():
        return path
    if (path / MODEL_DIR / CONFIG).is_file():
        return path / MODEL_DIR
    raise UserError(f"{path}: not a finetunekit run or model folder (no {MODEL_DIR}/{CONFIG})")


class FineTunedModel:
    """A fine-tuned model restored from disk: `predict` takes files, folders, PIL images or arrays."""

    def __init__(self, backbone: Backbone, task: Classification, folder: Path):
        self.backbone, self.task, self.folder = backbone, task, folder
        self.transform = build_transform(backbone.preprocessing, augment="none")
        self.device = torch.device("cpu")

    @property
    def classes(self) -> list[str]:
        return self.task.classes

    @property
    def module(self) -> torch.nn.Module:
        return self.backbone.module

    def to(self, device: str | torch.device) -> FineTunedModel:
        self.device = torch.device(device)
        self.module.to(self.device)
        return self

    def _image(self, item: Any) -> Image.Image:
        if isinstance(item, Image.Image):
            return to_rgb(item)
        if isinstance(item, np.ndarray):
            return to_rgb(Image.fromarray(item))
        try:
            return load_rgb(item)
        except Exception as e:  # noqa: BLE001 - any decoding failure: name the file, no traceback
            raise UserError(f"{item}: cannot read as an image ({type(e).__name__}: {e})") from None

    @torch.inference_mode()
    def logits(self, images: Sequence[Any], batch_size: int = 64) -> torch.Tensor:
        """[N, num_classes] logits for a sequence of images (paths, PIL images or HxWxC uint8 arrays)."""
        self.module.eval()
        out = []
        for i in range(0, len(images), batch_size):
            x = torch.stack([self.transform(self._image(im)) for im in images[i:i + batch_size]])
            out.append(self.module(x.to(self.device)).float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.task.num_outputs)

    def predict(self, images: Any, batch_size: int = 64, top_k: int = 1) -> list[dict]:
        """One dict per image: label, score, top_k; 'path' too for files. Folders are expanded."""
        items = expand_inputs(images)
        results = self.task.predict(self.logits(items, batch_size), top_k=top_k)
        for item, r in zip(items, results):
            if isinstance(item, (str, os.PathLike)):
                r["path"] = str(item)
        return results


def expand_inputs(images: Any) -> list[Any]:
    """A path, a folder (its image files, sorted, recursively), or a sequence of those and of images."""
    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
        images = [images]
    out: list[Any] = []
    for item in images:
        if isinstance(item, (str, os.PathLike)):
            p = Path(item)
            if p.is_dir():
                out += sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
            elif p.is_file():
                out.append(str(p))
            else:
                raise UserError(f"{p}: no such file or folder")
        else:
            out.append(item)
    return out


def load(path: str | os.PathLike) -> FineTunedModel:
    """Restore a fine-tuned model from a run directory or a model folder."""
    from safetensors.torch import load_file

    folder = _model_dir(Path(path))
    config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    ours = config.get("finetunekit") or {}
    pre = Preprocessing.from_dict(ours["preprocessing"])
    classes = config["label_names"]
    backbone = rebuild_backbone(ours["source"], config["architecture"], len(classes), pre)
    backbone.module.load_state_dict(load_file(str(folder / WEIGHTS)))
    backbone.module.eval()
    return FineTunedModel(backbone, Classification(classes), folder)

