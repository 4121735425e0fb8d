"""Explanations of a loaded model's predictions (`finetunekit explain`, docs/explain.md).

    explain_image(model, path, method="gradcam", target=None) -> PIL.Image   the heatmap over the image
    explain_text(model, text, target=None) -> [(word, attribution), ...]      integrated gradients
    render_html(attributions, caption="") -> str                             a self-contained HTML page

`model` is what `finetunekit.load(run)` returns. One module per method family, each registered in
METHODS by its `--method` names (tests/test_explain.py holds them to the CLI's choices):

    cam.py      image models: Grad-CAM and its variants (the grad-cam package)
    tokens.py   text models: integrated gradients over the token embeddings (captum)

This module imports neither torch nor the libraries, so the CLI checks --method before they load.
"""

from __future__ import annotations

from typing import Any

from .cam import METHODS as CAM_METHODS
from .tokens import METHODS as TOKEN_METHODS
from .tokens import render_html

# --method -> (the modality it explains, the family module's name)
METHODS: dict[str, tuple[str, str]] = {**{m: ("image", "cam") for m in CAM_METHODS},
                                       **{m: ("text", "tokens") for m in TOKEN_METHODS}}
DEFAULT_METHOD = {"image": "gradcam", "text": "integrated-gradients"}

__all__ = ["DEFAULT_METHOD", "METHODS", "explain_image", "explain_text", "render_html"]


def explain_image(model: Any, path: Any, method: str = "gradcam", target: str | None = None):
    """The image at `path` (or a PIL image, or an HxWxC uint8 array) as the model sees it (resized and
    center-cropped), with the `method` heatmap for `target` (a class name; default: the predicted class,
    multi-label: the top class, regression: the output) over it, as a PIL image."""
    from . import cam

    return cam.explain(model, path, method, target).overlay


def explain_text(model: Any, text: Any, target: str | None = None) -> list[tuple[str, float]]:
    """Integrated gradients of `target`'s logit (default: the predicted class) over the token embeddings,
    summed per word: [(word, attribution), ...] in text order (a sentence pair: the first text's words,
    then the second's). Their sum is the logit's change from the PAD baseline, up to the reported
    convergence delta (tokens.attribute gives it)."""
    from . import tokens

    return tokens.attribute(model, text, target).words
