"""Class activation maps for image models: Grad-CAM and its variants from the `grad-cam` package
(`pytorch_grad_cam`), on timm, torchvision and Hugging Face classifiers, CNNs and ViTs alike.

The target layer is found by one probing pass, the same way for every source (no per-library table): a
seeded random image of the model's input size goes forward with a hook on every module, and back from the
top logit. A candidate is a module outside the head, called once, whose output is not its input, and is

    a feature map   [1, C, h, h] (NCHW), or [1, h, h, C] (NHWC: Swin, ConvNeXt's inner blocks), h >= 2
    a token grid    [1, p + g*g, C] out of a normalization layer (LayerNorm, RMSNorm), with g >= 2 and
                    p <= 8 leading class/register tokens (ViTs: p is dropped and the g*g patch tokens are
                    laid back on their grid: grad-cam's reshape transform)

and whose output's spatial positions receive a gradient from the logit. The last candidate to run wins:
a CNN's last feature map before global pooling (timm EfficientNet `bn2`, torchvision ResNet `layer4`), and
a ViT's last block's first LayerNorm (`blocks.11.norm1`): after it, a class-token model reads no patch
token any more, so the later token outputs get no gradient there (an average-pooling ViT: its last
norm). Token outputs count only out of norms (not attention's q/k/v projections), and in a model with
them feature maps count only before the first (a hybrid's convolutional stem), so attention maps
([1, heads, N, N]) never do. `--layer NAME` names the layer instead.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError, did_you_mean

# --method -> the pytorch_grad_cam class. Left out: ablationcam (replaces the layer in the model; ViTs need
# their own ablation layer), fullgrad (every bias layer, not one target layer), finercam and shapleycam
# (need comparison targets / second derivatives), randomcam (a baseline, not an explanation).
METHODS: dict[str, str] = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "xgradcam": "XGradCAM",
    "hirescam": "HiResCAM",
    "layercam": "LayerCAM",
    "gradcam-elementwise": "GradCAMElementWise",
    "eigencam": "EigenCAM",
    "eigengradcam": "EigenGradCAM",
    "scorecam": "ScoreCAM",
}
MAX_PREFIX_TOKENS = 8  # class + distillation + register tokens before the patch tokens
DISPLAY_SIZE = 224  # overlays of smaller inputs are enlarged to at least this side


@dataclass(frozen=True)
class Layer:
    """The layer a CAM reads, and how its output becomes a [B, C, h, w] map."""

    name: str
    layout: str  # "nchw" | "nhwc" | "tokens"
    grid: int  # h = w of the map
    prefix: int = 0  # tokens: leading class/register tokens dropped
    shape: tuple[int, ...] = ()  # its output's shape for one image

    def reshape(self):
        """grad-cam's reshape_transform for this layout (None: already NCHW)."""
        if self.layout == "nhwc":
            return lambda t: t.permute(0, 3, 1, 2)
        if self.layout == "tokens":
            p, g = self.prefix, self.grid
            return lambda t: t[:, p:, :].reshape(t.size(0), g, g, t.size(2)).permute(0, 3, 1, 2)
        return None


@dataclass
class ImageExplanation:
    overlay: Any  # PIL.Image: the model's view of the image with the heatmap over it
    heatmap: Any  # np.ndarray [H, W] float32 in [0, 1], at the model's input size
    target: Any  # targets.Target
    layer: Layer
    method: str


def require() -> None:
    """A one-line UserError when the grad-cam package is missing."""
    try:
        import pytorch_grad_cam  # noqa: F401
    except ImportError:
        raise UserError("explain: image explanations need the grad-cam package "
                        "(pip install 'finetunekit[explain]')") from None


def check_method(method: str) -> None:
    if method not in METHODS:
        raise UserError(f"--method {method}: expected one of {', '.join(METHODS)}{did_you_mean(method, METHODS)}")


@dataclass
class _Seen:
    name: str
    order: int  # when its forward finished, among all modules
    calls: int
    output: Any
    passthrough: bool
    in_head: bool
    is_norm: bool  # a normalization layer (LayerNorm, RMSNorm, ...): the token outputs that count


def _layout(shape: tuple[int, ...]) -> tuple[str, int, int] | None:
    """(layout, grid, prefix) of one image's output shape, or None when it is not a map of the image."""
    if len(shape) == 4 and shape[0] == 1:
        if shape[2] == shape[3] >= 2:
            return "nchw", shape[2], 0
        if shape[1] == shape[2] >= 2:
            return "nhwc", shape[1], 0
    if len(shape) == 3 and shape[0] == 1:
        g = math.isqrt(shape[1])
        if g >= 2 and shape[1] - g * g <= MAX_PREFIX_TOKENS:
            return "tokens", g, shape[1] - g * g
    return None


def _gets_gradient(output, layer: Layer) -> bool:
    grad = output.grad
    if grad is None:
        return False
    if layer.layout == "tokens":
        grad = grad[:, layer.prefix:]
    return bool(grad.abs().sum() > 0)


def _probe(model) -> dict[str, _Seen]:
    """Every module's output for a seeded random image of the model's input size, with its gradient from
    the top logit."""
    import torch

    from ..tasks import logits_of

    module, backbone = model.module, model.backbone
    seen: dict[str, _Seen] = {}
    counter = iter(range(1 << 30))

    def hook(name):
        def record(mod, inputs, output):
            if name in seen:
                seen[name].calls += 1
                return
            passthrough = isinstance(output, torch.Tensor) and any(output is i for i in inputs)
            seen[name] = _Seen(name, next(counter), 1, output, passthrough, backbone.is_head(name),
                               "norm" in type(mod).__name__.lower())
            if isinstance(output, torch.Tensor) and output.requires_grad and not passthrough:
                output.retain_grad()
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in module.named_modules() if n]
    size = backbone.preprocessing.input_size
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(model.device)
    was_training = module.training
    module.eval()
    try:
        with torch.enable_grad():
            logits = logits_of(module, x.requires_grad_())
            logits[0].max().backward()
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
        module.zero_grad(set_to_none=True)
    return seen


def _as_layer(s: _Seen) -> Layer | None:
    import torch

    if not isinstance(s.output, torch.Tensor):
        return None
    shape = tuple(s.output.shape)
    found = _layout(shape)
    return Layer(s.name, found[0], found[1], found[2], shape) if found else None


def _candidates(seen: dict[str, _Seen]) -> list[tuple[_Seen, Layer]]:
    """The probe's candidate layers, in the order they ran (module docstring)."""
    pairs = [(s, layer) for s in sorted(seen.values(), key=lambda s: s.order)
             if s.calls == 1 and not s.passthrough and not s.in_head and (layer := _as_layer(s)) is not None]
    pairs = [(s, layer) for s, layer in pairs if layer.layout != "tokens" or s.is_norm]
    tokens = [s.order for s, layer in pairs if layer.layout == "tokens"]
    if tokens:
        pairs = [(s, layer) for s, layer in pairs if layer.layout == "tokens" or s.order < tokens[0]]
    return [(s, layer) for s, layer in pairs if _gets_gradient(s.output, layer)]


_LAYERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> {--layer or None: Layer}


def target_layer(model, name: str | None = None) -> Layer:
    """The layer a CAM of `model` reads: found by the probe, or `name` (checked: it exists, it runs once and
    its output is a map of the image). Cached per module."""
    cache = _LAYERS.setdefault(model.module, {})
    if name in cache:
        return cache[name]
    seen = _probe(model)
    candidates = _candidates(seen)
    if name is None:
        if not candidates:
            raise UserError(f"explain: found no layer of {model.backbone.architecture} whose output is a map of "
                            f"the image (a feature map of at least 2x2, or a grid of patch tokens); name one "
                            f"with --layer")
        cache[None] = candidates[-1][1]
        return cache[None]
    names = [n for n, _ in model.module.named_modules() if n]
    hint = ", ".join(s.name for s, _ in candidates[-5:])
    if name not in names:
        raise UserError(f"--layer {name}: no such module in {model.backbone.architecture}"
                        f"{did_you_mean(name, names)} (candidates: {hint})")
    s = seen.get(name)
    layer = _as_layer(s) if s is not None else None
    if s is None or s.calls != 1 or layer is None:
        what = ("does not run" if s is None else f"runs {s.calls} times per image" if s.calls != 1 else
                f"outputs {_shape_of(s.output)}, not a feature map or a grid of patch tokens")
        raise UserError(f"--layer {name}: {what} (candidates: {hint})")
    cache[name] = layer
    return layer


def _shape_of(output: Any) -> str:
    shape = getattr(output, "shape", None)
    return str(list(shape)) if shape is not None else type(output).__name__


def model_view(model, image) -> Any:
    """The image as the model sees it (the eval transform's resize and center crop), as a PIL image."""
    transforms = model.transform.transforms
    at = next(i for i, t in enumerate(transforms) if "ToTensor" in type(t).__name__)
    for t in transforms[:at]:
        image = t(image)
    return image


def _logits_module(module):
    """`module` returning its logits as a plain tensor (grad-cam calls model(x); transformers return a
    ModelOutput)."""
    import torch

    from ..tasks import logits_of

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return logits_of(self.inner, x)

    return Logits(module)


def explain(model, image: Any, method: str = "gradcam", target: str | None = None,
            layer: str | None = None) -> ImageExplanation:
    """The CAM of `method` for one image (a path, PIL image or HxWxC uint8 array) and `target` (a class
    name; default: the predicted class, multi-label: the top class, regression: the output)."""
    require()
    check_method(method)
    import numpy as np
    import pytorch_grad_cam
    import torch
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from . import targets

    targets.check_task(model)
    targets.check_target(model, target)
    picture = model._image(image)
    view = model_view(model, picture)
    x = model.transform(picture).unsqueeze(0).to(model.device)  # [1, 3, H, W]
    found = target_layer(model, layer)
    module = model.module
    module.eval()
    with torch.no_grad():
        from ..tasks import logits_of

        logits = logits_of(module, x)[0].float().cpu()
    chosen = targets.resolve(model, logits, target)
    cam = getattr(pytorch_grad_cam, METHODS[method])(model=_logits_module(module), target_layers=[
        module.get_submodule(found.name)], reshape_transform=found.reshape())
    try:
        with torch.enable_grad():
            heatmap = cam(input_tensor=x.clone().requires_grad_(), targets=[ClassifierOutputTarget(chosen.index)])
    finally:
        cam.activations_and_grads.release()
        module.zero_grad(set_to_none=True)
    heatmap = np.nan_to_num(heatmap[0].astype(np.float32))
    return ImageExplanation(overlay(view, heatmap), heatmap, chosen, found, method)


def overlay(view, heatmap, weight: float = 0.5):
    """`view` (PIL, the model's input) with `heatmap` ([H, W] in [0, 1]) over it in the jet colormap; inputs
    smaller than DISPLAY_SIZE are enlarged by a whole factor first."""
    import numpy as np
    from PIL import Image
    from pytorch_grad_cam.utils.image import show_cam_on_image

    factor = max(1, math.ceil(DISPLAY_SIZE / max(view.size)))
    if factor > 1:
        size = (view.width * factor, view.height * factor)
        view = view.resize(size, Image.Resampling.BICUBIC)
        heatmap = np.asarray(Image.fromarray(heatmap, mode="F").resize(size, Image.Resampling.BILINEAR))
    rgb = np.asarray(view, dtype=np.float32) / 255
    return Image.fromarray(show_cam_on_image(rgb, np.clip(heatmap, 0, 1), use_rgb=True, image_weight=weight))


def save(explanation: ImageExplanation, png: Path) -> tuple[Path, Path]:
    """The overlay as `png` and the heatmap beside it as .npy."""
    import numpy as np

    png.parent.mkdir(parents=True, exist_ok=True)
    explanation.overlay.save(png)
    npy = png.with_suffix(".npy")
    np.save(npy, explanation.heatmap)
    return png, npy
