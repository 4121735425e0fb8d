"""`finetunekit export RUN --format onnx|torchscript`: a run's best model as a self-describing folder.

    RUN/export/model.onnx (or model.pt)   takes normalized NCHW float32 pixels, or int64 token ids; gives logits
    RUN/export/config.json                task, classes, preprocessing (or max length), the parity figures,
                                          the calibration (the temperature predict divides the logits by)
    RUN/export/tokenizer.json ...         text: the tokenizer files (the `tokenizers` library reads them)

The folder is written beside its place and moved in once complete; an existing one is kept unless
`overwrite`. The inputs the parity gate runs on are the run's own validation samples (split.json; for text,
the validation split made again from recipe.yaml), or `samples` (image files or folders, or a .txt file).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import UserError

FORMATS = ("onnx", "torchscript")
QUANTIZE = ("static", "dynamic")
EXPORT_DIR = "export"
log = logging.getLogger("finetunekit")


def check(run: str | os.PathLike, fmt: str, *, out: str | os.PathLike | None = None, overwrite: bool = False,
          quantize: str | None = None, samples: str | os.PathLike | None = None, batch: int = 8) -> tuple[Path, Path]:
    """The cheap checks, before torch loads: (the model folder, the export folder) or a one-line UserError."""
    from ..errors import did_you_mean

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: expected one of {', '.join(FORMATS)}{did_you_mean(fmt, FORMATS)}")
    if quantize is not None and quantize not in QUANTIZE:
        raise UserError(f"--quantize {quantize}: expected one of {', '.join(QUANTIZE)}")
    if quantize is not None and fmt != "onnx":
        raise UserError(f"--quantize {quantize}: int8 quantization is for --format onnx (ONNX Runtime), "
                        f"not {fmt}")
    if batch < 2:
        raise UserError(f"--batch-size {batch}: expected a value >= 2 (the parity gate checks batch 1 and N)")
    path = Path(run)
    if (path / "model" / "config.json").is_file():
        folder, home = path / "model", path
    elif (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        folder, home = path, path.parent
    else:
        raise UserError(f"{path}: not a finetunekit run or model folder (no model/config.json)")
    task = _task_of(folder)
    if task == "detection" or task.endswith("-detection"):
        raise UserError(f"{path}: export of detection models is not supported yet")
    if task == "seq2seq":
        raise UserError(f"{path}: export of seq2seq models is not supported (its model folder is a standard "
                        f"transformers folder: export it with optimum's ONNX exporter, which splits encoder and decoder)")
    text = task.startswith("text-")
    if quantize == "static" and text:
        raise UserError("--quantize static: calibrated int8 is for image models; text encoders take "
                        "--quantize dynamic")
    if quantize == "dynamic" and not text:
        raise UserError("--quantize dynamic: for transformer text encoders; image models take --quantize static")
    if samples is not None and not Path(samples).exists():
        raise UserError(f"--samples {samples}: no such file or folder")
    target = Path(out) if out else home / EXPORT_DIR
    if target.exists() and not overwrite:
        raise UserError(f"{target}: already exists; pass --overwrite to replace it, or --out DIR")
    return folder, target


def _task_of(folder: Path) -> str:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{folder / 'config.json'}: cannot read it ({e})") from None
    ours = config.get("finetunekit") or {}
    return str(ours.get("task") or config.get("task") or "image-classification")


def export_run(run: str | os.PathLike, fmt: str = "onnx", *, out: str | os.PathLike | None = None,
               overwrite: bool = False, quantize: str | None = None, samples: str | os.PathLike | None = None,
               batch: int = 8, max_accuracy_drop: float = 1.0) -> dict:
    """Export a run's best model; returns the config.json written (its "parity" holds the gate's figures)."""
    folder, target = check(run, fmt, out=out, overwrite=overwrite, quantize=quantize, samples=samples, batch=batch)
    from ..artifacts import load, write_json
    from . import EXPORTERS

    model = load(folder)
    inputs = gate_samples(model, folder, samples, batch)
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        text = model.backbone.adapter.modality == "text"
        result = EXPORTERS[fmt](model.backbone, model.task, staging, samples=inputs,
                                tta=getattr(model, "tta", "none"),
                                max_length=model.max_length if text else None, batch=batch)
        config = describe_model(model, fmt, result, folder)
        if text:
            model.tokenizer.save_pretrained(staging)
            if not (staging / "tokenizer.json").is_file():
                raise UserError(f"{folder}: the tokenizer has no fast version (tokenizer.json), which the "
                                f"onnxruntime path reads; export it with a fast tokenizer")
        if quantize:
            config["int8"] = _int8(model, folder, staging, quantize, inputs, max_accuracy_drop)
        write_json(staging / "config.json", config)
        if target.exists():
            old = target.with_name(target.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    config["path"] = str(target)
    return config


def describe_model(model: Any, fmt: str, result: dict, folder: Path) -> dict:
    """config.json of an export: everything a runtime needs to feed the model and read its outputs."""
    task = model.task
    config: dict[str, Any] = {
        "finetunekit_version": __version__, "format": fmt, "file": result["file"],
        "task": getattr(model, "task_name", None) or _task_of(folder), "kind": task.kind,
        "classes": list(task.classes), "inputs": result["inputs"], "outputs": result["outputs"],
        "exporter": result["exporter"], "parity": result["parity"], "rejected_exporters": result["rejected"],
        "source": str(folder.resolve()),
    }
    if task.kind == "multilabel":
        config["threshold"] = float(task.threshold)
    if getattr(model, "calibration", None):  # model/calibration.json: the graph gives raw logits; the runtime
        config["calibration"] = model.calibration  # divides them by its temperature (docs/calibration.md)
    if model.backbone.adapter.modality == "text":
        tok = model.tokenizer
        config["modality"] = "text"
        config["text"] = {"max_length": int(model.max_length), "text_columns": model.text_columns,
                          "pad_id": int(tok.pad_token_id), "padding_side": tok.padding_side,
                          "tokenizer": "tokenizer.json", "dtype": "int64", "axes": ["batch", "sequence"]}
    else:
        import math

        pre = model.backbone.preprocessing
        config["modality"] = "image"
        config["preprocessing"] = {
            "input_size": pre.input_size, "resize": math.floor(pre.input_size / pre.crop_pct),
            "crop_mode": pre.crop_mode, "crop_pct": pre.crop_pct, "interpolation": pre.interpolation,
            "mean": list(pre.mean), "std": list(pre.std), "scale": 1 / 255, "layout": "NCHW", "dtype": "float32",
            "order": "RGB; resize the shorter side to `resize` (crop_mode squash: both sides), center-crop "
                     "input_size, /255, (x - mean) / std"}
        config["tta"] = getattr(model, "tta", "none")  # part of the graph: the runtime does nothing for it
    return config


def gate_samples(model: Any, folder: Path, samples: str | os.PathLike | None, batch: int) -> list:
    """Real inputs for the parity gate: `samples`, else the run's validation samples (at most `batch`)."""
    text = model.backbone.adapter.modality == "text"
    if samples is not None:
        if text:
            from ..data.tables import read_texts

            found = read_texts(Path(samples), model.text_columns, "--samples")
        else:
            from ..imagefiles import expand_inputs

            found = expand_inputs(samples)
    else:
        found = _validation_samples(folder.parent, text, model)[0]
    if not found:
        raise UserError(f"{folder}: no validation samples recorded with the model for the parity gate; "
                        f"pass --samples (image files or a folder; for text a .txt file)")
    return list(found[:batch]) if len(found) >= 2 else list(found) * 2


def _int8(model: Any, folder: Path, staging: Path, mode: str, gate: list, max_accuracy_drop: float) -> dict:
    """int8 beside the fp32 model (export.int8): calibrated on training images (static), judged on the
    validation split (its labels, where known) or on the gate's inputs."""
    from . import int8

    text = model.backbone.adapter.modality == "text"
    samples, labels = _validation_samples(folder.parent, text, model)
    from_run = bool(samples)
    if not from_run:
        samples, labels = gate, None
    samples = samples[:500]
    labels = labels[:500] if labels is not None else None
    if not text and from_run:
        labels = int8.validation_labels(folder.parent, samples, list(model.task.classes))
    calibration = int8.training_images(folder.parent, samples) if mode == "static" else []
    if mode == "static" and not calibration:
        calibration = list(samples)
        log.warning("int8: the run's training images are not readable; calibrating on the validation inputs")
    entry = int8.quantize(staging, model, mode, calibration=calibration, validation=samples, labels=labels,
                          max_accuracy_drop=max_accuracy_drop)
    return entry


def _validation_samples(run: Path, text: bool, model: Any) -> tuple[list, list | None]:
    """(the run's validation samples, their class indices for text classification, else None)."""
    split_file, recipe_file = run / "split.json", run / "recipe.yaml"
    if not split_file.is_file():
        return [], None
    split = json.loads(split_file.read_text(encoding="utf-8"))
    val = split.get("val") or {}
    if not text:
        files = val.get("files")
        if files is None and val.get("from") and Path(val["from"]).exists():  # a separate --val set
            from ..data.sources import read_labeled_files

            try:
                files = read_labeled_files(Path(val["from"]), "--val").paths
            except UserError:
                files = []
        return [f for f in files or [] if Path(f).is_file()], None
    if not recipe_file.is_file():
        return [], None
    from ..config import read_yaml
    from ..data.tables import resolve_text_splits

    d = read_yaml(recipe_file)["data"]
    seed = (read_yaml(recipe_file).get("train") or {}).get("seed", 0)
    try:
        splits = resolve_text_splits(split.get("task") or model.task_name, Path(d["path"]),
                                     Path(d["val"]) if d.get("val") else None, None,
                                     text_column=d.get("text_column"), label_column=d.get("label_column"),
                                     label_delimiter=d.get("label_delimiter"),
                                     val_fraction=d.get("val_fraction", 0.1), seed=seed,
                                     max_bad_fraction=d.get("max_bad_fraction", 0.05))
    except (UserError, OSError, KeyError):
        return [], None  # the training data moved: --samples
    labels = list(splits.val.targets) if model.task.kind == "classification" else None
    return list(splits.val.texts), labels
