"""The model folder, read defensively: config.json field by field and model.safetensors, each problem one
UserError line naming the file and the field. Also the timm-format folder that image sources write.

An image folder (timm, torchvision): `model.safetensors` (the library's own state-dict names) and a
`config.json` in timm's hub format (architecture, num_classes, pretrained_cfg, label_names, model_args
when the shapes need them) plus a `finetunekit` section. A transformers folder is whatever
`save_pretrained` writes, with a `finetunekit` entry in its config.json.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import save_tensors  # a full disk or a file-size limit: an OSError, not a SafetensorError
from ..data.transforms import Preprocessing
from ..errors import UserError, first_line
from .weights import load_safetensors

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
MAX_INPUT_SIZE = 2048  # as --image-size: a larger saved size is damage, not a model (and would exhaust memory)
MAX_CLASSES = 1_000_000
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
CROP_MODES = ("center", "squash", "border")
TTA = ("none", "flip", "crops", "flip-crops")
IMAGE_TASKS = ("image-classification", "image-multilabel", "image-regression")


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: missing") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(config).__name__}")
    ours = config.get("finetunekit", {})
    if not isinstance(ours, dict):
        raise UserError(f"{path}: field finetunekit: expected an object")
    return config


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """model.safetensors as a state dict; a missing, empty or truncated file is one line."""
    path = folder / WEIGHTS
    if not path.is_file():
        raise UserError(f"{path}: missing (a model folder holds its weights in {WEIGHTS})")
    return load_safetensors(path, str(path))


def check_weights_header(folder: Path) -> None:
    """The weights file exists and its header parses (cheap: no tensor is read)."""
    from safetensors import safe_open

    path = folder / WEIGHTS
    if not path.is_file():
        raise UserError(f"{path}: missing (a model folder holds its weights in {WEIGHTS})")
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: not a readable safetensors file ({first_line(e)})") from None


def field(config: dict, dotted: str, folder: Path, kind, *, required: bool = True, default: Any = None,
          check=None, expected: str = "") -> Any:
    """config[dotted] of type `kind`, or a UserError naming config.json and the field."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            if required:
                raise UserError(f"{folder / CONFIG}: field {dotted}: missing")
            return default
        node = node[part]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(node, kinds) and not (isinstance(node, bool) and bool not in kinds)
    if not ok or (check is not None and not check(node)):
        what = expected or getattr(kind, "__name__", "a value of another type")
        raise UserError(f"{folder / CONFIG}: field {dotted}: expected {what}, got {json.dumps(node)[:80]}")
    return node


def _rgb(v: Any) -> bool:
    return (isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                        and math.isfinite(x) for x in v))


def read_preprocessing(config: dict, folder: Path, at: str = "finetunekit.preprocessing") -> Preprocessing:
    field(config, at, folder, dict, expected="an object")
    size = field(config, f"{at}.input_size", folder, int, check=lambda v: 16 <= v <= MAX_INPUT_SIZE,
                 expected=f"an integer from 16 to {MAX_INPUT_SIZE}")
    mean = field(config, f"{at}.mean", folder, list, check=_rgb, expected="3 numbers (R, G, B)")
    std = field(config, f"{at}.std", folder, list, check=lambda v: _rgb(v) and min(v) > 0,
                expected="3 positive numbers (R, G, B)")
    interp = field(config, f"{at}.interpolation", folder, str, required=False, default="bilinear",
                   check=lambda v: v in INTERPOLATIONS, expected=f"one of {', '.join(INTERPOLATIONS)}")
    crop_pct = field(config, f"{at}.crop_pct", folder, (int, float), required=False, default=0.875,
                     check=lambda v: 0 < v <= 2, expected="a number in (0, 2]")
    crop_mode = field(config, f"{at}.crop_mode", folder, str, required=False, default="center",
                      check=lambda v: v in CROP_MODES, expected=f"one of {', '.join(CROP_MODES)}")
    return Preprocessing(input_size=size, mean=tuple(float(x) for x in mean), std=tuple(float(x) for x in std),
                         interpolation=interp, crop_pct=float(crop_pct), crop_mode=crop_mode)


def read_head_type(config: dict, folder: Path) -> str:
    from .heads import _MLP

    return field(config, "finetunekit.head_type", folder, str, required=False, default="linear",
                 check=lambda v: v == "linear" or _MLP.fullmatch(v) is not None, expected="linear or mlp:N")


def mismatch(missing: list[str], unexpected: list[str], shape: list[str]) -> str:
    """What is wrong between saved weights and a model, in a few words: the first kind of problem, 2 examples."""
    if missing:
        return f"{len(missing)} tensors missing (e.g. {', '.join(missing[:2])})"
    if unexpected:
        return f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:2])})"
    return f"{len(shape)} tensors of another shape (e.g. {shape[0]})"


# --- the timm-format image folder (timm and torchvision sources) ---

def write_image_folder(folder: Path, backbone, classes: list[str], ours: dict) -> None:
    from .. import artifacts

    module = getattr(backbone.module, "_orig_mod", backbone.module)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_tensors(state, folder / WEIGHTS, metadata={"format": "pt"})
    pre = backbone.preprocessing
    outputs = len(classes) or 1  # regression: one output, no class names
    config = {
        "architecture": backbone.architecture,
        "num_classes": outputs,
        "num_features": backbone.num_features,
        "pretrained_cfg": {"input_size": [3, pre.input_size, pre.input_size], "mean": list(pre.mean),
                           "std": list(pre.std), "interpolation": pre.interpolation, "crop_pct": pre.crop_pct,
                           "crop_mode": pre.crop_mode, "num_classes": outputs, "classifier": backbone.head},
        **({"model_args": dict(backbone.model_args)} if backbone.model_args else {}),
        "label_names": list(classes),
        "finetunekit": {**ours, "preprocessing": pre.to_dict(),
                        **({"pruned_layers": backbone.pruned_layers} if backbone.pruned_layers else {})},
    }
    artifacts.write_json(folder / CONFIG, config)


def read_image_folder(folder: Path, config: dict) -> dict[str, Any]:
    """The validated fields of a timm-format folder: architecture, num_classes, labels, preprocessing,
    head type, model_args, task, pruned layers (--prune)."""
    arch = field(config, "architecture", folder, str, check=bool, expected="a model name")
    num_classes = field(config, "num_classes", folder, int, check=lambda v: 1 <= v <= MAX_CLASSES,
                        expected=f"an integer from 1 to {MAX_CLASSES}")
    labels = field(config, "label_names", folder, list, check=lambda v: all(isinstance(x, str) for x in v),
                   expected="a list of class names")
    if labels and len(labels) != num_classes:
        raise UserError(f"{folder / CONFIG}: field label_names: {len(labels)} names, but num_classes is "
                        f"{num_classes}")
    task = field(config, "finetunekit.task", folder, str, required=False, default="image-classification",
                 check=lambda v: v in IMAGE_TASKS, expected=f"one of {', '.join(IMAGE_TASKS)}")
    if not labels and task != "image-regression":
        raise UserError(f"{folder / CONFIG}: field label_names: empty, but finetunekit.task is {task}")
    model_args = field(config, "model_args", folder, dict, required=False, default={}, expected="an object")
    for k, v in model_args.items():
        if k in ("img_size", "image_size") and not (isinstance(v, int) and 16 <= v <= MAX_INPUT_SIZE):
            raise UserError(f"{folder / CONFIG}: field model_args.{k}: expected an integer from 16 to "
                            f"{MAX_INPUT_SIZE}, got {json.dumps(v)[:80]}")
    pruned = field(config, "finetunekit.pruned_layers", folder, dict, required=False, default={},
                   expected="an object of layer names")
    return {"architecture": arch, "num_classes": num_classes, "labels": labels, "task": task,
            "preprocessing": read_preprocessing(config, folder), "head_type": read_head_type(config, folder),
            "model_args": model_args, "pruned_layers": pruned}


def load_into(backbone, state: dict[str, torch.Tensor], folder: Path, num_classes_field: str = "num_classes"
              ) -> None:
    """Load a folder's full state dict into a freshly built backbone; any mismatch is one line."""
    own = backbone.module.state_dict()
    head_bad = [k for k in own if backbone.is_head(k) and k in state and state[k].shape != own[k].shape]
    if head_bad:
        k = head_bad[0]
        raise UserError(f"{folder / CONFIG}: field {num_classes_field}: the head {k} in {WEIGHTS} has shape "
                        f"{list(state[k].shape)}, but {num_classes_field} asks for {list(own[k].shape)}")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shape:
        raise UserError(f"{folder / WEIGHTS}: does not fit the architecture {backbone.architecture} of "
                        f"{CONFIG}: {mismatch(missing, unexpected, shape)}")
    backbone.module.load_state_dict(state)
