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
    # on the PIL image, after crop and flip, before the tensor conversion
    extra = _extras(T, vflip=vflip, rotate=rotate, elastic=elastic, randaugment=bool(preset.get("randaugment")))
    if extra:
        at = next(i for i, t in enumerate(tf.transforms) if "ToTensor" in type(t).__name__)
        tf.transforms[at:at] = extra
    return tf


def _extras(ns, *, vflip: bool, rotate: float, elastic: float, randaugment: bool) -> list:
    """The augmentations added after crop and flip, from `ns`: torchvision.transforms (PIL images) or
    torchvision.transforms.v2 (uint8 tensors), which name them alike."""
    ops: list[Any] = []
    if vflip:
        ops.append(ns.RandomVerticalFlip())
    if rotate:
        ops.append(ns.RandomRotation(rotate, interpolation=ns.InterpolationMode.BILINEAR))
    if elastic:
        ops.append(ns.RandomApply([ns.ElasticTransform(alpha=float(elastic))], p=0.5))
    if randaugment:
        ops.append(ns.RandAugment(num_ops=2, magnitude=9))
    return ops


class ShorterSide:
    """PIL image -> the same image with its shorter side at most `size` pixels (aspect ratio kept; never
    enlarged): how the decoded-image cache stores training images, a little larger than the random crops
    taken from them."""

    def __init__(self, size: int, interpolation: str = "bilinear"):
        self.size, self.interpolation = size, interpolation

    def __call__(self, im):
        from PIL import Image

        w, h = im.size
        if min(w, h) <= self.size:
            return im
        scale = self.size / min(w, h)
        resample = Image.Resampling.BICUBIC if self.interpolation == "bicubic" else Image.Resampling.BILINEAR
        return im.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample)

    def __repr__(self) -> str:
        return f"ShorterSide(size={self.size}, interpolation={self.interpolation})"


class RandomResizedCropFlip:
    """The random resized crop (timm's parameters, drawn from Python's `random` as its PIL transform does)
    and the random horizontal flip of the training presets, on a uint8 tensor [3, H, W]: a slice, torch's
    antialiased uint8 resize, a flip. About twice as fast per image as v2.RandomResizedCrop +
    v2.RandomHorizontalFlip, whose parameter draws and dispatch cost more than the resize itself on small
    images."""

    def __init__(self, size: int, scale: tuple[float, float], hflip: float, interpolation: str = "bilinear"):
        self.size, self.scale, self.hflip, self.interpolation = size, tuple(scale), hflip, interpolation

    def __call__(self, x):
        import random

        from timm.data.transforms import RandomResizedCropAndInterpolation
        from torch.nn.functional import interpolate

        top, left, h, w = RandomResizedCropAndInterpolation.get_params(x, self.scale, (3 / 4, 4 / 3))
        x = interpolate(x[None, :, top:top + h, left:left + w], size=(self.size, self.size),
                        mode="bicubic" if self.interpolation == "bicubic" else "bilinear",
                        antialias=h > self.size or w > self.size)[0]  # enlarging: the same, 20 % faster
        return x.flip(-1) if random.random() < self.hflip else x

    def __repr__(self) -> str:
        return (f"RandomResizedCropFlip(size={self.size}, scale={self.scale}, ratio=(3/4, 4/3), hflip={self.hflip}, "
                f"interpolation={self.interpolation})")


class PixelErasing:
    """timm's random erasing (mode 'pixel', one rectangle) on a uint8 image [3, H, W]: with probability `p`,
    a rectangle of 2-33 % of the area (aspect 0.3-3.3) is filled with per-pixel normal noise of the
    normalized space, i.e. mean + std x N(0, 1) in pixel values."""

    def __init__(self, p: float, mean, std):
        self.p, self.mean, self.std = p, tuple(mean), tuple(std)

    def __call__(self, x):
        import torch
        from torchvision.transforms import RandomErasing

        if torch.rand(1).item() >= self.p:
            return x
        i, j, h, w, noise = RandomErasing.get_params(x, scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), value=None)
        mean = torch.tensor(self.mean).view(3, 1, 1) * 255
        std = torch.tensor(self.std).view(3, 1, 1) * 255
        x = x.clone()
        x[:, i:i + h, j:j + w] = (mean + std * noise).round_().clamp_(0, 255).to(torch.uint8)
        return x

    def __repr__(self) -> str:
        return f"PixelErasing(p={self.p}, mean={self.mean}, std={self.std})"


def build_tensor_transform(pre: Preprocessing, augment: str = "none", *, rotate: float = 0.0,
                           elastic: float = 0.0, vflip: bool = False):
    """`build_transform` for the decoded-image cache: (how each image is stored, once: a PIL -> PIL
    callable; what runs on the stored uint8 tensor [3, H, W] every epoch: torchvision v2 ops, or None).
    Normalization is in neither: whole uint8 batches are normalized where they are trained (data.decoded.Normalize).

    Without augmentation the stored image is exactly what the eval transform feeds to its tensor
    conversion (resize, centre crop). With augmentation, images are stored with the shorter side at
    input_size / crop_pct (never enlarged) and the random resized crop runs on the stored pixels."""
    import math

    from torchvision.transforms import Compose
    from torchvision.transforms import v2

    ops: list[Any] = []
    if augment == "none":
        tf = build_transform(pre, "none")
        at = next(i for i, t in enumerate(tf.transforms) if "ToTensor" in type(t).__name__)
        store: Any = Compose(tf.transforms[:at])
        preset: dict[str, Any] = {}
    else:
        preset = AUGMENT_PRESETS[augment]
        store = ShorterSide(math.ceil(pre.input_size / pre.crop_pct), pre.interpolation)
        ops.append(RandomResizedCropFlip(pre.input_size, preset["scale"], preset["hflip"], pre.interpolation))
    ops += _extras(v2, vflip=vflip, rotate=rotate, elastic=elastic, randaugment=bool(preset.get("randaugment")))
    if preset.get("re_prob"):
        ops.append(PixelErasing(preset["re_prob"], pre.mean, pre.std))
    return store, (v2.Compose(ops) if ops else None)
