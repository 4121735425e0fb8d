"""torchvision classification models: `torchvision:<name>` with the weights' own transforms."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torchvision
from torch import nn

from ..data.transforms import Preprocessing
from ..errors import UserError, did_you_mean, first_line
from .base import Backbone
from .image import ImageSource, last_linear


def _names() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def check_name(name: str) -> None:
    names = _names()
    if name not in names:
        raise UserError(f"--model torchvision:{name}: not a torchvision classification model"
                        f"{did_you_mean(name, names)}")


def _preprocessing(name: str) -> Preprocessing:
    weights = torchvision.models.get_model_weights(name).DEFAULT
    kw = weights.transforms.keywords  # functools.partial(ImageClassification, crop_size=..., ...)
    crop = kw.get("crop_size", 224)
    resize = kw.get("resize_size", 256)
    resize = resize[0] if isinstance(resize, (list, tuple)) else resize
    interp = kw.get("interpolation", torchvision.transforms.InterpolationMode.BILINEAR)
    return Preprocessing(input_size=crop, mean=tuple(kw.get("mean", (0.485, 0.456, 0.406))),
                         std=tuple(kw.get("std", (0.229, 0.224, 0.225))), interpolation=interp.value,
                         crop_pct=crop / resize, crop_mode="center")


def _wrap(module: nn.Module, name: str) -> Backbone:
    head = last_linear(module)
    return Backbone(module=module, source="torchvision", architecture=name, head=head,
                    preprocessing=_preprocessing(name), num_features=module.get_submodule(head).in_features)


class TorchvisionSource(ImageSource):
    """torchvision's models; the folder is written in timm's format (config.json), with torchvision's
    tensor names."""

    name: ClassVar[str] = "torchvision"
    loads_in: ClassVar[str] = (
        "plain torchvision: torchvision.models.get_model(architecture, num_classes=N, **model_args) and "
        "load_state_dict(safetensors.torch.load_file(FOLDER/model.safetensors)) (linear heads). Plain timm "
        "only where timm has a model of the same name and the same tensor names (the ResNets: resnet18, "
        "resnet50, ...); others (mobilenet_v3_small, vit_b_16, ...) do not load in timm")

    @classmethod
    def check_name(cls, name: str) -> None:
        check_name(name)

    @classmethod
    def _new(cls, name: str, pretrained: bool, drop_path: float | None, dropout: float | None) -> Backbone:
        check_name(name)
        if dropout:
            raise UserError(f"--dropout: torchvision's {name} keeps its own dropout; with --head mlp:N the MLP "
                            f"head takes --dropout")
        extra = {"stochastic_depth_prob": drop_path} if drop_path else {}
        try:
            module = torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None, **extra)
        except TypeError as e:
            if "stochastic_depth_prob" in str(e):
                raise UserError(f"--drop-path: torchvision's {name} has no stochastic depth") from None
            raise
        except Exception as e:  # noqa: BLE001 - URLError, HTTPError, socket errors...
            raise UserError(f"--model torchvision:{name}: could not download its pretrained weights "
                            f"({first_line(e)}); without internet, pass --weights FILE or "
                            f"--no-pretrained") from None
        return _wrap(module, name)

    @classmethod
    def reset_head(cls, backbone: Backbone, num_outputs: int) -> None:
        old = backbone.module.get_submodule(backbone.head)
        new = nn.Linear(old.in_features, num_outputs, bias=old.bias is not None)
        backbone.module.set_submodule(backbone.head, new)

    @classmethod
    def set_input_size(cls, backbone: Backbone, size: int | None) -> None:
        """A VisionTransformer takes another size with its position embeddings resampled by torchvision's
        interpolate_embeddings (bicubic), saved as model_args.image_size; CNNs take any size as they are."""
        from torchvision.models.vision_transformer import VisionTransformer, interpolate_embeddings

        module = backbone.module
        if size is not None and isinstance(module, VisionTransformer) and size != module.image_size:
            if size % module.patch_size:
                raise UserError(f"--image-size {size}: torchvision's {backbone.architecture} needs a multiple of "
                                f"its patch size {module.patch_size}")
            state = interpolate_embeddings(size, module.patch_size,
                                           {"encoder.pos_embedding": module.encoder.pos_embedding.data})
            pos = state["encoder.pos_embedding"]  # [1, 1 + (size / patch)^2, hidden]
            module.encoder.pos_embedding = nn.Parameter(pos, requires_grad=module.encoder.pos_embedding.requires_grad)
            module.image_size, module.seq_length = size, pos.shape[1]
            backbone.model_args["image_size"] = size
        super().set_input_size(backbone, size)

    @classmethod
    def check_architecture(cls, architecture: str, folder: Path) -> None:
        if architecture not in _names():
            raise UserError(f"{folder / 'config.json'}: field architecture: {architecture!r} is not a torchvision "
                            f"classification model")

    @classmethod
    def _rebuild(cls, architecture: str, num_classes: int, model_args: dict[str, Any]) -> Backbone:
        module = torchvision.models.get_model(architecture, weights=None, **model_args)
        backbone = _wrap(module, architecture)
        cls.reset_head(backbone, num_classes)
        return backbone

    @classmethod
    def load_native(cls, folder: Path) -> nn.Module:
        from safetensors.torch import load_file

        config = cls._refuse_mlp(folder)
        module = torchvision.models.get_model(config["architecture"], weights=None,
                                              num_classes=config["num_classes"], **config.get("model_args", {}))
        module.load_state_dict(load_file(str(folder / "model.safetensors")))
        return module.eval()

