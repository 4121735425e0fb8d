"""Detectors: torchvision's Faster R-CNN, its box predictor replaced for the data's classes (background
included), behind the Source contract.

    torchvision:fasterrcnn_resnet50_fpn(_v2), torchvision:fasterrcnn_mobilenet_v3_large(_320)_fpn
        torchvision's models with their COCO weights (from torchvision's URLs; one line offline)
    fasterrcnn_efficientnet_lite0 (built-in, offline)
        torchvision's FasterRCNN on the built-in ImageNet EfficientNet-Lite0 (timm, stages 3-5: strides 8, 16,
        32) with a new FPN (+ a max-pooled level), RPN and RoI heads

The model folder: model.safetensors (the FasterRCNN's own state dict) and config.json with `detector`:
every constructor argument that rebuilds it (architecture, num_classes with the background, anchors,
thresholds, sizes, mean and std). Batch norms of the backbone are frozen (torchvision's FrozenBatchNorm2d,
timm's for the built-in): detection batches are a few images.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..data.transforms import Preprocessing
from ..errors import UserError, did_you_mean, first_line
from . import folder as mf
from .base import Backbone, Source
from .groups import Group

TORCHVISION = {  # name -> (default min_size, max_size, backbone stages that torchvision can freeze)
    "fasterrcnn_resnet50_fpn": (800, 1333, 5),
    "fasterrcnn_resnet50_fpn_v2": (800, 1333, 5),
    "fasterrcnn_mobilenet_v3_large_fpn": (800, 1333, 6),
    "fasterrcnn_mobilenet_v3_large_320_fpn": (320, 640, 6),
}
BUILTIN_DETECTOR = "fasterrcnn_efficientnet_lite0"
BUILTIN_SIZES = (512, 853)  # min_size, max_size: CPU-sized
BUILTIN_STAGES = 8  # conv_stem (+ bn1), blocks.0 .. blocks.6
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HEADS = "backbone.fpn,rpn,roi_heads"  # what a head-only strategy trains (the new parts, for the built-in)


@dataclass(frozen=True)
class DetectorArgs:
    """What builds a detector and is saved to rebuild it (config.json's `detector`)."""

    architecture: str
    num_classes: int  # with the background
    min_size: int
    max_size: int
    anchor_sizes: tuple[tuple[int, ...], ...] | None = None  # per FPN level; None: the model's own
    aspect_ratios: tuple[tuple[float, ...], ...] | None = None
    nms_threshold: float = 0.5
    score_threshold: float = 0.05
    detections_per_image: int = 100
    trainable_layers: int = 3  # backbone stages that train, from the top
    image_mean: tuple[float, ...] = IMAGENET[0]
    image_std: tuple[float, ...] = IMAGENET[1]
    fpn_channels: int = 128  # the built-in's FPN width
    frozen_norms: bool = False  # torchvision's backbone batch norms are FrozenBatchNorm2d (as when pretrained)
    hard_examples: int = 0  # training only: the RoI loss over the top-k sampled RoIs per image (0: all)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DetectorArgs:
        d = dict(d)
        for k in ("anchor_sizes", "aspect_ratios"):
            if d.get(k) is not None:
                d[k] = tuple(tuple(level) for level in d[k])
        for k in ("image_mean", "image_std"):
            d[k] = tuple(d[k])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def per_level(values: tuple, levels: int) -> tuple[tuple, ...]:
    """--anchor-sizes / --aspect-ratios onto the FPN levels: one size per level when they count the levels,
    else every value at every level."""
    if len(values) == levels and all(isinstance(v, int) for v in values):
        return tuple((v,) for v in values)
    return tuple(tuple(values) for _ in range(levels))


def _set_anchors(model, args: DetectorArgs) -> None:
    """The anchor generator of `args` (a new RPN head when the anchors per location change)."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.rpn import RPNHead

    old = model.rpn.anchor_generator
    sizes = args.anchor_sizes or old.sizes
    ratios = args.aspect_ratios or old.aspect_ratios
    if len(sizes) != len(old.sizes) or len(ratios) != len(old.sizes):
        raise UserError(f"--anchor-sizes/--aspect-ratios: {args.architecture} has {len(old.sizes)} feature levels; "
                        f"give one size per level or sizes shared by all")
    new = AnchorGenerator(tuple(tuple(s) for s in sizes), tuple(tuple(r) for r in ratios))
    if new.num_anchors_per_location() != old.num_anchors_per_location():
        conv = model.rpn.head.conv[0][0] if isinstance(model.rpn.head.conv[0], nn.Sequential) else None
        channels = model.rpn.head.cls_logits.in_channels
        model.rpn.head = RPNHead(channels, new.num_anchors_per_location()[0],
                                 conv_depth=len(model.rpn.head.conv) if conv is not None else 1)
    model.rpn.anchor_generator = new


def _box_predictor(model, num_classes: int) -> None:
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

    model.roi_heads.box_predictor = FastRCNNPredictor(model.roi_heads.box_predictor.cls_score.in_features,
                                                      num_classes)


class _TimmFPN(nn.Module):
    """A timm features-only body and an FPN: {"0", "1", "2", "pool"} -> [B, C, H/s, W/s], s = 8, 16, 32, 64."""

    def __init__(self, body: nn.Module, out_channels: int):
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.feature_info.channels(), out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict:
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


def _builtin(args: DetectorArgs, pretrained: bool) -> nn.Module:
    import timm
    from timm.layers import freeze_batch_norm_2d
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    from .builtin import EfficientNetLite0

    body = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True, out_indices=(2, 3, 4))
    if pretrained:
        full = EfficientNetLite0._new("efficientnet_lite0", True, None, None).module.state_dict()
        missing, _ = body.load_state_dict({k: v for k, v in full.items() if k in body.state_dict()}, strict=False)
        if missing:
            raise RuntimeError(f"efficientnet_lite0 weights do not fit its features: missing {missing[:3]}")
    body = freeze_batch_norm_2d(body)
    anchors = AnchorGenerator(((32,), (64,), (128,), (256,)), ((0.5, 1.0, 2.0),) * 4)
    model = FasterRCNN(_TimmFPN(body, args.fpn_channels), num_classes=args.num_classes,
                       rpn_anchor_generator=anchors,
                       box_roi_pool=MultiScaleRoIAlign(["0", "1", "2"], output_size=7, sampling_ratio=2),
                       **_common(args))
    return model


def _common(args: DetectorArgs) -> dict[str, Any]:
    return dict(min_size=args.min_size, max_size=args.max_size, image_mean=list(args.image_mean),
                image_std=list(args.image_std), box_nms_thresh=args.nms_threshold,
                box_score_thresh=args.score_threshold, box_detections_per_img=args.detections_per_image)


def _torchvision(args: DetectorArgs, pretrained: bool) -> nn.Module:
    import torchvision

    kw = _common(args)
    if not pretrained:
        model = torchvision.models.get_model(args.architecture, weights=None, weights_backbone=None,
                                             num_classes=args.num_classes, **kw)
        if args.frozen_norms:  # a folder of a model that trained from COCO weights: the same layers
            _freeze_norms(model.backbone)
        return model
    try:
        model = torchvision.models.get_model(args.architecture, weights="DEFAULT",
                                             trainable_backbone_layers=args.trainable_layers, **kw)
    except Exception as e:  # noqa: BLE001 - URLError, HTTPError, socket errors...
        raise UserError(f"--model torchvision:{args.architecture}: could not download its COCO weights "
                        f"({first_line(e)}); without internet use the built-in {BUILTIN_DETECTOR}, "
                        f"--weights FILE or --no-pretrained") from None
    _box_predictor(model, args.num_classes)
    return model


def _freeze_norms(module: nn.Module) -> None:
    from torchvision.ops.misc import FrozenBatchNorm2d

    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for k in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, k).copy_(getattr(child, k).detach())
            setattr(module, name, frozen)
        else:
            _freeze_norms(child)


def has_frozen_norms(module: nn.Module) -> bool:
    from torchvision.ops.misc import FrozenBatchNorm2d

    return any(isinstance(m, FrozenBatchNorm2d) for m in module.modules())


def build(args: DetectorArgs, pretrained: bool) -> nn.Module:
    """The detector of `args` (weights: COCO / ImageNet when `pretrained`, else random)."""
    model = _builtin(args, pretrained) if args.architecture == BUILTIN_DETECTOR else _torchvision(args, pretrained)
    if args.anchor_sizes or args.aspect_ratios:
        _set_anchors(model, args)
    if args.architecture == BUILTIN_DETECTOR:
        _freeze_stages(model, args.trainable_layers)
    if args.hard_examples:
        from .hard_examples import enable

        enable(model.roi_heads, args.hard_examples)
    return model


def _freeze_stages(model, trainable: int) -> None:
    """The built-in's stem and blocks below the top `trainable` stages stay frozen (torchvision's
    trainable_backbone_layers does this for its own models)."""
    stages = [["conv_stem", "bn1"]] + [[f"blocks.{i}"] for i in range(BUILTIN_STAGES - 1)]
    frozen = {p for s in stages[:max(0, BUILTIN_STAGES - trainable)] for p in s}
    for name, p in model.backbone.body.named_parameters():
        if name.split(".")[0] in frozen or ".".join(name.split(".")[:2]) in frozen:
            p.requires_grad_(False)


def _preprocessing(args: DetectorArgs) -> Preprocessing:
    return Preprocessing(input_size=args.min_size, mean=tuple(args.image_mean), std=tuple(args.image_std))


def wrap(module: nn.Module, args: DetectorArgs, source: str) -> Backbone:
    # parameters frozen at creation (--trainable-layers) are left out of every layer group: no strategy trains them
    module.finetunekit_fixed = frozenset(n for n, p in module.named_parameters() if not p.requires_grad)
    head = HEADS if args.architecture == BUILTIN_DETECTOR else "rpn,roi_heads"
    return Backbone(module=module, source=source, architecture=args.architecture, head=head,
                    preprocessing=_preprocessing(args),
                    num_features=module.roi_heads.box_predictor.cls_score.in_features,
                    model_args={"detector": args.to_dict()})


class DetectorSource(Source):
    """A torchvision Faster R-CNN (see the module docstring). `create` takes a DetectorArgs-shaped dict."""

    name: ClassVar[str] = "torchvision-detection"
    modality: ClassVar[str] = "image"
    detector: ClassVar[bool] = True
    mlp_head: ClassVar[bool] = False
    loads_in: ClassVar[str] = (
        "plain torchvision: torchvision.models.get_model(architecture, weights=None, weights_backbone=None, "
        "num_classes=N, min_size=..., box_nms_thresh=..., ...) (the `detector` fields of config.json; custom anchors: "
        "rpn_anchor_generator=AnchorGenerator(anchor_sizes, aspect_ratios)) and "
        "load_state_dict(safetensors.torch.load_file(FOLDER/model.safetensors))")

    @classmethod
    def check_name(cls, name: str) -> None:
        if name not in TORCHVISION:
            raise UserError(f"--model torchvision:{name}: not a supported torchvision detector (expected one of "
                            f"{', '.join(TORCHVISION)}){did_you_mean(name, list(TORCHVISION))}")

    @classmethod
    def defaults(cls, name: str) -> tuple[int, int]:
        return TORCHVISION[name][:2]

    @classmethod
    def create(cls, name: str, num_outputs: int, options) -> Backbone:
        """`options`: a DetectorOptions; `num_outputs`: the data's classes (the background is added)."""
        cls.check_name(name)
        min_size, max_size = cls.defaults(name)
        args = options.args(name, num_outputs + 1, min_size, max_size)
        if options.trainable_layers is not None and cls is DetectorSource and \
                not 0 <= options.trainable_layers <= TORCHVISION[name][2]:
            raise UserError(f"--trainable-layers {options.trainable_layers}: {name} has "
                            f"{TORCHVISION[name][2]} backbone stages (0-{TORCHVISION[name][2]})")
        module = build(args, options.pretrained and options.weights is None)
        if args.architecture != BUILTIN_DETECTOR:
            args = replace(args, frozen_norms=has_frozen_norms(module.backbone))
        if options.weights is not None:
            from .weights import read_state_dict

            missing, unexpected = module.load_state_dict(read_state_dict(options.weights), strict=False)
            if missing or unexpected:
                raise UserError(f"--weights {options.weights}: does not fit {name} (missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]})")
        return wrap(module, args, cls.name)

    @classmethod
    def reset_head(cls, backbone: Backbone, num_outputs: int) -> None:
        _box_predictor(backbone.module, num_outputs + 1)

    @classmethod
    def layer_groups(cls, backbone: Backbone) -> list[Group]:
        """Backbone body (stem, stages), then the FPN, RPN and RoI heads (`head`)."""
        fixed = getattr(backbone.module, "finetunekit_fixed", frozenset())
        groups: dict[str, list[str]] = {}
        for n, _ in backbone.module.named_parameters():
            if n in fixed:
                continue
            if backbone.is_head(n):
                key = "head"
            else:
                parts = n.split(".")
                key = ".".join(parts[:4] if parts[2] == "blocks" else parts[:3])
            groups.setdefault(key, []).append(n)
        head = groups.pop("head", [])
        return [Group(k, v) for k, v in groups.items()] + [Group("head", head)]

    @classmethod
    def save(cls, folder: Path, backbone: Backbone, classes: list[str], ours: dict) -> None:
        args = backbone.model_args["detector"]
        config = {"architecture": backbone.architecture, "num_classes": args["num_classes"], "label_names": classes,
                  "detector": args, "finetunekit": {**ours, "preprocessing": backbone.preprocessing.to_dict()}}
        mf.save_tensors({k: v.detach().cpu().contiguous() for k, v in backbone.module.state_dict().items()},
                        folder / mf.WEIGHTS)
        (folder / mf.CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: Path, config: dict) -> tuple[Backbone, str, list[str]]:
        det = mf.field(config, "detector", folder, dict, expected="an object")
        labels = mf.field(config, "label_names", folder, list, check=lambda v: v and all(isinstance(c, str) for c in v),
                          expected="a list of class names")
        try:
            args = DetectorArgs.from_dict(det)
        except (TypeError, ValueError) as e:
            raise UserError(f"{folder / mf.CONFIG}: field detector: {e}") from None
        if args.num_classes != len(labels) + 1:
            raise UserError(f"{folder / mf.CONFIG}: field detector.num_classes: expected {len(labels) + 1} "
                            f"(label_names + the background), got {args.num_classes}")
        state = mf.read_weights(folder)
        module = build(args, pretrained=False)
        try:
            module.load_state_dict(state)
        except RuntimeError as e:
            raise UserError(f"{folder / mf.WEIGHTS}: weights do not fit {args.architecture} "
                            f"({str(e).splitlines()[0][:160]})") from None
        backbone = wrap(module.eval(), args, cls.name)
        return backbone, config.get("finetunekit", {}).get("task", "detection"), list(labels)

    @classmethod
    def load_native(cls, folder: Path) -> nn.Module:
        """Plain torchvision (the torchvision detectors; the built-in needs timm for its body as well)."""
        import torchvision
        from safetensors.torch import load_file
        config = mf.read_config(folder)
        det = config["detector"]
        kw = dict(min_size=det["min_size"], max_size=det["max_size"], image_mean=det["image_mean"],
                  image_std=det["image_std"], box_nms_thresh=det["nms_threshold"],
                  box_score_thresh=det["score_threshold"], box_detections_per_img=det["detections_per_image"])
        module = torchvision.models.get_model(config["architecture"], weights=None, weights_backbone=None,
                                              num_classes=det["num_classes"], **kw)
        if det.get("frozen_norms"):
            _freeze_norms(module.backbone)
        if det.get("anchor_sizes") or det.get("aspect_ratios"):
            _set_anchors(module, DetectorArgs.from_dict(det))  # AnchorGenerator (+ RPNHead when the count changes)
        module.load_state_dict(load_file(str(folder / mf.WEIGHTS)))
        return module.eval()


class BuiltinDetector(DetectorSource):
    name: ClassVar[str] = BUILTIN_DETECTOR
    loads_in: ClassVar[str] = (
        "torchvision + timm: torchvision.models.detection.FasterRCNN over timm's tf_efficientnet_lite0 "
        "(features_only, out_indices 2-4, frozen batch norms) and torchvision's FeaturePyramidNetwork "
        "(docs/detection.md shows the few lines)")

    @classmethod
    def check_name(cls, name: str) -> None:
        pass

    @classmethod
    def defaults(cls, name: str) -> tuple[int, int]:
        return BUILTIN_SIZES

    @classmethod
    def create(cls, name: str, num_outputs: int, options) -> Backbone:
        if options.trainable_layers is not None and not 0 <= options.trainable_layers <= BUILTIN_STAGES:
            raise UserError(f"--trainable-layers {options.trainable_layers}: {BUILTIN_DETECTOR} has "
                            f"{BUILTIN_STAGES} backbone stages (0-{BUILTIN_STAGES})")
        return super().create(BUILTIN_DETECTOR, num_outputs, options)


@dataclass(frozen=True)
class DetectorOptions:
    """What a fit asks of a new detector (plain values from the recipe)."""

    pretrained: bool = True
    weights: Path | None = None
    anchor_sizes: tuple[int, ...] | None = None
    aspect_ratios: tuple[float, ...] | None = None
    nms_threshold: float = 0.5
    score_threshold: float = 0.05
    detections_per_image: int = 100
    min_size: int | None = None
    max_size: int | None = None
    trainable_layers: int | None = None
    hard_examples: int = 0

    def args(self, architecture: str, num_classes: int, min_size: int, max_size: int) -> DetectorArgs:
        builtin = architecture == BUILTIN_DETECTOR
        levels = feature_levels(architecture)
        mean, std = ((0.5,) * 3, (0.5,) * 3) if builtin else IMAGENET  # EfficientNet-Lite0's inputs: mean = std = 0.5
        ratios = self.aspect_ratios
        sizes = self.anchor_sizes
        return DetectorArgs(
            architecture, num_classes, self.min_size or min_size, max(self.max_size or max_size, self.min_size or 0),
            anchor_sizes=per_level(sizes, levels) if sizes else None,
            aspect_ratios=tuple(tuple(ratios) for _ in range(levels)) if ratios else None,
            nms_threshold=self.nms_threshold, score_threshold=self.score_threshold,
            detections_per_image=self.detections_per_image,
            trainable_layers=self.trainable_layers if self.trainable_layers is not None else 3,
            image_mean=mean, image_std=std, hard_examples=self.hard_examples)


def feature_levels(architecture: str) -> int:
    """Anchor levels: the built-in's FPN 4 (strides 8-64), ResNet-50 FPN 5, MobileNet FPN 3."""
    return 4 if architecture == BUILTIN_DETECTOR else (5 if "resnet" in architecture else 3)


def model_anchors(architecture: str) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """A detector's default anchor sizes and aspect ratios (torchvision's and the built-in's): one size per
    level for the FPNs of the built-in and ResNet-50; MobileNet's FPN has all five sizes at each of its levels."""
    if architecture == BUILTIN_DETECTOR:
        return (32, 64, 128, 256), (0.5, 1.0, 2.0)
    return (32, 64, 128, 256, 512), (0.5, 1.0, 2.0)
