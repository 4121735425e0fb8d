"""`finetunekit explain` and finetunekit.explain: Grad-CAM (the grad-cam package) on a hand-set CNN whose right
answer is known, target-layer resolution on timm, torchvision and Hugging Face models (CNNs and ViTs),
integrated gradients' completeness (captum) on a tiny BERT, the HTML page, and the command line on saved
model folders."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import finetunekit
from finetunekit import UserError
from finetunekit.explain import METHODS, cam, explain_image, explain_text, render_html, tokens

from conftest import CIFAR, cli, save_tiny_bert, torch_threads


def _image_model(spec: str, classes: list[str], size: int | None = None, task: str = "image-classification"):
    from finetunekit.inference import ImageModel
    from finetunekit.models import create_backbone
    from finetunekit.tasks import build_task

    torch.manual_seed(0)
    kind = {"image-classification": "classification", "image-multilabel": "multilabel",
            "image-regression": "regression"}[task]
    backbone = create_backbone(spec, max(1, len(classes)), pretrained=False, image_size=size, kind=kind,
                               labels=classes)
    backbone.adapter.set_input_size(backbone, size)
    backbone.module.eval()
    return ImageModel(backbone, build_task(task, classes), Path("."))


def _saved(tmp_path: Path, spec: str, classes: list[str], task: str, size: int | None = 64) -> Path:
    """A model folder written by the exporter the runs use, for finetunekit.load and the CLI."""
    from finetunekit.export import EXPORTERS

    model = _image_model(spec, classes, size, task)
    return EXPORTERS["model-folder"](model.backbone, model.task, tmp_path / "model", spec=spec, task_name=task)


# 1. the registry: every --method is a grad-cam class or the text method, and the CLI offers exactly these

def test_methods_are_the_libraries_and_the_clis():
    import pytorch_grad_cam

    from finetunekit.cli_parser import build_parser as _build_parser

    assert all(isinstance(getattr(pytorch_grad_cam, name), type) for name in cam.METHODS.values())
    assert METHODS == {**{m: ("image", "cam") for m in cam.METHODS}, "integrated-gradients": ("text", "tokens")}
    explain = _build_parser()[0]._subparsers._group_actions[0].choices["explain"]
    help_text = next(a.help for a in explain._actions if "--method" in a.option_strings)
    assert help_text == ("images: gradcam, gradcam++, xgradcam, hirescam, layercam, gradcam-elementwise, eigencam, "
                         "eigengradcam, scorecam (default: gradcam); texts: integrated-gradients "
                         "(default: integrated-gradients)")


# 2. Grad-CAM's heatmap on a hand-set CNN: red and green detectors (1x1 conv, ReLU), global average pooling,
# logit "red" = mean redness, "green" = mean greenness. The image is wider than tall, so the eval transform
# resizes and crops it: the heatmap must follow the patches into the model's view.

class Detectors(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():  # inputs normalized with mean 0.5, std 0.5: a channel at 1.0 reads 1, at 0.5 reads 0
            self.features[0].weight.copy_(torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0]])[:, :, None, None])
            self.features[0].bias.fill_(0.0)
            self.fc.weight.copy_(torch.eye(2))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


@pytest.fixture(scope="module")
def detectors():
    from finetunekit.data.transforms import Preprocessing
    from finetunekit.inference import ImageModel
    from finetunekit.models import Backbone
    from finetunekit.tasks import build_task

    backbone = Backbone(module=Detectors().eval(), source="timm", architecture="detectors", head="fc",
                        preprocessing=Preprocessing(input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3,
                                                    interpolation="bilinear", crop_pct=1.0), num_features=2)
    return ImageModel(backbone, build_task("image-classification", ["red", "green"]), Path("."))


def _patches(size=(96, 64)) -> Image.Image:
    """Gray, 96x64: a red patch at x 16-32, y 0-16 and a green one at x 64-80, y 48-64. Resized to 48x32 and
    center-cropped to 32x32 (x 8-40), the model sees red at [0:8, 0:8] and green at [24:32, 24:32]."""
    a = np.full((size[1], size[0], 3), 128, np.uint8)
    a[0:16, 16:32] = (255, 0, 0)
    a[48:64, 64:80] = (0, 255, 0)
    return Image.fromarray(a)


def test_the_target_layer_of_the_hand_set_cnn_is_its_feature_map(detectors):
    assert cam.target_layer(detectors) == cam.Layer("features", "nchw", 32, 0, (1, 2, 32, 32))


# eigencam and eigengradcam project onto a principal component, whose sign is arbitrary: with two channels it
# can light the background instead; scorecam's softmax over channels gives the other patch a weight too
@pytest.mark.parametrize("method", [m for m in cam.METHODS if not m.startswith("eigen")])
@pytest.mark.parametrize("target, region", [("red", (slice(0, 8), slice(0, 8))),
                                            ("green", (slice(24, 32), slice(24, 32)))])
def test_the_heatmap_lies_on_the_targets_patch(detectors, method, target, region):
    e = cam.explain(detectors, _patches(), method, target)
    assert e.heatmap.shape == (32, 32) and e.heatmap.dtype == np.float32
    peak = np.unravel_index(int(e.heatmap.argmax()), e.heatmap.shape)
    assert region[0].start <= peak[0] < region[0].stop and region[1].start <= peak[1] < region[1].stop, peak
    inside = np.zeros_like(e.heatmap, bool)
    inside[max(0, region[0].start - 1):region[0].stop + 1, max(0, region[1].start - 1):region[1].stop + 1] = True  # the resize's edge
    assert e.heatmap[region].min() > 0.5, method
    assert e.heatmap[~inside].max() < (0.9 if method == "scorecam" else 0.05), method
    assert e.target.label == target and e.target.predicted == "red"  # more red than green after the crop


def test_explain_image_returns_the_overlay_enlarged_and_predicts_by_default(detectors, tmp_path):
    picture = _patches()
    path = tmp_path / "patches.png"
    picture.save(path)
    overlay = explain_image(detectors, str(path))  # the predicted class: red
    assert isinstance(overlay, Image.Image) and overlay.size == (224, 224) and overlay.mode == "RGB"
    jet = np.asarray(overlay, dtype=np.int16)
    hot, cold = jet[8:48, 8:48].mean((0, 1)), jet[100:140, 100:140].mean((0, 1))  # red patch vs gray middle
    assert hot[0] > hot[2] + 100 and cold[2] > cold[0] + 60  # jet: red where the heat is, blue where none
    assert np.array_equal(np.asarray(explain_image(detectors, picture)), np.asarray(overlay))
    with pytest.raises(UserError, match=r"^--target blue: not a class of this model \(expected one of red, green\)"):
        explain_image(detectors, picture, target="blue")
    with pytest.raises(UserError, match=r"^--method gradcm: expected one of gradcam, .* \(did you mean 'gradcam'"):
        explain_image(detectors, picture, method="gradcm")


def test_a_missing_library_is_one_line_naming_the_extra(detectors, tiny_text, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "captum", None)
    with pytest.raises(UserError, match=r"^explain: image explanations need the grad-cam package \(pip install "
                                        r"'finetunekit\[explain\]'\)$"):
        explain_image(detectors, _patches())
    with pytest.raises(UserError, match=r"^explain: text explanations need captum \(pip install "
                                        r"'finetunekit\[explain\]'\)$"):
        explain_text(tiny_text, "fine")


# 3. the target layer of real architectures, and --layer

@pytest.mark.parametrize("spec, size, expected", [
    ("timm:test_efficientnet", 64, ("bn2", "nchw", 2, 0, (1, 256, 2, 2))),
    ("timm:test_efficientnet", 32, ("blocks.4.0.bn1", "nchw", 2, 0, (1, 192, 2, 2))),  # bn2 is 1x1 at 32 px
    ("torchvision:resnet18", 64, ("layer4", "nchw", 2, 0, (1, 512, 2, 2))),
    ("timm:test_vit", None, ("blocks.5.norm1", "tokens", 10, 1, (1, 101, 64))),  # 160 px, class token
    ("timm:test_vit2", None, ("blocks.7.norm2", "tokens", 10, 1, (1, 101, 64))),  # average pooling
])
def test_target_layer_resolution(spec, size, expected):
    model = _image_model(spec, ["a", "b", "c"], size)
    assert cam.target_layer(model) == cam.Layer(*expected)
    e = cam.explain(model, np.full((40, 50, 3), 90, np.uint8))
    assert e.heatmap.shape == (model.backbone.preprocessing.input_size,) * 2 and np.isfinite(e.heatmap).all()


def test_target_layer_of_a_hugging_face_vit(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=64, num_labels=2)).save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    model = _image_model(f"hf:{tmp_path}", ["a", "b"])
    assert cam.target_layer(model) == cam.Layer("vit.layers.1.layernorm_before", "tokens", 4, 1, (1, 17, 32))


def test_layer_option():
    model = _image_model("timm:test_efficientnet", ["a", "b"], 64)
    assert cam.target_layer(model, "blocks.4") == cam.Layer("blocks.4", "nchw", 2, 0, (1, 64, 2, 2))
    with pytest.raises(UserError, match=r"^--layer blocks\.9: no such module in test_efficientnet \(did you mean "
                                        r"'blocks\.4'\?\) \(candidates: blocks\.4\.0, blocks\.4, blocks, conv_head, bn2\)$"):
        cam.target_layer(model, "blocks.9")
    with pytest.raises(UserError, match=r"^--layer global_pool: outputs \[1, 256\], not a feature map or a grid of "
                                        r"patch tokens \(candidates: "):
        cam.target_layer(model, "global_pool")


# 4. integrated gradients on a tiny BERT (seeded, the real MiniLM tokenizer; initialized with std 0.5, so its
# logits move by tenths between the text and the baseline, along a curved path that 5 steps integrate badly)

@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    from finetunekit.export import EXPORTERS
    from finetunekit.models import create_text_backbone
    from finetunekit.tasks import build_task

    d = tmp_path_factory.mktemp("explain-text")
    bert = save_tiny_bert(d / "bert", initializer_range=0.5)
    torch.manual_seed(0)
    backbone = create_text_backbone(f"hf:{bert}", ["negative", "positive"], "classification")
    task = build_task("text-classification", ["negative", "positive"])
    folder = EXPORTERS["model-folder"](backbone, task, d / "model", spec=f"hf:{bert}",
                                       task_name="text-classification", extra={"max_length": 64})
    return finetunekit.load(folder)


def test_integrated_gradients_completeness(tiny_text):
    with torch_threads(1):
        e = tokens.attribute(tiny_text, "a gripping, funny film")
        coarse = tokens.attribute(tiny_text, "a gripping, funny film", steps=5)
    assert [w for w, _ in e.words] == ["a", "gripping", ",", "funny", "film"]  # [CLS]/[SEP] left out
    assert e.target.label == e.target.predicted == "negative" and e.steps == 50
    # captum's delta is exactly the completeness gap: sum - (f(text) - f(baseline)) ...
    for x in (e, coarse):
        assert sum(a for _, a in x.words) - (x.logit - x.baseline_logit) == pytest.approx(x.delta, abs=1e-5)
    # ... small with 50 steps against a logit change of 0.29, large with 5
    assert e.logit - e.baseline_logit == pytest.approx(0.2923, abs=1e-3)
    assert e.delta == pytest.approx(-0.0075, abs=1e-3) and coarse.delta == pytest.approx(1.716, abs=1e-2)
    assert [a for _, a in e.words] == pytest.approx([-0.0795, -1.0701, 0.2749, -0.156, 1.3153], abs=1e-3)
    words = explain_text(tiny_text, "a gripping, funny film")
    assert [w for w, _ in words] == [w for w, _ in e.words]
    assert [a for _, a in words] == pytest.approx([a for _, a in e.words], abs=1e-4)
    other = tokens.attribute(tiny_text, "a gripping, funny film", target="positive")
    assert other.target.label == "positive" and other.target.predicted == "negative"
    assert sum(a for _, a in other.words) - (other.logit - other.baseline_logit) == pytest.approx(other.delta, abs=1e-5)


def test_words_keep_the_texts_spacing(tiny_text):
    e = tokens.attribute(tiny_text, "it's (not) dull!", steps=2)
    assert [w for w, _ in e.words] == ["it", "'", "s", "(", "not", ")", "dull", "!"]
    assert e.spaces == [True, False, False, True, False, False, True, False]
    page = render_html(e.words, spaces=e.spaces)
    assert re.sub(r"<span[^>]*>|</span>", "", re.search(r"<p class=text>(.*)</p>", page).group(1)) == \
        "it&#x27;s (not) dull!"


def test_sentence_pairs_and_errors(tiny_text):
    with pytest.raises(UserError, match=r"^explain: this model reads 1 text\(s\) per sample \(text\), got "):
        explain_text(tiny_text, ("first", "second"))
    with pytest.raises(UserError, match=r"^--target neutral: not a class of this model"):
        explain_text(tiny_text, "fine", target="neutral")
    with pytest.raises(UserError, match=r"^--steps 0: expected an integer >= 1$"):
        tokens.attribute(tiny_text, "fine", steps=0)


def test_the_html_page_is_self_contained_and_escaped():
    page = render_html([("<b>great</b>", 0.5), (",", -0.25), ("dull", -0.5)], caption="x & y")
    assert not re.search(r"https?:|//|src=|href=|@import|url\(|<script|<link|<img", page)
    assert "&lt;b&gt;great&lt;/b&gt;</span><span" in page  # no space before the comma
    assert 'rgba(0,150,60,0.850)" title="+0.5000"' in page and 'rgba(210,40,40,0.425)" title="-0.2500"' in page
    assert "<p class=caption>x &amp; y</p>" in page


# 5. the command line

@pytest.fixture(scope="module")
def cifar_images(tmp_path_factory):
    if not CIFAR.is_dir():
        pytest.skip(f"{CIFAR} not found (the shared datasets sit beside the repo)")
    return [str(CIFAR / "test" / "cat" / "0000.jpg"), str(CIFAR / "test" / "dog" / "0000.jpg")]


def test_cli_explains_images(tmp_path, cifar_images):
    folder = _saved(tmp_path, "timm:test_efficientnet", ["cat", "dog"], "image-classification")
    code, out, err = cli("explain", str(folder), *cifar_images, "--method", "gradcam++")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2
    for line, image, name in zip(lines, cifar_images, ["0000", "0000-2"]):  # the same stem twice: the second -2
        png = folder / "explain" / f"{name}.gradcam++.png"
        assert re.fullmatch(rf"{re.escape(image)}: predicted (cat|dog) \(0\.\d{{3}}\), explained (cat|dog) "
                            rf"\(0\.\d{{3}}\) -> {re.escape(str(png))}", line), line
    first, second = folder / "explain" / "0000.gradcam++.png", folder / "explain" / "0000-2.gradcam++.png"
    assert Image.open(first).size == (256, 256) and Image.open(second).size == (256, 256)
    heat = np.load(first.with_suffix(".npy"))
    assert heat.shape == (64, 64) and heat.dtype == np.float32 and 0 <= heat.min() and heat.max() <= 1
    code, out, err = cli("explain", str(folder), cifar_images[0], "--target", "dog", "--out", str(tmp_path / "o"),
                         "--layer", "blocks.4")
    assert code == 0 and "explained dog (" in out and (tmp_path / "o" / "0000.gradcam.png").is_file(), err


@pytest.mark.parametrize("args, expected", [
    (["--method", "integrated-gradients"], "--method integrated-gradients: explains text models; this one reads "
                                           "images (--method gradcam, gradcam++,"),
    (["--layer", "nope"], "--layer nope: no such module in test_efficientnet"),
    (["--target", "cow"], "--target cow: not a class of this model (expected one of cat, dog)"),
    (["--text", "hello"], "explain: give images or --text, not both"),
])
def test_cli_errors_are_one_line(tmp_path, cifar_images, args, expected):
    folder = _saved(tmp_path, "timm:test_efficientnet", ["cat", "dog"], "image-classification")
    code, out, err = cli("explain", str(folder), cifar_images[0], *args)
    assert code == 2 and err.startswith(f"finetunekit: error: {expected}") and len(err.splitlines()) == 1, err
    assert not (folder / "explain").exists()


def test_cli_multilabel_and_regression(tmp_path, cifar_images):
    labels = _saved(tmp_path / "ml", "timm:test_efficientnet", ["cat", "dog", "pet"], "image-multilabel")
    code, out, err = cli("explain", str(labels), cifar_images[0])
    assert code == 0, err
    logits = finetunekit.load(labels).logits([cifar_images[0]])[0]
    top = ["cat", "dog", "pet"][int(logits.argmax())]
    assert f"predicted {top} ({float(logits.max().sigmoid()):.3f}), explained {top} " in out
    values = _saved(tmp_path / "rg", "timm:test_efficientnet", [], "image-regression")
    code, out, err = cli("explain", str(values), cifar_images[0])
    assert code == 0 and ": predicted " in out and ", explained the output -> " in out, err
    code, out, err = cli("explain", str(values), cifar_images[0], "--target", "cat")
    assert code == 2 and "--target cat: a regression model has one output; leave --target out" in err


def test_detection_is_refused():
    from finetunekit.explain import targets

    detector = SimpleNamespace(task=SimpleNamespace(kind="detection"), folder=Path("runs/raccoon/model"))
    with pytest.raises(UserError, match=r"^explain: runs/raccoon/model is an object detector; explain takes "):
        targets.check_task(detector)


def test_cli_explains_texts(tiny_text, tmp_path):
    code, out, err = cli("explain", str(tiny_text.folder), "--text", "a gripping, funny film", "--text", "dull",
                         "--out", str(tmp_path), "--steps", "20")
    assert code == 0, err
    lines = out.splitlines()
    assert re.fullmatch(r"'a gripping, funny film': predicted negative \(0\.9\d\d\), explained negative "
                        rf"\(0\.9\d\d\); top: 'film' \+1\.60, 'gripping' -0\.67, ',' \+0\.25 -> "
                        rf"{re.escape(str(tmp_path / 'text-1.html'))}", lines[0]), lines[0]
    assert lines[1].startswith("'dull': predicted ")
    page = (tmp_path / "text-1.html").read_text()
    assert page.count("<span style=") == 5 + 2 and "20 steps" in page
    code, out, err = cli("explain", str(tiny_text.folder), str(tmp_path / "text-1.html"))
    assert code == 2 and "text-1.html: this is a text model; pass --text TEXT" in err


# 6. a real fine-tune (2-7 s): CIFAR photos, half of them marked with a red square in the top-left corner,
# the classes "marked" and "plain". The model learns the square; its Grad-CAM for "marked" must lie there.

def _mark(src: Path, dst: Path, marked: bool) -> None:
    a = np.asarray(Image.open(src).convert("RGB")).copy()  # 32 x 32
    if marked:
        a[2:12, 2:12] = (255, 0, 0)
    Image.fromarray(a).save(dst)


def test_grad_cam_of_a_fine_tuned_cnn_finds_the_mark(tmp_path):
    if not CIFAR.is_dir():
        pytest.skip(f"{CIFAR} not found (the shared datasets sit beside the repo)")
    photos = sorted((CIFAR / "train").glob("*/*.jpg"))[::25][:160]  # 160 photos of all 10 classes
    for i, src in enumerate(photos):
        label = "marked" if i % 2 else "plain"
        (tmp_path / "train" / label).mkdir(parents=True, exist_ok=True)
        _mark(src, tmp_path / "train" / label / f"{i}.png", i % 2 == 1)
    held_out = sorted((CIFAR / "test").glob("*/*.jpg"))[::50][:20]
    (tmp_path / "check").mkdir()
    for i, src in enumerate(held_out):
        _mark(src, tmp_path / "check" / f"{i}.png", True)
    code, out, err = cli("fit", "--data", str(tmp_path / "train"), "--model", "timm:test_resnet", "--no-pretrained",
                         "--image-size", "64", "--augment", "none", "--num-workers", "0", "--strategy", "full",
                         "--epochs", "6", "--batch-size", "16", "--lr", "0.003", "--seed", "0",
                         "--out", str(tmp_path / "run"), "--quiet")
    assert code == 0, err
    model = finetunekit.load(tmp_path / "run")
    hits = 0
    for path in sorted((tmp_path / "check").iterdir()):
        e = cam.explain(model, path, "gradcam", "marked")
        peak = np.unravel_index(int(e.heatmap.argmax()), e.heatmap.shape)
        hits += peak[0] < 32 and peak[1] < 32  # the top-left quadrant of the 64 px view
    assert model.predict([str(p) for p in sorted((tmp_path / "check").iterdir())])[0]["label"] == "marked"
    assert hits >= 18, hits
