"""`finetunekit explain RUN IMAGE... | --text TEXT`: the checks before torch loads, then one file and one line
per input (docs/explain.md).

    images  OUT/<stem>.<method>.png (the overlay) and .npy (the heatmap, [H, W] float32 in [0, 1])
            line: PATH: predicted CLASS (P), explained CLASS (P) -> OUT/<stem>.<method>.png
    texts   OUT/text-<i>.html
            line: 'TEXT': predicted CLASS (P), explained CLASS (P); top: WORD +A, ... -> OUT/text-<i>.html
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError, did_you_mean
from . import DEFAULT_METHOD, METHODS


@dataclass
class Request:
    run: str
    images: list[str]
    texts: list[str]
    method: str | None = None
    target: str | None = None
    layer: str | None = None
    out: str | None = None
    steps: int = 50


def check(request: Request) -> None:
    """Every check that needs neither torch nor the model: the run, the inputs, --method, --steps."""
    if not Path(request.run).exists():
        raise UserError(f"{request.run}: no such run or model folder")
    if not request.images and not request.texts:
        raise UserError("explain: give image files or folders, or --text TEXT")
    if request.images and request.texts:
        raise UserError("explain: give images or --text, not both (a model reads one kind)")
    for item in request.images:
        if not Path(item).exists():
            raise UserError(f"{item}: no such file or folder")
    if request.method is not None and request.method not in METHODS:
        raise UserError(f"--method {request.method}: expected one of {', '.join(METHODS)}"
                        f"{did_you_mean(request.method, METHODS)}")
    if request.steps < 1:
        raise UserError(f"--steps {request.steps}: expected an integer >= 1")


def _method(request: Request, modality: str) -> str:
    method = request.method or DEFAULT_METHOD[modality]
    if METHODS[method][0] != modality:
        takes = ", ".join(m for m, (kind, _) in METHODS.items() if kind == modality)
        raise UserError(f"--method {method}: explains {METHODS[method][0]} models; this one reads {modality}s "
                        f"(--method {takes})")
    return method


def _unique(folder: Path, stem: str, suffix: str, used: set[Path]) -> Path:
    """folder/stem+suffix, or stem-2+suffix, ... when an earlier input of this command already wrote it."""
    candidate, n = folder / f"{stem}{suffix}", 1
    while candidate in used:
        n += 1
        candidate = folder / f"{stem}-{n}{suffix}"
    used.add(candidate)
    return candidate


def run(request: Request, say: Callable[[str], None] = print) -> list[Path]:
    """Load the model, check what needs it (modality, task, --target, --layer), explain each input."""
    check(request)
    from ..artifacts import load
    from ..inference import TextModel
    from . import targets

    model = load(request.run)
    targets.check_task(model)
    modality = "text" if isinstance(model, TextModel) else "image"
    if request.texts and modality != "text":
        raise UserError("--text: this is an image model; pass image files or folders")
    if request.images and modality != "image":
        raise UserError(f"{request.images[0]}: this is a text model; pass --text TEXT")
    method = _method(request, modality)
    targets.check_target(model, request.target)
    out = Path(request.out) if request.out else Path(request.run) / "explain"
    if modality == "text":
        if request.layer is not None:
            raise UserError("--layer: for image models (text attributions are over the token embeddings)")
        return _texts(model, request, out, say)
    return _images(model, request, method, out, say)


def _images(model, request: Request, method: str, out: Path, say) -> list[Path]:
    from ..imagefiles import expand_inputs, no_images
    from . import cam

    cam.require()
    found = [f for item in request.images for f in expand_inputs(item)]
    if not found:
        raise UserError(no_images(", ".join(request.images)))
    cam.target_layer(model, request.layer)  # a bad --layer fails before the first image
    written, used = [], set()
    for path in found:
        e = cam.explain(model, path, method, request.target, request.layer)
        png, _ = cam.save(e, _unique(out, Path(path).stem, f".{method}.png", used))
        say(f"{path}: {e.target.describe()} -> {png}")
        written.append(png)
    return written


def _texts(model, request: Request, out: Path, say) -> list[Path]:
    from . import tokens

    tokens.require()
    written = []
    for i, text in enumerate(request.texts, 1):
        pair = tuple(part.strip() for part in text.split("|||")) if "|||" in text else text
        e = tokens.attribute(model, pair, request.target, steps=request.steps)
        page = out / f"text-{i}.html"
        out.mkdir(parents=True, exist_ok=True)
        page.write_text(tokens.render_html(e.words, tokens.caption_of(e), e.spaces), encoding="utf-8")
        shown = text if len(text) <= 60 else text[:57] + "..."
        say(f"{shown!r}: {e.target.describe()}; top: {tokens.summary(e.words)} -> {page}")
        written.append(page)
    return written

