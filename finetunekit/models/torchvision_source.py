"""torchvision classification models: `torchvision:<name>` with the weights' own transforms."""

from __future__ import annotations

import torchvision
from torch import nn

from ..data.transforms import Preprocessing
from ..errors import UserError, did_you_mean
from .base import Backbone


def check_name(name: str) -> None:
    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        raise UserError(f"--model torchvision:{name}: not a torchvision classification model"
                        f"{did_you_mean(name, names)}")


def _last_linear(module: nn.Module) -> str:
    """The head is the last nn.Linear in registration order (fc, classifier[-1], heads.head, ...)."""
    linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"--model: {type(module).__name__} has no linear classifier head to replace")
    return linears[-1]


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


def create(name: str, pretrained: bool, drop_path: float | None = None, dropout: float | None = None) -> Backbone:
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
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"--model torchvision:{name}: could not download its pretrained weights "
                        f"({type(e).__name__}: {first}); without internet, pass --weights FILE or "
                        f"--no-pretrained") from None
    head = _last_linear(module)
    return Backbone(module=module, source="torchvision", architecture=name, head=head,
                    preprocessing=_preprocessing(name), num_features=module.get_submodule(head).in_features)


def replace_head(backbone: Backbone, num_classes: int) -> None:
    old = backbone.module.get_submodule(backbone.head)
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    backbone.module.set_submodule(backbone.head, new)
