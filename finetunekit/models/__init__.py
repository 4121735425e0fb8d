"""Models: one adapter per source behind the Backbone contract.

    spec                   source
    efficientnet_lite0     images, built-in, offline (timm architecture, weights from a registry package)
    timm:<name>            images, timm (pretrained weights from the Hugging Face Hub)
    torchvision:<name>     images, torchvision (pretrained weights from torchvision's URLs)
    minilm                 text, built-in, offline (all-MiniLM-L6-v2, a Hugging Face folder in a registry package)
    hf:<hub id or folder>  text, transformers (AutoModelForSequenceClassification)
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import UserError, did_you_mean
from . import builtin, hf_source, timm_source, torchvision_source
from .base import Backbone
from .heads import apply_head
from .weights import load_weights, read_state_dict

__all__ = ["Backbone", "check_spec", "create_backbone", "create_text_backbone", "modality", "rebuild_backbone"]

log = logging.getLogger("finetunekit")

_SOURCES = {"timm": timm_source, "torchvision": torchvision_source, "hf": hf_source}


def _parse(spec: str) -> tuple[str, str]:
    if spec in builtin.BUILTIN or spec in builtin.TEXT_BUILTIN:
        return "builtin", spec
    source, _, name = spec.partition(":")
    if source not in _SOURCES or not name:
        raise UserError(f"--model {spec}: expected timm:<name>, torchvision:<name>, hf:<hub id or folder>, or "
                        f"one of the built-in {sorted(builtin.BUILTIN) + sorted(builtin.TEXT_BUILTIN)}"
                        f"{did_you_mean(spec, list(builtin.BUILTIN) + list(builtin.TEXT_BUILTIN))}")
    return source, name


def modality(spec: str) -> str:
    """'image' or 'text': what kind of input the model named by `spec` reads."""
    source, name = _parse(spec)
    return "text" if source == "hf" or name in builtin.TEXT_BUILTIN else "image"


def check_spec(spec: str) -> None:
    """Cheap validation of a model spec, before any data is read or weights downloaded."""
    source, name = _parse(spec)
    if source != "builtin":
        _SOURCES[source].check_name(name)


def create_backbone(spec: str, num_classes: int, *, pretrained: bool = True, weights: Path | None = None,
                    drop_path: float | None = None, head: str = "linear", dropout: float | None = None) -> Backbone:
    """The model for `spec` with a fresh head of `num_classes` outputs.

    `weights` (a file) replaces the source's pretrained weights; its head is kept when it has the same
    number of classes.
    """
    source, name = _parse(spec)
    use_hub = pretrained and weights is None
    create = builtin.create if source == "builtin" else _SOURCES[source].create
    backbone = create(name, use_hub, drop_path=drop_path, dropout=dropout if head == "linear" else None)
    _SOURCES[backbone.source].replace_head(backbone, num_classes)
    apply_head(backbone, head, dropout)
    if weights is not None:
        load_weights(backbone, read_state_dict(weights), f"--weights {weights}")
    return backbone


def create_text_backbone(spec: str, labels: list[str], kind: str, *, pretrained: bool = True,
                         weights: Path | None = None, trust_remote_code: bool = False) -> Backbone:
    """A transformers encoder with a new sequence-classification head for `kind` (classification,
    multilabel, regression) and `labels`."""
    source, name = _parse(spec)
    folder = builtin.text_folder(name) if source == "builtin" else name
    backbone = hf_source.create(folder, labels, kind, pretrained=pretrained and weights is None,
                                trust_remote_code=trust_remote_code, spec=spec)
    if weights is not None:
        load_weights(backbone, read_state_dict(weights), f"--weights {weights}")
    return backbone


def rebuild_backbone(source: str, architecture: str, num_classes: int, preprocessing, head: str = "linear"
                     ) -> Backbone:
    """An untrained network of a saved architecture (weights are loaded by the caller)."""
    if source == "timm":
        import timm

        module = timm.create_model(architecture, pretrained=False, num_classes=num_classes)
        backbone = timm_source.wrap(module, architecture, preprocessing)
    elif source == "torchvision":
        backbone = torchvision_source.create(architecture, pretrained=False)
        torchvision_source.replace_head(backbone, num_classes)
        backbone.preprocessing = preprocessing
    else:
        raise UserError(f"unknown model source {source!r} in the model folder's config.json")
    apply_head(backbone, head, None)  # dropout is inactive at inference
    return backbone
