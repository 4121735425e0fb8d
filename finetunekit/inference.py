"""A fine-tuned model restored from disk (`finetunekit.load`): predict, and labelled loaders for evaluate.

    ImageModel.predict(paths | folders | PIL images | arrays)
    TextModel.predict(texts | (text, text) pairs | a .txt/.csv/.tsv/.jsonl file)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from .data import build_transform, load_rgb, to_rgb
from .imagefiles import IMAGE_SUFFIXES, expand_inputs, no_images  # noqa: F401 - re-exported
from .errors import UserError
from .predictor import Predictor, check_batch_size
from .addons.tta import with_tta
from .tasks import logits_of
from .models import Backbone

TEXT_FILE_SUFFIXES = {".txt", ".csv", ".tsv", ".tab", ".jsonl", ".ndjson", ".parquet"}


class FineTunedModel(Predictor):
    """What every restored model offers: its module, task and classes, `to(device)`, `predict`."""

    def __init__(self, backbone: Backbone, task, folder: Path, tta: str = "none"):
        self.backbone, self.task, self.folder = backbone, task, folder
        self.tta = tta  # images: test-time augmentation used in training's validation (addons.tta)
        self.device = torch.device("cpu")

    @property
    def classes(self) -> list[str]:
        return self.task.classes

    @property
    def module(self) -> torch.nn.Module:
        return self.backbone.module

    def eval_module(self, module: torch.nn.Module | None = None) -> torch.nn.Module:
        """The module to score with (this model's, or `module`): wrapped for test-time augmentation if any."""
        return with_tta(self.module if module is None else module, self.tta)

    def to(self, device: str | torch.device) -> FineTunedModel:
        self.device = torch.device(device)
        self.module.to(self.device)
        return self

    def logits(self, items: Sequence[Any], batch_size: int = 64) -> torch.Tensor:
        raise NotImplementedError

    def _inputs(self, inputs: Any) -> tuple[list[Any], list[dict]]:
        """(items to score, extra fields per result) from what the user passed."""
        raise NotImplementedError

    def _scores(self, items: list[Any], batch_size: int, skip: bool) -> tuple[torch.Tensor, dict[int, str]]:
        """Logits of the items that read, in order, and {index: reason} for those that did not (skip)."""
        return self.logits(items, batch_size), {}

    _stochastic = False  # Monte-Carlo dropout passes: the dropout layers in train mode

    def _eval_mode(self) -> None:
        """Everything in eval mode; during Monte-Carlo dropout passes the dropout layers in train mode."""
        self.module.eval()
        if self._stochastic:
            dropout_layers(self.module, train=True)

    def _check_mc(self) -> None:
        if not dropout_layers(self.module, train=False):
            raise UserError("--mc-dropout: this model has no dropout layers to sample with (nn.Dropout with p > 0, "
                            "or a timm head's drop_rate > 0)")

    def _mc_scores(self, items: list[Any], batch_size: int, skip: bool, passes: int) -> torch.Tensor:
        """[passes, N, C] logits with the dropout layers in train mode (BatchNorm and the rest in eval mode);
        seeded, so a prediction repeats exactly."""
        self._check_mc()
        self._stochastic = True
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                return torch.stack([self._scores(items, batch_size, skip)[0] for _ in range(passes)])
        finally:
            self._stochastic = False
            self.module.eval()


def dropout_layers(module: torch.nn.Module, train: bool) -> int:
    """How many dropout layers `module` has (nn.Dropout and its kin with p > 0, and timm's head dropout: a module
    whose float `drop_rate` > 0 drops in its own forward while it is training); `train`: put them, and only them,
    in train mode."""
    count = 0
    for m in module.modules():
        functional = isinstance(getattr(m, "drop_rate", None), float) and m.drop_rate > 0
        if (isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0) or functional:
            count += 1
            if train:
                m.training = True  # this module alone: its children (BatchNorm...) stay in eval mode
    return count


class UnreadableImage(UserError):
    """An input that does not decode as an image: `path: reason`."""

    def __init__(self, path: Any, error: Exception):
        first = str(error).splitlines()[0] if str(error) else ""
        self.path, self.reason = str(path), f"cannot read as an image ({type(error).__name__}: {first})"
        super().__init__(f"{path}: {self.reason}")


class ImageModel(FineTunedModel):
    def __init__(self, backbone: Backbone, task, folder: Path, tta: str = "none", table: dict | None = None):
        super().__init__(backbone, task, folder, tta)
        self.table = table or {}  # multi-label / regression: the training table's label columns
        self.transform = build_transform(backbone.preprocessing, augment="none")

    def _image(self, item: Any) -> Image.Image:
        if isinstance(item, Image.Image):
            return to_rgb(item)
        if isinstance(item, np.ndarray):
            return to_rgb(Image.fromarray(item))
        try:
            return load_rgb(item)
        except Exception as e:  # noqa: BLE001 - any decoding failure: name the file, no traceback
            raise UnreadableImage(item, e) from None

    def logits(self, images: Sequence[Any], batch_size: int = 64) -> torch.Tensor:
        """[N, num_classes] logits for a sequence of images (paths, PIL images or HxWxC uint8 arrays)."""
        return self._scores(images, batch_size, skip=False)[0]

    def _read_batches(self, images: Sequence[Any], batch_size: int, skip: bool, read, failed: dict[int, str]):
        """Lists of read(image) of up to `batch_size` images each; an unreadable image raises, or (`skip`) is
        left out of its batch and its reason recorded in `failed` by index."""
        for start in range(0, len(images), batch_size):
            xs = []
            for i in range(start, min(start + batch_size, len(images))):
                try:
                    xs.append(read(self._image(images[i])))
                except UnreadableImage as e:
                    if not skip:
                        raise
                    failed[i] = e.reason
            if xs:
                yield xs

    @torch.inference_mode()
    def _scores(self, images: Sequence[Any], batch_size: int, skip: bool) -> tuple[torch.Tensor, dict[int, str]]:
        self._eval_mode()
        out, failed = [], {}
        for xs in self._read_batches(images, batch_size, skip, self.transform, failed):
            # [B, 3, H, W]: the batch less its unreadable images
            out.append(logits_of(self.eval_module(), torch.stack(xs).to(self.device)).float().cpu())
        return (torch.cat(out) if out else torch.empty(0, self.task.num_outputs)), failed

    def _inputs(self, inputs: Any) -> tuple[list[Any], list[dict]]:
        items = expand_inputs(inputs)
        return items, [{"path": str(i)} if isinstance(i, (str, os.PathLike)) else {} for i in items]

    def labelled_loader(self, data: Path, batch_size: int, transform=None) -> tuple[DataLoader, int]:
        """`transform`: in place of the model's (robustness: its pixels before the normalization)."""
        check_batch_size(batch_size)
        from .data import ImageDataset, default_workers, make_loader
        from .data.sources import drop_unreadable, labeled_split, read_labeled_files

        transform = transform or self.transform
        if self.table.get("task", "image-classification") != "image-classification":
            from .data.sources import read_table_split

            split, skipped = read_table_split(self.table["task"], data, self.table["path_column"],
                                              self.table["label_columns"], self.table.get("label_delimiter"),
                                              self.classes)
            return make_loader(ImageDataset(split, transform), batch_size, train=False,
                               workers=default_workers(), seed=0), skipped
        files = read_labeled_files(data, "--data")
        skipped, _ = drop_unreadable([files])
        split = labeled_split(files, self.classes, "the model's classes")
        return make_loader(ImageDataset(split, transform), batch_size, train=False,
                           workers=default_workers(), seed=0), len(skipped)


class TextModel(FineTunedModel):
    def __init__(self, backbone: Backbone, task, folder: Path, config: dict, task_name: str):
        super().__init__(backbone, task, folder)
        self.task_name = task_name  # text-classification | text-multilabel | text-regression
        self.text_columns: list[str] = config.get("text_columns") or ["text"]
        self.label_columns: list[str] = config.get("label_columns") or ["label"]
        self.label_delimiter: str | None = config.get("label_delimiter")
        self.max_length: int = int(config.get("max_length") or backbone.tokenizer.model_max_length)

    @property
    def tokenizer(self):
        return self.backbone.tokenizer

    @torch.inference_mode()
    def logits(self, texts: Sequence[tuple[str, ...]], batch_size: int = 64) -> torch.Tensor:
        """[N, num_outputs] logits; batches are formed by length (least padding), results in input order."""
        from .data.text import PadCollate, tokenize

        self._eval_mode()
        if not texts:
            return torch.empty(0, self.task.num_outputs)
        enc = tokenize(self.tokenizer, texts, self.max_length)
        order = sorted(range(len(texts)), key=lambda i: len(enc["input_ids"][i]))
        collate = PadCollate(self.tokenizer.pad_token_id, self.tokenizer.padding_side == "left", torch.float32)
        out = torch.empty(len(texts), self.task.num_outputs)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            features, _ = collate([({k: v[i] for k, v in enc.items()}, 0.0) for i in idx])
            logits = self.module(**{k: v.to(self.device) for k, v in features.items()}).logits
            out[idx] = logits.float().cpu()
        return out

    def _inputs(self, inputs: Any) -> tuple[list[tuple[str, ...]], list[dict]]:
        """A string, a (text, text) pair, a list of those, or a path to a .txt (one per line) or table file."""
        from .data.tables import read_texts

        if isinstance(inputs, os.PathLike) or (isinstance(inputs, str) and _is_text_file(inputs)):
            texts = read_texts(Path(inputs), self.text_columns, "predict")
        else:
            items = [inputs] if isinstance(inputs, (str, tuple)) else list(inputs)
            texts = [(t,) if isinstance(t, str) else tuple(t) for t in items]
        wrong = next((t for t in texts if len(t) != len(self.text_columns)), None)
        if wrong is not None:
            raise UserError(f"predict: this model reads {len(self.text_columns)} text(s) per sample "
                            f"({', '.join(self.text_columns)}), got {len(wrong)}: {wrong!r}")
        extras = [{"text": t[0]} if len(t) == 1 else {"text": list(t)} for t in texts]
        return texts, extras

    def labelled_loader(self, data: Path, batch_size: int) -> tuple[DataLoader, int]:
        check_batch_size(batch_size)
        from .data.tables import read_labelled_texts
        from .data.text import PadCollate, TextDataset, make_text_loader

        split, skipped = read_labelled_texts(data, self.task_name, self.text_columns, self.label_columns,
                                             self.label_delimiter, self.classes)
        ds = TextDataset(split.texts, split.targets, self.tokenizer, self.max_length)
        collate = PadCollate(self.tokenizer.pad_token_id, self.tokenizer.padding_side == "left",
                             self.task.target_dtype)
        return make_text_loader(ds, batch_size, train=False, group_by_length=False, seed=0,
                                collate=collate), len(skipped)


def _is_text_file(s: str) -> bool:
    return len(s) < 4096 and "\n" not in s and Path(s).suffix.lower() in TEXT_FILE_SUFFIXES and Path(s).is_file()


class DetectionModel(ImageModel):
    """A restored detector: `predict` gives per image {"boxes" [[x1, y1, x2, y2] px of the image as given],
    "labels", "scores"}; the detector resizes and normalizes itself (its min_size, max_size, mean, std)."""

    def __init__(self, backbone: Backbone, task, folder: Path):
        FineTunedModel.__init__(self, backbone, task, folder)
        self.table = {}

    def detections(self, images: Sequence[Any], batch_size: int = 8) -> list[dict]:
        return self._scores(images, batch_size, skip=False)[0]

    @torch.inference_mode()
    def _scores(self, images: Sequence[Any], batch_size: int, skip: bool) -> tuple[list[dict], dict[int, str]]:
        from torchvision.transforms.v2.functional import pil_to_tensor

        self.module.eval()
        out, failed = [], {}
        read = lambda image: pil_to_tensor(image).float().div(255).to(self.device)  # noqa: E731 - [3, H, W]
        for xs in self._read_batches(images, batch_size, skip, read, failed):
            out += [{k: v.cpu() for k, v in d.items()} for d in self.module(xs)]
        return out, failed

    def labelled_loader(self, data: Path, batch_size: int) -> tuple[DataLoader, int]:
        """A VOC / COCO / YOLO set scored with the model's classes (boxes of other classes: skipped, counted)."""
        check_batch_size(batch_size)
        from collections import Counter

        from .data import default_workers, make_loader
        from .data.boxes import DetectionDataset, collate, detection_transform
        from .data.detection import _to_split, lint, read_annotated

        counts: Counter = Counter()
        skipped: list = []
        items = lint(read_annotated(data, "--data")[0], self.classes, counts, skipped)
        if not items:
            raise UserError(f"--data {data}: no usable images")
        args = self.backbone.model_args["detector"]
        ds = DetectionDataset(_to_split(items, self.classes), detection_transform("none", args["min_size"],
                                                                                  args["max_size"]))
        return make_loader(ds, batch_size, train=False, workers=default_workers(), seed=0, collate_fn=collate), \
            len(skipped)


def draw_boxes(image: Image.Image, boxes: Sequence[Sequence[float]], labels: Sequence[str] | None = None,
               color: str = "red", width: int | None = None) -> Image.Image:
    """`image` with `boxes` ([x1, y1, x2, y2] px) drawn and labelled (torchvision's draw_bounding_boxes)."""
    from torchvision.transforms.v2.functional import pil_to_tensor, to_pil_image
    from torchvision.utils import draw_bounding_boxes

    tensor = pil_to_tensor(image)
    if not len(boxes):
        return image
    drawn = draw_bounding_boxes(tensor, torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                                labels=list(labels) if labels is not None else None, colors=color,
                                width=width or max(2, tensor.shape[-1] // 300))
    return to_pil_image(drawn)


def draw(path: str, prediction: dict, out_dir: Path, min_score: float = 0.0) -> Path:
    """The image at `path` with its predicted boxes drawn, as PNG in out_dir."""
    keep = [i for i, s in enumerate(prediction["scores"]) if s >= min_score]
    drawn = draw_boxes(load_rgb(path), [prediction["boxes"][i] for i in keep],
                       [f"{prediction['labels'][i]} {prediction['scores'][i]:.2f}" for i in keep])
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / (Path(path).stem + ".png")
    drawn.save(target)
    return target
