"""Hugging Face image classifiers: `hf:<hub id or folder>` with an image task, for any model that
transformers' `AutoModelForImageClassification` loads (ViT, DeiT, BEiT, ConvNeXt, Swin, ResNet, ...).

The module is transformers' own model with a new classifier of N outputs (id2label/label2id set;
`ignore_mismatched_sizes` drops the pretrained head), so the saved folder is a standard Hugging Face folder
(save_pretrained of the model and of its image processor). The data config maps the model's
`AutoImageProcessor` onto our Preprocessing. At another input size than the config's `image_size`, the
model is called with `interpolate_pos_encoding=True` (a forward pre-hook, so nothing in the saved folder
changes: plain transformers users pass that argument themselves).
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import ClassVar

from torch import nn

from ..data.transforms import Preprocessing
from ..errors import UserError
from . import folder as mf
from .base import Backbone, CreateOptions
from .heads import apply_head
from .hf_source import (PROBLEM_TYPES, HfSource, blocks_of, head_names, labels_config, load_error, load_pretrained,
                        quiet_transformers, read_id2label, set_dropout, where)

log = logging.getLogger("finetunekit")

# PIL's resampling filters, as transformers' image processors name them (PILImageResampling)
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def preprocessing_of(processor, config) -> Preprocessing:
    """The image processor's mean, std, size, resampling and crop, in timm's terms. A processor that
    resizes to height x width (ViT) is crop_mode 'squash' at crop_pct 1 (the whole image, stretched); one
    that resizes the shortest edge and centre-crops (ConvNeXt, BiT) is crop_mode 'center'."""
    if processor is None:
        size = int(getattr(config, "image_size", 224) or 224)
        return Preprocessing(input_size=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear",
                             crop_pct=1.0, crop_mode="squash")
    normalize = getattr(processor, "do_normalize", True)
    mean = tuple(float(x) for x in processor.image_mean) if normalize else (0.0, 0.0, 0.0)
    std = tuple(float(x) for x in processor.image_std) if normalize else (1.0, 1.0, 1.0)
    resample = getattr(processor, "resample", 2)
    interpolation = _RESAMPLE.get(int(getattr(resample, "value", resample)), "bilinear")
    size = dict(getattr(processor, "size", None) or {})
    crop = dict(getattr(processor, "crop_size", None) or {}) if getattr(processor, "do_center_crop", False) else {}
    if "shortest_edge" in size:
        edge = int(size["shortest_edge"])
        if crop:
            return Preprocessing(int(crop["height"]), mean, std, interpolation, int(crop["height"]) / edge, "center")
        return Preprocessing(edge, mean, std, interpolation, float(getattr(processor, "crop_pct", None) or 1.0),
                             "center")
    side = int(size.get("height") or getattr(config, "image_size", 224))
    if crop:
        return Preprocessing(int(crop["height"]), mean, std, interpolation, int(crop["height"]) / side, "squash")
    return Preprocessing(side, mean, std, interpolation, 1.0, "squash")


def _interpolating(module, args, kwargs):
    return args, {**kwargs, "interpolate_pos_encoding": True}


class HfImageSource(HfSource):
    name: ClassVar[str] = "hf-image"
    modality: ClassVar[str] = "image"
    peft_methods: ClassVar[tuple[str, ...]] = ("lora", "dora")  # not ia3: peft's IA3 table has no image models
    loads_in: ClassVar[str] = (
        "plain transformers: AutoModelForImageClassification.from_pretrained(FOLDER) and "
        "AutoImageProcessor.from_pretrained(FOLDER); trained at another size than config.json's image_size, "
        "call the model with interpolate_pos_encoding=True")

    @classmethod
    def create(cls, name: str, num_outputs: int, options: CreateOptions) -> Backbone:
        from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

        quiet_transformers()
        spec = options.spec or f"hf:{name}"
        at = where(name, spec, "")
        remote = options.trust_remote_code
        labels = options.labels or tuple(str(i) for i in range(num_outputs))
        try:
            config = AutoConfig.from_pretrained(at, **labels_config(labels, options.kind),
                                                problem_type=PROBLEM_TYPES[options.kind], trust_remote_code=remote)
        except Exception as e:  # noqa: BLE001
            raise load_error(spec, "image classification", e) from None
        set_dropout(config, options.dropout, spec)
        if options.drop_path:
            if not hasattr(config, "drop_path_rate"):
                raise UserError(f"--drop-path: {spec} ({type(config).__name__}) has no stochastic depth")
            config.drop_path_rate = options.drop_path
        try:
            if options.pretrained and options.weights is None:
                module = AutoModelForImageClassification.from_pretrained(at, config=config, trust_remote_code=remote,
                                                                         ignore_mismatched_sizes=True)
            else:
                module = AutoModelForImageClassification.from_config(config, trust_remote_code=remote)
        except Exception as e:  # noqa: BLE001 - hub, file and config errors come in many types
            raise load_error(spec, "image classification", e) from None
        try:
            processor = AutoImageProcessor.from_pretrained(at, trust_remote_code=remote)
        except Exception:  # noqa: BLE001 - a folder without preprocessor_config.json
            processor = None
            log.warning("warning: %s has no image processor; using mean = std = 0.5 at %dpx", spec,
                        preprocessing_of(None, config).input_size)
        backbone = cls._wrap(module, processor)
        apply_head(backbone, options.head, None)  # mlp:N: refused
        if options.weights is not None:
            from .weights import load_weights, read_state_dict

            load_weights(backbone, read_state_dict(options.weights), f"--weights {options.weights}")
        cls.set_input_size(backbone, options.image_size)
        return backbone

    @classmethod
    def _wrap(cls, module: nn.Module, processor, preprocessing: Preprocessing | None = None) -> Backbone:
        config = module.config
        width = getattr(config, "hidden_size", None) or (getattr(config, "hidden_sizes", None) or [0])[-1]
        return Backbone(module=module, source=cls.name, architecture=type(module).__name__,
                        head=head_names(module), preprocessing=preprocessing or preprocessing_of(processor, config),
                        num_features=int(width or 0), blocks=blocks_of(module), image_processor=processor)

    @classmethod
    def set_input_size(cls, backbone: Backbone, size: int | None) -> None:
        super().set_input_size(backbone, size)
        module = backbone.module
        native = getattr(module.config, "image_size", None)
        takes = "interpolate_pos_encoding" in inspect.signature(module.forward).parameters
        if native and takes and backbone.preprocessing.input_size != native \
                and not getattr(module, "_finetunekit_interpolates", False):
            module.register_forward_pre_hook(_interpolating, with_kwargs=True)
            module._finetunekit_interpolates = True

    @classmethod
    def save(cls, folder: Path, backbone: Backbone, classes: list[str], ours: dict) -> None:
        module = getattr(backbone.module, "_orig_mod", backbone.module)
        pre = backbone.preprocessing
        module.config.finetunekit = {**ours, "preprocessing": pre.to_dict()}  # ignored by transformers
        module.save_pretrained(folder)  # safetensors
        processor = backbone.image_processor
        if processor is None:
            from transformers import ViTImageProcessor

            processor = ViTImageProcessor(image_mean=list(pre.mean), image_std=list(pre.std))
        processor = type(processor).from_dict(processor.to_dict())  # a copy, resized to what we trained on
        if preprocessing_of(processor, module.config).input_size != pre.input_size:
            size = dict(processor.size)
            if "shortest_edge" in size and getattr(processor, "do_center_crop", False):
                processor.size = {"shortest_edge": round(pre.input_size / pre.crop_pct)}
                processor.crop_size = {"height": pre.input_size, "width": pre.input_size}
            elif "shortest_edge" in size:
                processor.size = {"shortest_edge": pre.input_size}
            else:
                processor.size = {"height": pre.input_size, "width": pre.input_size}
        processor.save_pretrained(folder)

    @classmethod
    def load(cls, folder: Path, config: dict) -> tuple[Backbone, str, list[str]]:
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        task = mf.field(config, "finetunekit.task", folder, str, required=False, default="image-classification",
                        check=lambda v: v in mf.IMAGE_TASKS, expected=f"one of {', '.join(mf.IMAGE_TASKS)}")
        classes = [] if task == "image-regression" else read_id2label(config, folder)
        ours = config.get("finetunekit", {})
        pre = mf.read_preprocessing(config, folder) if "preprocessing" in ours else None
        module = load_pretrained(folder, AutoModelForImageClassification, "id2label")
        try:
            processor = AutoImageProcessor.from_pretrained(folder)
        except Exception:  # noqa: BLE001 - none saved: the preprocessing in config.json is enough
            processor = None
        backbone = cls._wrap(module, processor, pre)
        cls.set_input_size(backbone, None)
        module.eval()
        return backbone, task, classes

    @classmethod
    def load_native(cls, folder: Path) -> nn.Module:
        from transformers import AutoModelForImageClassification

        return AutoModelForImageClassification.from_pretrained(folder).eval()


def architectures(folder: Path) -> list[str]:
    """config.json's `architectures` of a local folder ([] when there is none to read)."""
    import json

    try:
        value = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("architectures")
    except Exception:  # noqa: BLE001 - the loader reports a broken folder, with the field
        return []
    return [a for a in value if isinstance(a, str)] if isinstance(value, list) else []


__all__ = ["HfImageSource", "architectures", "preprocessing_of"]
