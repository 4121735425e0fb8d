"""Preprocessing (a model's data config) and the train/eval transforms built from it with timm's factory."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

# Augmentation presets: arguments for timm.data.create_transform(is_training=True), plus RandAugment
# (2 ops, magnitude 9) where "randaugment" is set. RandAugment is torchvision's: timm's posterize op can ask
# Pillow >= 11 for 0 bits, which raises mid-epoch.
AUGMENT_PRESETS: dict[str, dict[str, Any]] = {
    "light": dict(scale=(0.35, 1.0), hflip=0.5, color_jitter=None),
    "standard": dict(scale=(0.08, 1.0), hflip=0.5, color_jitter=None, randaugment=True),
    "strong": dict(scale=(0.08, 1.0), hflip=0.5, color_jitter=None, randaugment=True, re_prob=0.25,
                   re_mode="pixel"),  # + random erasing, as timm's ImageNet recipes
}


@dataclass(frozen=True)
class Preprocessing:
    """How a model wants its pixels: the pretrained weights' data config (timm's `pretrained_cfg` terms)."""

    input_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    crop_pct: float = 0.875
    crop_mode: str = "center"

    def with_size(self, size: int | None) -> Preprocessing:
        return self if size is None else replace(self, input_size=size)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(input_size=int(d["input_size"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
                   interpolation=d.get("interpolation", "bilinear"), crop_pct=float(d.get("crop_pct", 0.875)),
                   crop_mode=d.get("crop_mode", "center"))


def build_transform(pre: Preprocessing, augment: str = "none", *, rotate: float = 0.0, elastic: float = 0.0,
                    vflip: bool = False):
    """PIL RGB image -> normalized float tensor [3, H, W]. `augment='none'` with no geometric extras is the
    deterministic eval path. `rotate` (degrees), `elastic` (torchvision's alpha) and `vflip` add the
    geometric augmentations of orientation-free data (medical, aerial, microscopy) to any preset."""
    from timm.data import create_transform
    from torchvision import transforms as T

    common = dict(input_size=pre.input_size, interpolation=pre.interpolation, mean=pre.mean, std=pre.std,
                  crop_pct=pre.crop_pct, crop_mode=pre.crop_mode)
    if augment == "none":
        tf = create_transform(is_training=False, **common)
        preset: dict[str, Any] = {}
    else:
        preset = dict(AUGMENT_PRESETS[augment])
        tf = create_transform(is_training=True, **common, **{k: v for k, v in preset.items() if k != "randaugment"})
    extra = []  # on the PIL image, after crop and flip, before the tensor conversion
    if vflip:
        extra.append(T.RandomVerticalFlip())
    if rotate:
        extra.append(T.RandomRotation(rotate, interpolation=T.InterpolationMode.BILINEAR))
    if elastic:
        extra.append(T.RandomApply([T.ElasticTransform(alpha=float(elastic))], p=0.5))
    if preset.get("randaugment"):
        extra.append(T.RandAugment(num_ops=2, magnitude=9))
    if extra:
        at = next(i for i, t in enumerate(tf.transforms) if "ToTensor" in type(t).__name__)
        tf.transforms[at:at] = extra
    return tf
