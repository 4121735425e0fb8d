"""Common corruptions of images, at severities 1-5 (0: the image unchanged), on [0, 1] pixel images at the
model's input size, through torchvision.transforms.v2.functional.

The severities follow ImageNet-C (Hendrycks & Dietterich 2019): its noise levels and JPEG qualities as they
are; its blur radii (defined at 224 px) scaled to the model's input size, so a blur hides the same fraction
of the image at 64 px as at 224 px; its brightness steps (+0.1 to +0.5 on HSV value) as factors 1.1 to 1.5
(torchvision's adjust_brightness multiplies).

    gaussian-noise   x + N(0, sigma^2), clipped to [0, 1] (gaussian_noise's formula; the noise drawn from
                     each sample's own seed, so it repeats whatever the batch and the device)
    gaussian-blur    gaussian_blur, sigma (px at 224 px) scaled to the input size, kernel 2*ceil(3 sigma)+1
    jpeg             the image rounded to 8 bits and JPEG-encoded at a quality (jpeg), decoded
    brightness       adjust_brightness: every pixel times a factor, clipped to [0, 1]
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import functional as F


@dataclass(frozen=True)
class Corruption:
    parameter: str  # what the severity sets: sigma, sigma_px (blur, in pixels of the input), quality, factor
    levels: tuple[float, ...]  # the parameter at severities 1..5
    apply: Callable[[torch.Tensor, float, Sequence[int]], torch.Tensor]  # (x [B,3,H,W] in [0,1], level, seeds)

    def setting(self, severity: int, size: int) -> float:
        """The parameter at `severity` for images of `size` px (blur: scaled from 224 px)."""
        level = self.levels[severity - 1]
        return round(level * size / 224, 4) if self.parameter == "sigma_px" else level

    def __call__(self, x: torch.Tensor, severity: int, seeds: Sequence[int]) -> torch.Tensor:
        if severity == 0:
            return x
        return self.apply(x, self.setting(severity, x.shape[-1]), seeds)


def gaussian_noise(x: torch.Tensor, sigma: float, seeds: Sequence[int]) -> torch.Tensor:
    noise = torch.stack([torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    return (x + sigma * noise.to(x.device, x.dtype)).clamp(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: float, seeds: Sequence[int]) -> torch.Tensor:
    kernel = 2 * math.ceil(3 * sigma) + 1
    return F.gaussian_blur(x, [kernel, kernel], [sigma, sigma])


def jpeg(x: torch.Tensor, quality: float, seeds: Sequence[int]) -> torch.Tensor:
    pixels = (x * 255).round().clamp(0, 255).to(torch.uint8).cpu()
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its image codecs (for torchcodec); they still work
        warnings.simplefilter("ignore", DeprecationWarning)
        return F.jpeg(pixels, int(quality)).to(x.device, x.dtype) / 255


def brightness(x: torch.Tensor, factor: float, seeds: Sequence[int]) -> torch.Tensor:
    return F.adjust_brightness(x, factor)


# --corruptions name -> the corruption (robustness.CORRUPTION_NAMES lists the same names, torch-free)
CORRUPTIONS: dict[str, Corruption] = {
    "gaussian-noise": Corruption("sigma", (0.08, 0.12, 0.18, 0.26, 0.38), gaussian_noise),
    "gaussian-blur": Corruption("sigma_px", (1.0, 2.0, 3.0, 4.0, 6.0), gaussian_blur),
    "jpeg": Corruption("quality", (25, 18, 15, 10, 7), jpeg),
    "brightness": Corruption("factor", (1.1, 1.2, 1.3, 1.4, 1.5), brightness),
}
