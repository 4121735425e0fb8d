"""Checks of a recipe that need no data scan: paths exist, options fit the task, the model name resolves.

They run before anything heavy loads or anything at --out changes, so a mistake costs one line, not a run.
"""

from __future__ import annotations

from .config import TASKS, Recipe
from .errors import UserError


# options that only one kind of input reads: setting one for the other is a mistake worth a message
_TEXT_ONLY = {"data": ("text_column", "max_length", "group_by_length",
                       "token_delete", "token_swap", "token_mask", "synonyms", "synonym_prob"),
              "model": ("trust_remote_code",)}
_IMAGE_ONLY = {"data": ("image_size", "augment", "mixup", "cutmix", "mixup_off_epoch", "rotate", "elastic",
                        "vflip", "tta", "cache_views", "cache_images"),
               "model": ("drop_path", "head")}


def preflight(recipe: Recipe) -> None:
    """Checks that need no data scan: paths exist, options fit the task, the model name resolves."""
    d, m, t = recipe.data, recipe.model, recipe.train
    modality, losses, monitors = TASKS[recipe.task]
    if d.path is None:
        raise UserError("--data: required: " + ("a folder of class folders, a folder with train/ and val/, "
                                                "or a CSV manifest path,label" if modality == "image" else
                                                "a CSV, TSV, JSONL or Parquet table"))
    for flag, path in (("--data", d.path), ("--val", d.val), ("--test", d.test), ("--weights", m.weights),
                       ("--synonyms", d.synonyms)):
        if path is not None and not path.exists():
            raise UserError(f"{flag} {path}: no such file or folder")
    wrong = _TEXT_ONLY if modality == "image" else _IMAGE_ONLY
    for section, names in wrong.items():
        part = getattr(recipe, section)
        for name in names:
            if getattr(part, name) != type(part).model_fields[name].default:
                raise UserError(f"--{name.replace('_', '-')}: does not apply to --task {recipe.task}")
    if recipe.task == "image-classification":
        for name in ("label_column", "label_delimiter"):
            if getattr(d, name) is not None:
                raise UserError(f"--{name.replace('_', '-')}: does not apply to --task image-classification "
                                f"(class folders, or a manifest with columns path,label)")
    if (d.mixup or d.cutmix) and recipe.task != "image-classification":
        raise UserError(f"--mixup/--cutmix: for --task image-classification, not {recipe.task}")
    if (d.mixup or d.cutmix) and t.batch_size != "auto" and t.batch_size % 2:
        raise UserError(f"--batch-size {t.batch_size}: MixUp/CutMix mix each batch with its reverse and need an "
                        f"even batch size")
    if (d.mixup or d.cutmix) and t.loss == "focal":
        raise UserError("--loss focal: does not take the soft targets of MixUp/CutMix; use ce")
    if t.loss != "auto" and t.loss not in losses:
        raise UserError(f"--loss {t.loss}: for --task {recipe.task} expected one of {', '.join(losses)}")
    if t.metric != "auto" and t.metric not in monitors:
        raise UserError(f"--metric {t.metric}: for --task {recipe.task} expected one of {', '.join(monitors)}")
    from .checkpoint import parse_period
    from .models import check_spec, modality as model_modality  # imports torch: after the instant checks
    from .models.heads import check_head

    check_head(m.head)
    parse_period(t.checkpoint_every)

    check_spec(recipe.model_name, modality)
    if model_modality(recipe.model_name, modality) != modality:  # hf: reads what the task needs
        hint = "hf:<hub id or folder> or minilm" if modality == "text" else \
            "timm:<name>, torchvision:<name>, hf:<hub id or folder> or efficientnet_lite0"
        article = "an" if modality == "image" else "a"
        raise UserError(f"--model {recipe.model_name}: reads {model_modality(recipe.model_name, modality)}s, but "
                        f"--task {recipe.task} needs {article} {modality} model ({hint})")
