"""The registry of model sources, and what a `--model` value resolves to.

    --model                  adapter                   reads
    efficientnet_lite0       builtin.EfficientNetLite0  images (a timm backbone)
    timm:<name>              TimmSource                 images
    torchvision:<name>       TorchvisionSource          images
    minilm                   builtin.MiniLM             text (a transformers backbone)
    fasterrcnn_efficientnet_lite0  detection.BuiltinDetector  images, --task detection (torchvision + timm)
    torchvision:fasterrcnn_* detection.DetectorSource   images, --task detection (the task's kind "detection")
    hf:<hub id or folder>    HfTextSource (text tasks), HfImageSource (image tasks), HfSeq2SeqSource (--task
                             seq2seq); without a task: from the folder's config.json architectures, else text

tests/test_adapters.py checks that these keys are what config.MODEL_PREFIXES and config.BUILTIN_MODELS
accept.
"""

from __future__ import annotations

from ..config import BUILTIN_MODELS, MODEL_PREFIXES
from ..errors import UserError, did_you_mean
from .base import Source
from .builtin import EfficientNetLite0, MiniLM
from .detection import TORCHVISION as TORCHVISION_DETECTORS
from .detection import BuiltinDetector, DetectorSource
from .hf_image import HfImageSource, architectures
from .hf_seq2seq import HfSeq2SeqSource
from .hf_source import HfTextSource, _local
from .timm_source import TimmSource
from .torchvision_source import TorchvisionSource

SOURCES: dict[str, type[Source]] = {
    "timm": TimmSource,
    "torchvision": TorchvisionSource,
    "hf": HfTextSource,
    "hf-image": HfImageSource,
    "hf-seq2seq": HfSeq2SeqSource,
    "efficientnet_lite0": EfficientNetLite0,
    "minilm": MiniLM,
    "torchvision-detection": DetectorSource,
    "fasterrcnn_efficientnet_lite0": BuiltinDetector,
}
# a prefix whose models read either kind of input (or are detectors): the key of each kind's adapter
BY_MODALITY = {"hf": {"text": "hf", "image": "hf-image", "seq2seq": "hf-seq2seq"},
               "torchvision": {"image": "torchvision", "detection": "torchvision-detection"}}


def is_seq2seq(architecture: str) -> bool:
    """A transformers encoder-decoder LM class name (T5ForConditionalGeneration, MarianMTModel, ...)."""
    return architecture.endswith(("ForConditionalGeneration", "MTModel"))


def parse(spec: str) -> tuple[str, str]:
    """(prefix or built-in name, the rest) of a --model value."""
    if spec in BUILTIN_MODELS:
        return spec, spec
    prefix, _, name = spec.partition(":")
    if prefix not in MODEL_PREFIXES or not name:
        raise UserError(f"--model {spec}: expected timm:<name>, torchvision:<name>, hf:<hub id or folder>, or "
                        f"one of the built-in {sorted(BUILTIN_MODELS)}{did_you_mean(spec, list(BUILTIN_MODELS))}")
    return prefix, name


def resolve(spec: str, modality: str | None = None) -> tuple[type[Source], str]:
    """The adapter for `spec` and the name it takes. `modality` (the task's) decides for hf:."""
    prefix, name = parse(spec)
    kinds = BY_MODALITY.get(prefix)
    if kinds is None:
        return SOURCES[prefix], name
    if modality is None and prefix == "torchvision":  # without a task, the name says which
        modality = "detection" if name in TORCHVISION_DETECTORS else "image"
    if modality is None:
        local = _local(name)
        archs = architectures(local) if local is not None else []
        image = any(a.endswith("ForImageClassification") for a in archs)
        modality = "image" if image else "seq2seq" if any(is_seq2seq(a) for a in archs) else "text"
    return SOURCES[kinds.get(modality, kinds["image"])], name
