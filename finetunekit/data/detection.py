"""Detection data: Pascal VOC, COCO JSON and YOLO txt, detected from the layout, linted before training.

    VOC    a folder with XML annotations (annotations/, Annotations/ or beside the images) naming each image
    COCO   a .json file with images, annotations and categories (image paths relative to the file's folder,
           or to images/ beside it)
    YOLO   a folder with images/ and labels/ (one `class cx cy w h` line per box, normalised), class names
           in classes.txt, obj.names or data.yaml (`names:`)

The lint names the file for every problem: degenerate boxes (x2 <= x1 or y2 <= y1) are skipped and
counted, boxes outside the image clipped and counted, boxes of unknown classes skipped and counted, missing
or unreadable images skipped and named; images without boxes are kept as negatives. Boxes are
(x1, y1, x2, y2) in pixels of the image file as it is stored (the size is read from its header).
"""

from __future__ import annotations

import json
import logging
import math
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .splits import random_split

log = logging.getLogger("finetunekit")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_YOLO_NAMES = ("classes.txt", "obj.names", "classes.names")


@dataclass
class Annotated:
    """One image and its boxes as read (class names; the lint checks them)."""

    path: str
    boxes: list[list[float]]  # [x1, y1, x2, y2] in pixels
    names: list[str]
    difficult: list[bool]
    where: str  # the annotation file, for messages
    size: tuple[int, int] | None = None  # (width, height) of the stored image, set by the lint


@dataclass
class DetectionSplit:
    paths: list[str]
    boxes: list[list[list[float]]]
    labels: list[list[int]]  # indices into DetectionSplits.classes
    difficult: list[list[bool]]
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) of each image as stored

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class DetectionSplits:
    classes: list[str]
    train: DetectionSplit
    val: DetectionSplit
    test: DetectionSplit | None
    record: dict
    skipped: list[tuple[str, str]]  # (path, reason) of images left out
    lint: dict = field(default_factory=dict)  # problem -> count
    summary: list[str] = field(default_factory=list)
    annotations: list[str] = field(default_factory=list)  # the annotation files read (hashed: resume's drift guard)


# ----------------------------------------------------------------------------------------------- layout
def layout(path: Path) -> str | None:
    """'voc', 'coco' or 'yolo' when `path` looks like a detection set, else None (cheap: no image is read)."""
    if path.is_file():
        if path.suffix.lower() != ".json":
            return None
        try:
            with path.open(encoding="utf-8") as f:
                head = f.read(1 << 20)
        except OSError:
            return None
        return "coco" if '"annotations"' in head and '"images"' in head else None
    if not path.is_dir():
        return None
    if (path / "labels").is_dir() and (path / "images").is_dir():
        return "yolo"
    for folder in (path / "annotations", path / "Annotations", path):
        if folder.is_dir() and any(p.suffix.lower() == ".xml" for p in _listdir(folder)):
            return "voc"
    return None


def _listdir(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError:
        return []


def read_annotated(path: Path, option: str) -> tuple[list[Annotated], list[str] | None]:
    """The images of a detection set and their boxes; the classes the set declares (COCO, YOLO), if any."""
    kind = layout(path)
    if kind is None:
        raise UserError(f"{option} {path}: not a detection set (expected a Pascal VOC folder of images and XML "
                        f"annotations, a COCO .json file, or a YOLO folder with images/ and labels/)")
    return {"voc": _read_voc, "coco": _read_coco, "yolo": _read_yolo}[kind](path, option)


def _read_voc(root: Path, option: str) -> tuple[list[Annotated], None]:
    folder = next(f for f in (root / "annotations", root / "Annotations", root)
                  if f.is_dir() and any(p.suffix.lower() == ".xml" for p in _listdir(f)))
    image_dirs = [d for d in (root / "images", root / "JPEGImages", folder, root) if d.is_dir()]
    out = []
    for xml in (p for p in _listdir(folder) if p.suffix.lower() == ".xml"):
        try:
            tree = ET.parse(xml).getroot()
        except (ET.ParseError, OSError) as e:
            raise UserError(f"{xml}: not readable Pascal VOC XML ({e})") from None
        filename = (tree.findtext("filename") or xml.stem).strip()
        image = next((d / filename for d in image_dirs if (d / filename).is_file()), None)
        if image is None:  # some tools write the name without its suffix
            image = next((d / (Path(filename).stem + s) for d in image_dirs for s in IMAGE_SUFFIXES
                          if (d / (Path(filename).stem + s)).is_file()), image_dirs[0] / filename)
        boxes, names, difficult = [], [], []
        for obj in tree.iter("object"):
            bb = obj.find("bndbox")
            try:
                box = [float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
            except (AttributeError, TypeError, ValueError):
                raise UserError(f"{xml}: an <object> without a numeric <bndbox> xmin/ymin/xmax/ymax") from None
            boxes.append(box)
            names.append((obj.findtext("name") or "").strip())
            difficult.append((obj.findtext("difficult") or "0").strip() == "1")
        out.append(Annotated(str(image), boxes, names, difficult, str(xml)))
    return out, None


def _read_coco(path: Path, option: str) -> tuple[list[Annotated], list[str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        cats = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        images = {int(i["id"]): str(i["file_name"]) for i in data["images"]}
        anns = data["annotations"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{option} {path}: not a COCO detection file ({type(e).__name__}: {e})") from None
    base = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
    per_image: dict[int, Annotated] = {}
    for i, name in images.items():
        p = path.parent / name if (path.parent / name).is_file() else base / name
        per_image[i] = Annotated(str(p), [], [], [], str(path))
    for a in anns:
        try:
            x, y, w, h = (float(v) for v in a["bbox"])
            item = per_image[int(a["image_id"])]
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: annotation {a.get('id', '?')}: expected image_id of a listed image and "
                            f"bbox [x, y, w, h]") from None
        item.boxes.append([x, y, x + w, y + h])
        item.names.append(cats.get(int(a.get("category_id", -1)), f"category_id {a.get('category_id')}"))
        item.difficult.append(bool(a.get("iscrowd", 0)))
    return list(per_image.values()), [cats[k] for k in sorted(cats)]


def _yolo_names(root: Path) -> list[str]:
    for name in _YOLO_NAMES:
        if (root / name).is_file():
            return [line.strip() for line in (root / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    if (root / "data.yaml").is_file():
        import yaml

        names = (yaml.safe_load((root / "data.yaml").read_text(encoding="utf-8")) or {}).get("names")
        if isinstance(names, dict):
            return [str(names[k]) for k in sorted(names)]
        if isinstance(names, list):
            return [str(n) for n in names]
    raise UserError(f"{root}: a YOLO folder needs its class names in {', '.join(_YOLO_NAMES)} or data.yaml (names:)")


def _read_yolo(root: Path, option: str) -> tuple[list[Annotated], list[str]]:
    from PIL import Image

    names = _yolo_names(root)
    out = []
    for image in (p for p in sorted((root / "images").rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES):
        label = root / "labels" / image.relative_to(root / "images").with_suffix(".txt")
        boxes, labels = [], []
        if label.is_file():
            try:
                with Image.open(image) as im:
                    w, h = im.size
            except Exception:  # noqa: BLE001 - the lint names it
                w = h = 0
            for n, line in enumerate(label.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    c, cx, cy, bw, bh = line.split()[:5]
                    c, cx, cy, bw, bh = int(c), float(cx), float(cy), float(bw), float(bh)
                except ValueError:
                    raise UserError(f"{label}, line {n}: expected 'class cx cy w h', got {line.strip()[:60]!r}") from None
                boxes.append([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h])
                labels.append(names[c] if 0 <= c < len(names) else f"class index {c}")
        out.append(Annotated(str(image), boxes, labels, [False] * len(boxes), str(label)))
    return out, names


# ------------------------------------------------------------------------------------------------- lint
def lint(items: list[Annotated], classes: list[str] | None, counts: Counter,
         skipped: list[tuple[str, str]]) -> list[Annotated]:
    """The usable images, their boxes clipped to the image and checked. `classes` None: every name is known.
    Problems are added to `counts` (and images left out to `skipped`), one warning per file."""
    from PIL import Image

    known = None if classes is None else set(classes)
    out = []
    for item in items:
        try:
            with Image.open(item.path) as im:
                w, h = im.size
        except FileNotFoundError:
            skipped.append((item.path, f"missing (named by {item.where})"))
            counts["missing images"] += 1
            continue
        except Exception as e:  # noqa: BLE001 - any decoding failure: named, skipped
            skipped.append((item.path, f"cannot read as an image ({type(e).__name__})"))
            counts["unreadable images"] += 1
            continue
        boxes, names, difficult = [], [], []
        for box, name, diff in zip(item.boxes, item.names, item.difficult):
            if not all(math.isfinite(v) for v in box) or box[2] <= box[0] or box[3] <= box[1]:
                counts["degenerate boxes (skipped)"] += 1
                log.warning("%s: degenerate box %s skipped", item.where, [round(v, 1) for v in box])
                continue
            clipped = [min(max(box[0], 0), w), min(max(box[1], 0), h), min(max(box[2], 0), w), min(max(box[3], 0), h)]
            if clipped != box:
                if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
                    counts["boxes entirely outside the image (skipped)"] += 1
                    continue
                counts["boxes outside the image (clipped)"] += 1
            if known is not None and name not in known:
                counts["boxes of unknown classes (skipped)"] += 1
                log.warning("%s: box of unknown class %r skipped", item.where, name)
                continue
            boxes.append(clipped)
            names.append(name)
            difficult.append(diff)
        if not boxes:
            counts["images without boxes (kept as negatives)"] += 1
        out.append(Annotated(item.path, boxes, names, difficult, item.where, (w, h)))
    return out


def _to_split(items: list[Annotated], classes: list[str]) -> DetectionSplit:
    index = {c: i for i, c in enumerate(classes)}
    return DetectionSplit([a.path for a in items], [a.boxes for a in items],
                          [[index[n] for n in a.names] for a in items], [a.difficult for a in items],
                          [a.size for a in items])


def describe(split: DetectionSplit, classes: list[str]) -> list[str]:
    """The class histogram and the box-size distribution (sqrt of the area, in pixels)."""
    hist = Counter(classes[i] for labels in split.labels for i in labels)
    sizes = sorted(math.sqrt((b[2] - b[0]) * (b[3] - b[1])) for boxes in split.boxes for b in boxes)
    lines = ["boxes per class (train): " + ", ".join(f"{c} {hist[c]}" for c in classes)]
    if sizes:
        q = [sizes[min(len(sizes) - 1, int(p * len(sizes)))] for p in (0.0, 0.1, 0.5, 0.9)] + [sizes[-1]]
        lines.append(f"box size (train, sqrt of area in px): min {q[0]:.0f}, p10 {q[1]:.0f}, median {q[2]:.0f}, "
                     f"p90 {q[3]:.0f}, max {q[4]:.0f}; {len(sizes) / max(len(split), 1):.2f} boxes per image")
    return lines


def resolve_detection_splits(path: Path, val: Path | None, test: Path | None, val_fraction: float, seed: int,
                             max_bad_fraction: float) -> DetectionSplits:
    """Train/val(/test) of a detection set: `--val` or train/ + val/ folders when given, else a seeded random
    split of `path`. Classes: the set's declared ones (COCO, YOLO), else the names seen in training, sorted."""
    if val is None and path.is_dir() and layout(path / "train") and layout(path / "val") and layout(path) is None:
        path, val = path / "train", path / "val"
        test = test if test is not None or not layout(path.parent / "test") else path.parent / "test"
    counts: Counter = Counter()
    skipped: list[tuple[str, str]] = []
    items, declared = read_annotated(path, "--data")
    classes = declared or sorted({n for a in items for n in a.names})
    if not classes:
        raise UserError(f"--data {path}: no boxes at all (a detection set needs at least one labelled box)")
    train = lint(items, classes, counts, skipped)
    if val is not None:
        val_items = lint(read_annotated(val, "--val")[0], classes, counts, skipped)
        record_val = {"from": str(val)}
    else:
        held = random_split(len(train), val_fraction, seed)
        val_items = [a for a, h in zip(train, held) if h]
        train = [a for a, h in zip(train, held) if not h]
        record_val = {"from": f"seeded split ({val_fraction:g} of --data, seed {seed})"}
    test_items = lint(read_annotated(test, "--test")[0], classes, counts, skipped) if test is not None else None
    total = len(items) + (len(val_items) if val is not None else 0)
    if skipped and len(skipped) > max_bad_fraction * max(total, 1):
        raise UserError(f"{len(skipped)} of {total} images cannot be used (first: {skipped[0][0]}: {skipped[0][1]}); "
                        f"over --max-bad-fraction {max_bad_fraction:g}")
    if not train or not val_items:
        raise UserError(f"--data {path}: {len(train)} training and {len(val_items)} validation images; need at least "
                        f"one of each")
    splits = DetectionSplits(classes, _to_split(train, classes), _to_split(val_items, classes),
                             _to_split(test_items, classes) if test_items is not None else None,
                             {"format": layout(path), "val": record_val,
                              "train": [str(p) for p in (a.path for a in train)],
                              "val_paths": [a.path for a in val_items]},
                             skipped, dict(counts))
    splits.annotations = sorted({a.where for a in items} | {a.where for a in val_items})
    splits.summary = describe(splits.train, classes)
    if counts:
        splits.summary.append("data lint: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    for p, reason in skipped[:5]:
        splits.summary.append(f"skipped {p}: {reason}")
    return splits


def looks_like_detection(path: Path | None) -> str | None:
    """One line for a non-detection task given a detection set, else None."""
    kind = None if path is None else layout(path)
    names = {"voc": "a Pascal VOC detection set (images and XML annotations)", "coco": "a COCO detection file",
             "yolo": "a YOLO detection set (images/ and labels/)"}
    return None if kind is None else f"--data {path}: looks like {names[kind]}; train a detector with --task detection"
