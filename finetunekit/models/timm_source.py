"""timm models: any `timm:<name>`; pretrained weights from the Hugging Face Hub when reachable."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import timm
from timm.data import resolve_data_config
from torch import nn

from ..data.transforms import Preprocessing
from ..errors import UserError, did_you_mean, first_line
from . import hub
from .base import Backbone
from .groups import Group, timm_groups
from .image import ImageSource


def check_name(name: str) -> None:
    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:1]
        hint = f" (did you mean 'timm:{close[0]}'?)" if close else did_you_mean(name, timm.list_models())
        raise UserError(f"--model timm:{name}: not a timm model{hint}")


def preprocessing_of(module: nn.Module) -> Preprocessing:
    cfg = resolve_data_config({}, model=module)
    return Preprocessing(input_size=int(cfg["input_size"][-1]), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                         interpolation=cfg.get("interpolation", "bicubic"),
                         crop_pct=float(cfg.get("crop_pct", 0.875)), crop_mode=cfg.get("crop_mode", "center"))


def wrap(module: nn.Module, architecture: str, preprocessing: Preprocessing | None = None) -> Backbone:
    classifier = module.get_classifier()
    head = next(n for n, m in module.named_modules() if m is classifier)
    return Backbone(module=module, source="timm", architecture=architecture, head=head,
                    preprocessing=preprocessing or preprocessing_of(module), num_features=module.num_features)


def create_model(name: str, drop_path: float | None = None, dropout: float | None = None, **kwargs) -> nn.Module:
    """timm.create_model, with stochastic depth (drop_path_rate) and dropout before the classifier
    (drop_rate) when asked; an architecture without stochastic depth is a UserError."""
    extra = {"drop_path_rate": drop_path} if drop_path else {}
    if dropout:
        extra["drop_rate"] = dropout
    try:
        return timm.create_model(name, **kwargs, **extra)
    except TypeError as e:
        if "drop_path_rate" in str(e):
            raise UserError(f"--drop-path: timm's {name} has no stochastic depth") from None
        raise


def _fail_fast_offline(name: str) -> None:
    """Without a route to the Hub (and no cached weights), fail now rather than after minutes of retries."""
    cfg = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id and hub.cached(hub_id, ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")):
        return
    reason = hub.unreachable()
    if reason:
        raise UserError(f"--model timm:{name}: its pretrained weights are not cached and the Hugging Face Hub "
                        f"is out of reach ({reason}); pass --weights FILE, use --no-pretrained, or the built-in "
                        f"offline efficientnet_lite0")


class TimmSource(ImageSource):
    """timm's model contract, as is: reset_classifier, group_matcher, pretrained_cfg, set_input_size,
    set_grad_checkpointing. The folder is timm's own hub format."""

    name: ClassVar[str] = "timm"
    loads_in: ClassVar[str] = (
        'plain timm: timm.create_model("local-dir:FOLDER", pretrained=True) (linear heads; an MLP head '
        "loads with finetunekit.load only)")

    peft_methods: ClassVar[tuple[str, ...]] = ("lora", "dora", "prompt")  # prompt: ViTs (models/vpt.py)

    @classmethod
    def check_name(cls, name: str) -> None:
        check_name(name)

    @classmethod
    def check_peft(cls, spec: str, method: str) -> None:
        super().check_peft(spec, method)
        from . import vpt

        if method == "prompt" and not vpt.supports(spec.partition(":")[2]):
            raise UserError(f"--peft prompt: --model {spec} is not a timm VisionTransformer; visual prompt tuning "
                            f"inserts tokens into a ViT's patch sequence (use --peft lora or dora)")

    @classmethod
    def _new(cls, name: str, pretrained: bool, drop_path: float | None, dropout: float | None) -> Backbone:
        check_name(name)
        if pretrained:
            _fail_fast_offline(name)
        try:
            module = create_model(name, drop_path, dropout, pretrained=pretrained)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - hub/network failures come in many types
            raise UserError(f"--model timm:{name}: could not get its pretrained weights from the Hugging Face "
                            f"Hub ({first_line(e)}); without internet, pass --weights FILE or "
                            f"--no-pretrained") from None
        return wrap(module, name)

    @classmethod
    def reset_head(cls, backbone: Backbone, num_outputs: int) -> None:
        backbone.module.reset_classifier(num_outputs)
        backbone.head = wrap(backbone.module, backbone.architecture, backbone.preprocessing).head

    @classmethod
    def layer_groups(cls, backbone: Backbone) -> list[Group]:
        return timm_groups(backbone)

    @classmethod
    def set_input_size(cls, backbone: Backbone, size: int | None) -> None:
        """Fixed-size models (ViTs) are resized with timm's set_input_size, which resamples the position
        embeddings; the size is saved as model_args.img_size, which plain timm's local-dir loader reads."""
        module = backbone.module
        native = backbone.preprocessing.input_size
        if size is not None and size != native and module.pretrained_cfg.get("fixed_input_size", False):
            if not hasattr(module, "set_input_size"):
                raise UserError(f"--image-size {size}: timm's {backbone.architecture} takes {native}px inputs only")
            try:
                module.set_input_size(img_size=(size, size))
            except Exception as e:  # noqa: BLE001 - e.g. a size the patch grid does not divide
                raise UserError(f"--image-size {size}: timm's {backbone.architecture} cannot take it "
                                f"({type(e).__name__}: {str(e).strip()[:160]})") from None
            backbone.model_args["img_size"] = size
        super().set_input_size(backbone, size)

    @classmethod
    def set_grad_checkpointing(cls, backbone: Backbone, enable: bool = True) -> None:
        try:
            backbone.module.set_grad_checkpointing(enable)
        except Exception as e:  # noqa: BLE001 - timm asserts for models without it
            raise UserError(f"gradient checkpointing: timm's {backbone.architecture} does not support it "
                            f"({type(e).__name__}: {str(e).strip()[:120]})") from None

    @classmethod
    def check_architecture(cls, architecture: str, folder: Path) -> None:
        if not timm.is_model(architecture):
            raise UserError(f"{folder / 'config.json'}: field architecture: {architecture!r} is not a timm model")

    @classmethod
    def _rebuild(cls, architecture: str, num_classes: int, model_args: dict[str, Any]) -> Backbone:
        module = timm.create_model(architecture, pretrained=False, num_classes=num_classes, **model_args)
        return wrap(module, architecture)

    @classmethod
    def load_native(cls, folder: Path) -> nn.Module:
        cls._refuse_mlp(folder)
        return timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
