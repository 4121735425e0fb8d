"""Models: one adapter class per source behind the Source contract (base.py), in one registry
(registry.SOURCES).

    spec                   source
    efficientnet_lite0     images, built-in, offline (timm architecture, weights from a registry package)
    timm:<name>            images, timm (pretrained weights from the Hugging Face Hub)
    torchvision:<name>     images, torchvision (pretrained weights from torchvision's URLs)
    minilm                 text, built-in, offline (all-MiniLM-L6-v2, a Hugging Face folder in a registry package)
    hf:<hub id or folder>  text (AutoModelForSequenceClassification) or, with an image task, images
                           (AutoModelForImageClassification)

The functions below are thin wrappers over the adapters, for the build stages (inputs.py).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from . import folder as model_folder
from .base import Backbone, CreateOptions, Source
from .registry import SOURCES, resolve

__all__ = ["Backbone", "CreateOptions", "SOURCES", "Source", "check_spec", "create_backbone", "create_text_backbone",
           "load_folder", "modality", "resolve"]


def modality(spec: str, task_modality: str | None = None) -> str:
    """'image' or 'text': what kind of input the model named by `spec` reads (for hf:, the task's when
    given, else its config.json's architectures, else text)."""
    return resolve(spec, task_modality)[0].modality


def check_spec(spec: str, task_modality: str | None = None) -> None:
    """Cheap validation of a model spec, before any data is read or weights downloaded."""
    source, name = resolve(spec, task_modality)
    source.check_name(name)


def create_backbone(spec: str, num_classes: int, *, pretrained: bool = True, weights: Path | None = None,
                    drop_path: float | None = None, head: str = "linear", dropout: float | None = None,
                    image_size: int | None = None, labels: list[str] | None = None,
                    kind: str = "classification") -> Backbone:
    """The image model for `spec` with a fresh head of `num_classes` outputs, fed `image_size` px images.

    `weights` (a file) replaces the source's pretrained weights; its head is kept when it has the same
    number of classes. `labels` name the outputs (hf: id2label).
    """
    source, name = resolve(spec, "image")
    options = CreateOptions(pretrained=pretrained, weights=weights, drop_path=drop_path, dropout=dropout, head=head,
                            image_size=image_size, labels=tuple(labels or ()), kind=kind, spec=spec)
    return source.create(name, num_classes, options)


def create_text_backbone(spec: str, labels: list[str], kind: str, *, pretrained: bool = True,
                         weights: Path | None = None, trust_remote_code: bool = False,
                         dropout: float | None = None) -> Backbone:
    """A transformers encoder with a new sequence-classification head for `kind` (classification,
    multilabel, regression) and `labels`; `dropout` sets the classifier's (or hidden) dropout."""
    source, name = resolve(spec, "text")
    if source.modality != "text":
        raise UserError(f"--model {spec}: reads images, not texts")
    options = CreateOptions(pretrained=pretrained, weights=weights, dropout=dropout, labels=tuple(labels), kind=kind,
                            trust_remote_code=trust_remote_code, spec=spec)
    return source.create(name, 1 if kind == "regression" else len(labels), options)


def folder_source(folder: Path, config: dict) -> type[Source]:
    """The adapter of a saved model folder: its recorded source; a Hugging Face folder without one
    (config.json has model_type) by its architectures."""
    ours = config.get("finetunekit", {})
    recorded = ours.get("source")
    if recorded is None:
        if "model_type" not in config:
            raise UserError(f"{folder / model_folder.CONFIG}: field finetunekit.source: missing (not a finetunekit "
                            f"or Hugging Face model folder)")
        archs = config.get("architectures") or []
        from .registry import is_seq2seq

        image = isinstance(archs, list) and any(str(a).endswith("ForImageClassification") for a in archs)
        seq2seq = isinstance(archs, list) and any(is_seq2seq(str(a)) for a in archs)
        recorded = "hf-image" if image else "hf-seq2seq" if seq2seq else "hf"
    if recorded not in SOURCES or SOURCES[recorded].name != recorded:
        names = sorted(k for k, v in SOURCES.items() if v.name == k)
        raise UserError(f"{folder / model_folder.CONFIG}: field finetunekit.source: {recorded!r}, expected one of "
                        f"{', '.join(names)}")
    return SOURCES[recorded]


def load_folder(folder: Path) -> tuple[Backbone, str, list[str], dict]:
    """(backbone in eval mode, task name, classes, the finetunekit section) from a model folder, every field
    and the weights checked first."""
    config = model_folder.read_config(folder)
    mf = model_folder
    mf.field(config, "finetunekit.tta", folder, str, required=False, check=lambda v: v in mf.TTA,
             expected=f"one of {', '.join(mf.TTA)}")
    mf.field(config, "finetunekit.threshold", folder, (int, float, type(None)), required=False,
             check=lambda v: v is None or 0 < v < 1, expected="a number in (0, 1)")
    if "peft" in config.get("finetunekit", {}):  # the adapter of a --peft run, on its rebuilt base model
        from . import adapter_folder

        backbone, task, classes = adapter_folder.load(folder, config)
    else:
        backbone, task, classes = folder_source(folder, config).load(folder, config)
    return backbone, task, classes, config.get("finetunekit", {})
