"""Models: one adapter per source behind the Backbone contract.

    spec                   source
    efficientnet_lite0     built-in, offline (timm architecture, weights from a registry package)
    timm:<name>            timm (pretrained weights from the Hugging Face Hub)
    torchvision:<name>     torchvision (pretrained weights from torchvision's URLs)
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import UserError
from . import builtin, timm_source, torchvision_source
from .base import Backbone
from .weights import load_weights, read_state_dict

__all__ = ["Backbone", "check_spec", "create_backbone", "rebuild_backbone"]

log = logging.getLogger("finetunekit")

_SOURCES = {"timm": timm_source, "torchvision": torchvision_source}


def _parse(spec: str) -> tuple[str, str]:
    if spec in builtin.BUILTIN:
        return "builtin", spec
    source, _, name = spec.partition(":")
    if source not in _SOURCES or not name:
        raise UserError(f"--model {spec}: expected timm:<name>, torchvision:<name> or one of the built-in "
                        f"{sorted(builtin.BUILTIN)}")
    return source, name


def check_spec(spec: str) -> None:
    """Cheap validation of a model spec, before any data is read or weights downloaded."""
    source, name = _parse(spec)
    if source != "builtin":
        _SOURCES[source].check_name(name)


def create_backbone(spec: str, num_classes: int, *, pretrained: bool = True,
                    weights: Path | None = None) -> Backbone:
    """The model for `spec` with a fresh head of `num_classes` outputs.

    `weights` (a file) replaces the source's pretrained weights; its head is kept when it has the same
    number of classes.
    """
    source, name = _parse(spec)
    use_hub = pretrained and weights is None
    backbone = builtin.create(name, use_hub) if source == "builtin" else _SOURCES[source].create(name, use_hub)
    _SOURCES[backbone.source].replace_head(backbone, num_classes)
    if weights is not None:
        load_weights(backbone, read_state_dict(weights), f"--weights {weights}")
    return backbone


def rebuild_backbone(source: str, architecture: str, num_classes: int, preprocessing) -> Backbone:
    """An untrained network of a saved architecture (weights are loaded by the caller)."""
    if source == "timm":
        import timm

        module = timm.create_model(architecture, pretrained=False, num_classes=num_classes)
        return timm_source.wrap(module, architecture, preprocessing)
    if source == "torchvision":
        backbone = torchvision_source.create(architecture, pretrained=False)
        torchvision_source.replace_head(backbone, num_classes)
        backbone.preprocessing = preprocessing
        return backbone
    raise UserError(f"unknown model source {source!r} in the model folder's config.json")
