"""The model folder (save, load) and the run directory's files.

What a model folder holds, and what loads it besides `finetunekit.load`, is each source adapter's
(finetunekit/models/: `Source.save`, `Source.load`, `Source.loads_in`; docs/models.md):

    timm, efficientnet_lite0   timm's hub format: timm.create_model("local-dir:runs/x/model", pretrained=True)
    torchvision                timm's format with torchvision's tensor names: torchvision.models.get_model
    hf, minilm, hf (images)    a standard Hugging Face folder: AutoModelFor...Classification.from_pretrained
    --peft (any source)        the adapter alone, rebuilt on its base: peft's PeftModel.from_pretrained
                               (models/adapter_folder.py)
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

from . import __version__, calibration, sharding
from .models import Backbone, load_folder
from .models.folder import read_weights
from .rundir import find_model_folder
from .tasks import build_task

WEIGHTS = "model.safetensors"


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_history(path: Path, rows: list[dict]) -> None:
    """history.csv, replaced whole (runfiles rewrites it after every epoch: a reader never sees half of it)."""
    if not rows:
        return
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def save_model_folder(folder: Path, backbone: Backbone, classes: Sequence[str], spec: str,
                      task: str = "image-classification", extra: dict | None = None) -> None:
    """Write the folder beside its final place, then swap it in: a crash never leaves half a model."""
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ours = {"version": __version__, "task": task, "source": backbone.source, "model": spec, "head": backbone.head,
            **(extra or {})}
    if backbone.peft is not None:  # --peft: the adapter alone (models/adapter_folder.py)
        from .models import adapter_folder

        adapter_folder.save(tmp, backbone, list(classes), ours)
    else:
        backbone.adapter.save(tmp, backbone, list(classes), ours)
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def load_weights_file(module: torch.nn.Module, folder: Path) -> None:
    """Load a saved model folder's weights into `module` (same architecture), in place; a --peft folder's
    adapter into `module`'s adapters."""
    from .models import adapter_folder

    if (folder / adapter_folder.WEIGHTS).is_file():
        adapter_folder.load_tensors(module, folder)
        return
    state = read_weights(folder)
    if unexpected_names(module, state):  # transformers 5 saves some models under their checkpoints' old names
        state = _transformers_state(module, folder) or state
    if sharding.is_sharded(module):  # --fsdp: every process keeps its shards of the whole tensors
        missing, unexpected = sharding.load_whole(module, state, strict=False)
    else:
        missing, unexpected = module.load_state_dict(state, strict=False)
    # transformers leaves out tied or non-persistent tensors; anything else missing is a real mismatch
    tied = set(getattr(module, "all_tied_weights_keys", None) or ())
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"{folder}: weights do not fit the model (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")


def unexpected_names(module: torch.nn.Module, state: dict) -> bool:
    return not set(state) <= set(module.state_dict())


def _transformers_state(module: torch.nn.Module, folder: Path) -> dict | None:
    """The folder's weights named as `module` names them, where `module` is (or holds) a transformers model
    whose save_pretrained wrote them under the checkpoint format's names (revert_weight_conversion: a ViT's
    `encoder.layer.N.attention.attention.key` for its `layers.N.attention.k_proj`): read back by the model
    class's own from_pretrained, which converts them. None when `module` holds no transformers model."""
    from transformers import PreTrainedModel

    for prefix, sub in module.named_modules():
        if isinstance(sub, PreTrainedModel):
            fresh = type(sub).from_pretrained(folder, config=sub.config)
            return {f"{prefix}.{k}" if prefix else k: v for k, v in fresh.state_dict().items()}
    return None


def load(path: str | os.PathLike):
    """Restore a fine-tuned model from a run directory or a model folder: an ImageModel or a TextModel."""
    from .inference import DetectionModel, ImageModel, TextModel

    folder = find_model_folder(Path(path))
    backbone, task_name, classes, ours = load_folder(folder)
    task = build_task(task_name, classes, threshold=ours.get("threshold") or 0.5)
    if task.kind == "detection":
        return DetectionModel(backbone, task, folder)
    if task.kind == "seq2seq":
        from .generation import Seq2SeqModel

        return Seq2SeqModel(backbone, task, folder, ours)
    if backbone.adapter.modality == "text":
        model = TextModel(backbone, task, folder, ours, task_name)
    else:
        model = ImageModel(backbone, task, folder, tta=ours.get("tta", "none"), table=ours)
    model.calibration = calibration.read(folder)  # predict applies it (predictor.py)
    return model
