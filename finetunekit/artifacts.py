"""The model folder (save, load) and the run directory's files.

Image models: `model.safetensors` (the source library's own state-dict names) and a `config.json` in
timm's hub format (architecture, num_classes, pretrained_cfg, label_names) plus a `finetunekit` section.
A timm-backed folder therefore also loads with plain timm:

    timm.create_model("local-dir:runs/x/model")
    timm.create_model(arch, pretrained=True, num_classes=N,
                      pretrained_cfg_overlay=dict(file="runs/x/model/model.safetensors", num_classes=N))

Text models: a standard Hugging Face folder (save_pretrained of the model and its tokenizer; id2label,
label2id and problem_type set; the tokenizer's model_max_length is the training max length), plus a
`finetunekit` entry in config.json:

    AutoModelForSequenceClassification.from_pretrained("runs/x/model"); AutoTokenizer.from_pretrained(...)
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .data import Preprocessing
from .errors import UserError
from .models import Backbone, rebuild_backbone
from .tasks import build_task

MODEL_DIR = "model"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


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
                      task: str = "image-classification", extra: dict | None = None) -> None:
    """Write the folder beside its final place, then swap it in: a crash never leaves half a model."""
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ours = {"version": __version__, "task": task, "source": backbone.source, "model": spec, "head": backbone.head,
            **(extra or {})}
    if backbone.source == "hf":
        _write_hf(tmp, backbone, ours)
    else:
        _write_image(tmp, backbone, classes, ours)
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def _write_image(tmp: Path, backbone: Backbone, classes: Sequence[str], ours: dict) -> None:
    from safetensors.torch import save_file

    module = backbone.module
    module = getattr(module, "_orig_mod", module)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
    pre = backbone.preprocessing
    outputs = len(classes) or 1  # regression: one output, no class names
    config = {
        "architecture": backbone.architecture,
        "num_classes": outputs,
        "num_features": backbone.num_features,
        "pretrained_cfg": {"input_size": [3, pre.input_size, pre.input_size], "mean": list(pre.mean),
                           "std": list(pre.std), "interpolation": pre.interpolation, "crop_pct": pre.crop_pct,
                           "crop_mode": pre.crop_mode, "num_classes": outputs, "classifier": backbone.head},
        "label_names": list(classes),
        "finetunekit": {**ours, "preprocessing": pre.to_dict()},
    }
    write_json(tmp / CONFIG, config)


def _write_hf(tmp: Path, backbone: Backbone, ours: dict) -> None:
    module = getattr(backbone.module, "_orig_mod", backbone.module)
    module.config.finetunekit = ours  # an extra config attribute: saved in config.json, ignored by transformers
    module.save_pretrained(tmp)  # safetensors
    tokenizer = backbone.tokenizer
    tokenizer.model_max_length = ours["max_length"]  # plain transformers then truncates as we trained
    tokenizer.save_pretrained(tmp)


def load_weights_file(module: torch.nn.Module, folder: Path) -> None:
    """Load a saved model folder's weights into `module` (same architecture), in place."""
    from safetensors.torch import load_file

    state = load_file(str(folder / WEIGHTS))
    missing, unexpected = module.load_state_dict(state, strict=False)
    # transformers leaves out tied or non-persistent tensors; anything else missing is a real mismatch
    tied = set(getattr(module, "all_tied_weights_keys", None) or ())
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"{folder}: weights do not fit the model (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")


def _model_dir(path: Path) -> Path:
    path = Path(path)
    if (path / CONFIG).is_file() and (path / WEIGHTS).is_file():
        return path
    if (path / MODEL_DIR / CONFIG).is_file():
        return path / MODEL_DIR
    raise UserError(f"{path}: not a finetunekit run or model folder (no {MODEL_DIR}/{CONFIG})")


def load(path: str | os.PathLike):
    """Restore a fine-tuned model from a run directory or a model folder: an ImageModel or a TextModel."""
    from .inference import ImageModel, TextModel

    folder = _model_dir(Path(path))
    config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    ours = config.get("finetunekit") or {}
    if "model_type" in config:  # a Hugging Face folder
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from .models.hf_source import quiet_transformers, wrap

        quiet_transformers()
        try:
            module = AutoModelForSequenceClassification.from_pretrained(folder)
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception as e:  # noqa: BLE001 - a broken folder fails in many ways
            raise UserError(f"{folder}: cannot load the model folder ({type(e).__name__}: {e})") from None
        task_name = ours.get("task") or {"multi_label_classification": "text-multilabel",
                                         "regression": "text-regression"}.get(config.get("problem_type"),
                                                                              "text-classification")
        classes = [] if task_name.endswith("regression") else \
            [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
        task = build_task(task_name, classes, threshold=ours.get("threshold") or 0.5)
        module.eval()
        return TextModel(wrap(module, tokenizer), task, folder, ours, task_name)
    pre = Preprocessing.from_dict(ours["preprocessing"])
    classes = config["label_names"]
    backbone = rebuild_backbone(ours["source"], config["architecture"], config["num_classes"], pre,
                                head=ours.get("head_type", "linear"))
    load_weights_file(backbone.module, folder)
    backbone.module.eval()
    task = build_task(ours.get("task", "image-classification"), classes, threshold=ours.get("threshold") or 0.5)
    return ImageModel(backbone, task, folder, tta=ours.get("tta", "none"), table=ours)
