"""The model folder: safetensors weights and a config.json that finetunekit.load (and, for hub-compatible
models, plain timm or transformers) reads back. The folder is written beside its final place and swapped
in, so a crash never leaves half a model (artifacts.save_model_folder)."""

from __future__ import annotations

from pathlib import Path


def export(backbone, task, out: Path, *, spec: str, task_name: str, extra: dict | None = None) -> Path:
    """Write `backbone` (its module holding the weights to save) for `task` to the folder `out`."""
    from ..artifacts import save_model_folder  # torch: imported on use, so `finetunekit export`'s checks stay fast

    save_model_folder(out, backbone, task.classes, spec, task_name, extra)
    return out
