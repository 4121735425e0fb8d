"""`--init RUN`: two-stage transfer. A run starts from an earlier run's fine-tuned weights (first adapt to a
similar public dataset, then to the target) instead of the source's pretrained ones (docs/two-stage.md).

    resolve(recipe) -> recipe     torch-free: the folder is a finetunekit model folder of the same task; its
                                  --model is taken (a different explicit --model is an error), and the source's
                                  pretrained weights are not loaded (they would be replaced: no download)
    apply(m, inputs) -> record    after the model is built: the earlier weights loaded into it; its head too when
                                  the class names match in order, else the new head stays (one log line says which)

`apply` runs before anything reads the weights (cached features key on the backbone's weights digest, the
playbook, pruning, the optimizer), and again on `--resume`, where the checkpoint's weights then win.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError
from .rundir import CONFIG, find_model_folder



@dataclass(frozen=True)
class InitSource:
    path: Path  # as given: a run directory or a model folder
    folder: Path  # the model folder
    task: str
    model: str  # the --model spec it was fine-tuned from


def folder_of(path: Path) -> Path:
    """The model folder of `path` (a run directory or a model folder); one line naming --init otherwise."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"--init {path}: no such file or folder")
    try:
        return find_model_folder(path)
    except UserError as e:
        raise UserError(f"--init {e}") from None


def read(path: Path) -> InitSource:
    """What `--init PATH` starts from (torch-free): refused with one line when it is not a finetunekit model folder,
    or a kind of folder whose weights are not the whole model (--peft: the adapter alone; --prune: other shapes)."""
    folder = folder_of(path)
    try:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--init {path}: {folder / CONFIG} is not valid JSON ({e})") from None
    ours = config.get("finetunekit") if isinstance(config, dict) else None
    if not isinstance(ours, dict) or not isinstance(ours.get("task"), str) or not isinstance(ours.get("model"), str):
        raise UserError(f"--init {path}: {folder / CONFIG} has no finetunekit.task and finetunekit.model (not a "
                        f"finetunekit model folder; a Hugging Face folder is --model hf:FOLDER)")
    if "peft" in ours:
        raise UserError(f"--init {path}: a --peft run (its folder holds the adapter alone); start from its merged "
                        f"model instead (finetunekit export RUN --merge)")
    if ours.get("prune") or ours.get("pruned_layers"):
        raise UserError(f"--init {path}: a --prune run (its layers have other sizes than --model {ours['model']}'s); "
                        f"not supported")
    if ours["task"] == "detection":
        raise UserError(f"--init {path}: a detection run; --init is for classification, multi-label and regression")
    return InitSource(Path(path), folder, ours["task"], ours["model"])


def resolve(recipe):
    """The recipe with --init's model filled in (torch-free), or as it is without --init. One-line errors: another
    task, another explicit --model, --weights, --peft or --prune beside it."""
    m = recipe.model
    if m.init is None:
        return recipe
    source = read(m.init)
    if source.task != recipe.task:
        raise UserError(f"--init {m.init}: fine-tuned for --task {source.task}, not --task {recipe.task} (the same "
                        f"task is needed)")
    if m.name is not None and m.name != source.model:
        raise UserError(f"--model {m.name}: --init {m.init} was fine-tuned from --model {source.model}; drop --model "
                        f"(--init takes its model)")
    for flag, on in (("--weights", m.weights is not None), ("--peft", m.peft), ("--prune", m.prune)):
        if on:
            raise UserError(f"{flag}: not with --init (it starts from {m.init}'s weights)")
    if m.name == source.model and not m.pretrained:
        return recipe
    resolved = recipe.model_copy(deep=True)
    resolved.model.name = source.model
    resolved.model.pretrained = False  # the source's pretrained weights would be replaced: not loaded (offline)
    resolved._config_path = recipe.config_path
    return resolved


def apply(m, inputs) -> dict[str, Any] | None:
    """--init: the earlier run's weights loaded into `inputs.backbone` (in place); its head too when its classes are
    this run's in the same order (and the head has the same shape), else the new head is kept. Appends the log line
    to `inputs.summary`, records the init in the model folder's config; returns metrics.json's `init` entry."""
    if m.init is None:
        return None
    from .models import load_folder

    source = read(m.init)
    saved, _, saved_classes, _ = load_folder(source.folder)
    backbone, classes = inputs.backbone, list(inputs.task.classes or [])
    theirs, own = saved.module.state_dict(), backbone.module.state_dict()
    head = backbone.is_head
    missing = [k for k in own if not head(k) and k not in theirs]
    shapes = [k for k in own if not head(k) and k in theirs and theirs[k].shape != own[k].shape]
    if missing or shapes:
        bad = (missing or shapes)[:3]
        raise UserError(f"--init {m.init}: its weights do not fit this model ({len(missing or shapes)} backbone "
                        f"tensors {'missing' if missing else 'of another shape'}, e.g. {', '.join(bad)})")
    head_fits = all(k in theirs and theirs[k].shape == v.shape for k, v in own.items() if head(k))
    same_classes = list(saved_classes or []) == classes
    keep = same_classes and head_fits
    backbone.module.load_state_dict({k: v for k, v in theirs.items() if k in own and (keep or not head(k))},
                                    strict=False)
    if keep:
        why = "the same classes in the same order"
    elif same_classes:
        why = "the same classes, but its head has another shape (--head)"
    elif sorted(saved_classes or []) == sorted(classes):
        why = "the same classes in another order"
    else:
        why = f"its {len(saved_classes or [])} classes differ from these {len(classes)}"
    record = {"run": str(Path(m.init).resolve()), "model": source.model, "head": "kept" if keep else "new",
              "classes": list(saved_classes or [])}
    inputs.summary.append(f"--init {m.init}: started from its fine-tuned weights ({source.model}); head "
                          f"{'kept' if keep else 'new'} ({why})")
    inputs.extra_config["init"] = {k: record[k] for k in ("run", "head")}
    return record
