"""The data-and-model build stage: what differs between images and texts before the shared engine runs —
reading the splits, building the backbone (its head sized by the data), the task, and the loaders.

Each `prepare_*` reads the data first (every problem with it is a one-line error before a model loads),
then the model, then the loaders, and returns a `Prepared`. It reads the recipe's typed sections; the
datasets, loaders, models and tasks it builds get plain arguments.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from .config import TASKS, DataConfig, ModelConfig, TrainConfig
from .errors import UserError
from .models import Backbone
from .tasks import TASKS as TASK_CLASSES
from .tasks import build_task

log = logging.getLogger("finetunekit")


@dataclass
class Prepared:
    backbone: Backbone
    task: Any
    train_loader: DataLoader
    val_loader: DataLoader
    test_loader: DataLoader | None
    split_record: dict  # written to split.json
    skipped: int  # files or rows that could not be used
    model_name: str  # the --model spec, default resolved
    num_workers: int  # data-loading workers, default resolved
    image_size: int | None  # images: the input size, default resolved
    max_length: int | None  # text: tokens per sample, default resolved
    input_desc: str  # for the log: "input 224px", "max 128 tokens"
    summary: list[str] = field(default_factory=list)  # lines for the log, once data and model are known good
    extra_config: dict[str, Any] = field(default_factory=dict)  # saved with the model (text columns...)
    sources: dict[str, list[Path]] = field(default_factory=dict)  # split -> the files training reads (hashed:
    # resume's drift guard; byte-identical images across train and val are reported as leakage)
    train_targets: list = field(default_factory=list)  # per training sample: what --strategy auto counts
    val_targets: list = field(default_factory=list)  # per validation sample (datachecks: a class missing from it)
    test_paths: list[Path] = field(default_factory=list)  # the test files (datachecks: identical to training ones)
    streamed: bool = False  # shard data: an IterableDataset per split; no decoded-image or feature cache


def _counts(splits, noun: str) -> str:
    what = f"classes: {len(splits.classes)}" if splits.classes else "regression target"
    return (f"{what}; {noun}: {len(splits.train)} train, {len(splits.val)} val"
            f"{f', {len(splits.test)} test' if splits.test else ''} (val: {splits.record['val']['from']})")


def prepare_inputs(task: str, d: DataConfig, m: ModelConfig, t: TrainConfig, *, gpu: bool) -> Prepared:
    """The data, model, task and loaders of `task` (its entry in PREPARERS)."""
    return PREPARERS[task](task, d, m, t, gpu=gpu)


def _model_name(task: str, m: ModelConfig) -> str:
    from .config import DEFAULT_MODEL

    return m.name or DEFAULT_MODEL.get(task) or DEFAULT_MODEL[TASKS[task][0]]


def class_weights(spec: str | None, kind: str, classes: list[str], targets: list) -> list[float] | None:
    """'auto' = inverse class frequency normalised to mean 1 (multi-label: negatives/positives per label),
    or one comma-separated number per class."""
    if spec is None or spec.lower() == "none":
        return None
    if kind == "regression":
        raise UserError("--class-weights: only for classification and multi-label tasks")
    if spec.lower() == "auto":
        if kind == "multilabel":
            n = len(targets)
            pos = [sum(t[i] for t in targets) for i in range(len(classes))]
            return [round((n - p) / p, 4) if p else 1.0 for p in pos]
        counts = Counter(targets)
        raw = [len(targets) / (len(classes) * counts[i]) if counts[i] else 0.0 for i in range(len(classes))]
        return [round(w, 4) for w in raw]
    try:
        weights = [float(w) for w in spec.split(",")]
    except ValueError:
        raise UserError(f"--class-weights {spec}: expected 'auto' or comma-separated numbers") from None
    if len(weights) != len(classes) or any(w < 0 for w in weights):
        raise UserError(f"--class-weights {spec}: expected {len(classes)} non-negative numbers, one per class in "
                        f"this order: {', '.join(classes)}")
    return weights


def _task(task: str, t: TrainConfig, classes: list[str], targets: list):
    weights = class_weights(t.class_weights, TASK_CLASSES[task].kind, classes, targets)
    return build_task(task, classes, loss=t.loss, label_smoothing=t.label_smoothing,
                      class_weights=weights, focal_gamma=t.focal_gamma, threshold=t.threshold)


def prepare_images(task_name: str, d: DataConfig, m: ModelConfig, t: TrainConfig, *, gpu: bool) -> Prepared:
    from .data import ImageDataset, build_transform, default_workers, make_loader, resolve_splits
    from .data.sources import resolve_table_splits
    from .models import create_backbone

    from .shardfiles import is_shards

    if task_name == "image-classification" and is_shards(d.path):
        return prepare_image_shards(task_name, d, m, t, gpu=gpu)
    name = _model_name(task_name, m)
    if task_name == "image-classification":
        splits = resolve_splits(d.path, d.val, d.test, d.val_fraction, t.seed, d.max_bad_fraction)
    else:
        splits = resolve_table_splits(task_name, d.path, d.val, d.test, label_column=d.label_column,
                                      label_delimiter=d.label_delimiter, val_fraction=d.val_fraction, seed=t.seed,
                                      max_bad_fraction=d.max_bad_fraction)
    task = _task(task_name, t, splits.classes, splits.train.labels)
    backbone = create_backbone(name, task.num_outputs, pretrained=m.pretrained, weights=m.weights,
                               drop_path=m.drop_path, head=m.head, dropout=m.dropout, image_size=d.image_size,
                               labels=splits.classes, kind=TASK_CLASSES[task_name].kind)
    summary = [_counts(splits, "images")]

    workers = default_workers() if d.num_workers is None else d.num_workers
    train_tf = build_transform(backbone.preprocessing, d.augment, rotate=d.rotate, elastic=d.elastic, vflip=d.vflip)
    eval_tf = build_transform(backbone.preprocessing, "none")

    def loader(split, tf, train: bool) -> DataLoader:
        return make_loader(ImageDataset(split, tf), t.batch_size * (1 if train else 2), train=train,
                           workers=workers, seed=t.seed, pin_memory=gpu)

    size = backbone.preprocessing.input_size
    return Prepared(backbone, task, loader(splits.train, train_tf, True), loader(splits.val, eval_tf, False),
                    loader(splits.test, eval_tf, False) if splits.test is not None else None,
                    {"classes": splits.classes, **splits.record,
                     "skipped": [{"path": p, "reason": r} for p, r in splits.skipped]},
                    len(splits.skipped), name, workers, size, None, f"input {size}px", summary, extra_config={
                        **({"head_type": m.head} if m.head != "linear" else {}),
                        **({k: splits.record[k] for k in ("path_column", "label_columns", "label_delimiter")
                            if k in splits.record}),
                        **({"threshold": t.threshold} if task_name == "image-multilabel" else {})},
                    sources={"train": [Path(p) for p in splits.train.paths], "val": [Path(p) for p in splits.val.paths],
                             "tables": [p for p in (d.path, d.val) if p is not None and p.is_file()]},
                    train_targets=list(splits.train.labels), val_targets=list(splits.val.labels),
                    test_paths=[Path(p) for p in splits.test.paths] if splits.test is not None else [])


def prepare_image_shards(task_name: str, d: DataConfig, m: ModelConfig, t: TrainConfig, *, gpu: bool) -> Prepared:
    """image-classification from WebDataset tar shards, streamed (data.shards, docs/data.md): the label pass
    only, then the model, then a ShardImages loader per split."""
    from .data import build_transform, default_workers
    from .data.shards import make_shard_loader, resolve_shard_splits
    from .models import create_backbone

    name = _model_name(task_name, m)
    splits = resolve_shard_splits(d.path, d.val, d.test)
    task = _task(task_name, t, splits.classes, splits.train.labels)
    backbone = create_backbone(name, task.num_outputs, pretrained=m.pretrained, weights=m.weights,
                               drop_path=m.drop_path, head=m.head, dropout=m.dropout, image_size=d.image_size,
                               labels=splits.classes, kind=TASK_CLASSES[task_name].kind)
    workers = default_workers() if d.num_workers is None else d.num_workers
    train_tf = build_transform(backbone.preprocessing, d.augment, rotate=d.rotate, elastic=d.elastic, vflip=d.vflip)
    eval_tf = build_transform(backbone.preprocessing, "none")

    def loader(split, tf, train: bool) -> DataLoader:
        return make_shard_loader(split, splits.classes, tf, t.batch_size * (1 if train else 2), train=train,
                                 workers=workers, seed=t.seed, pin_memory=gpu)

    size = backbone.preprocessing.input_size
    train_loader = loader(splits.train, train_tf, True)
    test = (f", {splits.test.total} test", f" + {len(splits.test.files)}") if splits.test else ("", "")
    summary = [f"classes: {len(splits.classes)}; images: {splits.train.total} train, {splits.val.total} val{test[0]}, "
               f"streamed from {len(splits.train.files)} + {len(splits.val.files)}{test[1]} shard(s); "
               f"{len(train_loader.dataset)} training samples an epoch"]
    return Prepared(backbone, task, train_loader, loader(splits.val, eval_tf, False),
                    loader(splits.test, eval_tf, False) if splits.test is not None else None,
                    {"classes": splits.classes, **splits.record, "skipped": []}, 0, name, workers, size, None,
                    f"input {size}px", summary, extra_config={"head_type": m.head} if m.head != "linear" else {},
                    sources={}, train_targets=list(splits.train.labels), val_targets=list(splits.val.labels),
                    streamed=True)


def prepare_text(task_name: str, d: DataConfig, m: ModelConfig, t: TrainConfig, *, gpu: bool) -> Prepared:
    from .data.tables import describe_columns, resolve_text_splits
    from .data.text import PadCollate, TextDataset, TokenAugment, make_text_loader, read_synonyms
    from .models import create_text_backbone
    from .models.hf_source import model_max_length

    name = _model_name(task_name, m)
    kind = TASK_CLASSES[task_name].kind
    splits = resolve_text_splits(task_name, d.path, d.val, d.test, text_column=d.text_column,
                                 label_column=d.label_column, label_delimiter=d.label_delimiter,
                                 val_fraction=d.val_fraction, seed=t.seed, max_bad_fraction=d.max_bad_fraction)
    synonyms = read_synonyms(d.synonyms) if d.synonyms else None
    task = _task(task_name, t, splits.classes, splits.train.targets)
    backbone = create_text_backbone(name, splits.classes, kind, pretrained=m.pretrained,
                                    weights=m.weights, trust_remote_code=m.trust_remote_code, dropout=m.dropout)
    tok = backbone.tokenizer
    prompts = m.prompt_tokens if m.peft == "prompt" else 0  # --peft prompt: its tokens take positions too
    limit = model_max_length(backbone) - prompts
    if d.max_length is not None and d.max_length > limit:
        raise UserError(f"--max-length {d.max_length}: {name} takes at most {limit} tokens"
                        f"{f' besides --prompt-tokens {prompts}' if prompts else ''}")
    summary = [describe_columns(splits.record), _counts(splits, "texts")]
    seen = set(splits.train.texts)
    leaked = sum(t in seen for t in splits.val.texts)
    if leaked:
        summary.append(f"warning: {leaked} validation texts also appear in the training data (leakage: validation "
                       f"scores will be optimistic)")
    max_length = d.max_length or limit
    augment = TokenAugment(d.token_delete, d.token_swap, d.token_mask, tok.mask_token_id,
                           set(tok.all_special_ids))
    if augment.active or synonyms:
        summary.append(f"text augmentation: delete {d.token_delete:g}, swap {d.token_swap:g}, mask "
                       f"{d.token_mask:g}" + (f", synonyms from {d.synonyms} (p {d.synonym_prob:g})" if synonyms else ""))
    collate = PadCollate(tok.pad_token_id, tok.padding_side == "left", task.target_dtype, multiple=8 if gpu else 1)

    def loader(split, train: bool) -> DataLoader:
        ds = TextDataset(split.texts, split.targets, tok, max_length, augment if train else None,
                         synonyms if train else None, d.synonym_prob, seed=t.seed)
        return make_text_loader(ds, t.batch_size * (1 if train else 2), train=train,
                                group_by_length=d.group_by_length, seed=t.seed, collate=collate)

    train_loader = loader(splits.train, True)
    lengths = train_loader.dataset.lengths
    truncated = sum(n >= max_length for n in lengths)
    summary.append(f"tokens per training sample: mean {sum(lengths) / len(lengths):.1f}, max {max(lengths)}; "
                   f"{truncated} of {len(lengths)} truncated to {max_length}")
    record = {"classes": splits.classes, **splits.record,
              "skipped": [{"row": w, "reason": r} for w, r in splits.skipped]}
    text = {"text_columns": splits.text_columns, "label_columns": splits.label_columns,
            "label_delimiter": splits.record.get("label_delimiter"), "max_length": max_length,
            "threshold": t.threshold if kind == "multilabel" else None}
    return Prepared(backbone, task, train_loader, loader(splits.val, False),
                    loader(splits.test, False) if splits.test is not None else None, record, len(splits.skipped),
                    name, 0, None, max_length, f"max {max_length} tokens", summary, extra_config=text,
                    sources={"tables": [p for p in (d.path, d.val, d.synonyms) if p is not None]},
                    train_targets=list(splits.train.targets), val_targets=list(splits.val.targets))


def parse_numbers(spec: str | None, flag: str, kind=float) -> tuple | None:
    """'32,64,128' -> (32, 64, 128); a UserError naming the flag otherwise."""
    if spec is None:
        return None
    try:
        values = tuple(kind(v) for v in spec.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or any(v <= 0 for v in values):
        raise UserError(f"{flag} {spec}: expected comma-separated positive {'integers' if kind is int else 'numbers'}")
    return values


def detector_options(m: ModelConfig):
    from .models.detection import DetectorOptions

    return DetectorOptions(pretrained=m.pretrained, weights=m.weights,
                           anchor_sizes=parse_numbers(m.anchor_sizes, "--anchor-sizes", int),
                           aspect_ratios=parse_numbers(m.aspect_ratios, "--aspect-ratios"),
                           nms_threshold=m.nms_threshold, score_threshold=m.score_threshold,
                           detections_per_image=m.detections_per_image, min_size=m.min_size, max_size=m.max_size,
                           trainable_layers=m.trainable_layers, hard_examples=m.hard_examples)


def fitted_anchors(options, splits, source, architecture: str) -> tuple[Any, list[str], dict | None]:
    """--anchors auto: the options with anchors fitted to the training boxes (when they fit better than
    the model's own), the log line, the record."""
    from dataclasses import replace

    from .models import anchors
    from .models.detection import model_anchors

    min_size, max_size = source.defaults(architecture)
    min_size = options.min_size or min_size
    max_size = max(options.max_size or max_size, min_size)
    own_sizes, own_ratios = model_anchors(architecture)
    try:
        fit, line, record = anchors.choose(splits.train.boxes, splits.train.sizes, min_size, max_size, own_sizes,
                                           own_ratios)
    except ValueError as e:
        raise UserError(f"--anchors auto: {e}") from None
    if fit is not None:
        options = replace(options, anchor_sizes=fit.sizes, aspect_ratios=fit.ratios)
    return options, [line], record


def prepare_detection(task_name: str, d: DataConfig, m: ModelConfig, t: TrainConfig, *, gpu: bool) -> Prepared:
    """VOC / COCO / YOLO data (linted), a Faster R-CNN for its classes, loaders of (images, targets) lists."""
    from .data import default_workers, make_loader
    from .data.boxes import DetectionDataset, collate, detection_transform
    from .data.detection import resolve_detection_splits
    from .models.registry import resolve

    name = _model_name(task_name, m)
    splits = resolve_detection_splits(d.path, d.val, d.test, d.val_fraction, t.seed, d.max_bad_fraction)
    task = build_task(task_name, splits.classes)
    source, arch = resolve(name, "detection")
    options, anchor_lines, anchor_record = detector_options(m), [], None
    if m.anchors == "auto":
        options, anchor_lines, anchor_record = fitted_anchors(options, splits, source, arch)
    backbone = source.create(arch, len(splits.classes), options)
    args = backbone.model_args["detector"]
    workers = default_workers() if d.num_workers is None else d.num_workers

    def loader(split, train: bool) -> DataLoader:
        tf = detection_transform(d.augment if train else "none", args["min_size"], args["max_size"])
        return make_loader(DetectionDataset(split, tf), t.batch_size * (1 if train else 2), train=train,
                           workers=workers, seed=t.seed, pin_memory=gpu, collate_fn=collate)

    mining = f", hard-example mining: the top {args['hard_examples']} RoIs per image" if args["hard_examples"] else ""
    anchors = args["anchor_sizes"] or "the model's own"
    ratios = args["aspect_ratios"] or "the model's own"
    summary = [f"classes: {len(splits.classes)}; images: {len(splits.train)} train, {len(splits.val)} val"
               f"{f', {len(splits.test)} test' if splits.test else ''} (val: {splits.record['val']['from']}; "
               f"{splits.record['format']} layout)", *splits.summary,
               f"detector: anchors {anchors}, aspect ratios {ratios}, NMS IoU "
               f"{args['nms_threshold']:g}, score threshold {args['score_threshold']:g}, "
               f"{args['detections_per_image']} detections per image{mining}", *anchor_lines]
    record = {"classes": splits.classes, **splits.record, "lint": splits.lint,
              **({"anchors_auto": anchor_record} if anchor_record else {}),
              "skipped": [{"path": p, "reason": r} for p, r in splits.skipped]}
    return Prepared(backbone, task, loader(splits.train, True), loader(splits.val, False),
                    loader(splits.test, False) if splits.test is not None else None, record, len(splits.skipped),
                    name, workers, None, None, f"shorter side {args['min_size']}px (longer at most "
                    f"{args['max_size']}px)", summary,
                    sources={"train": [Path(p) for p in splits.train.paths], "val": [Path(p) for p in splits.val.paths],
                             "tables": [Path(p) for p in splits.annotations]},
                    test_paths=[Path(p) for p in splits.test.paths] if splits.test is not None else [])


def prepare_seq2seq(task_name: str, d: DataConfig, m: ModelConfig, t: TrainConfig, *, gpu: bool) -> Prepared:
    """Source/target pairs from a table, an AutoModelForSeq2SeqLM with its generation settings, the task (with the
    per-epoch generation subset: --eval-generate-max) and length-grouped, dynamically padded loaders."""
    import random

    from .data.seq2seq import Seq2SeqCollate, Seq2SeqDataset, resolve_pair_splits
    from .data.text import make_text_loader
    from .models.hf_seq2seq import Seq2SeqOptions
    from .models.hf_source import model_max_length
    from .models.registry import resolve

    name = _model_name(task_name, m)
    splits = resolve_pair_splits(d.path, d.val, d.test, source_column=d.source_column, target_column=d.target_column,
                                 val_fraction=d.val_fraction, seed=t.seed, max_bad_fraction=d.max_bad_fraction)
    task = build_task(task_name, [], label_smoothing=t.label_smoothing)
    source, arch = resolve(name, "seq2seq")
    backbone = source.create(arch, 0, Seq2SeqOptions(
        pretrained=m.pretrained, weights=m.weights, trust_remote_code=m.trust_remote_code, spec=name,
        num_beams=m.num_beams, max_new_tokens=m.max_new_tokens, length_penalty=m.length_penalty,
        src_lang=m.src_lang, tgt_lang=m.tgt_lang))
    tok = task.tokenizer = backbone.tokenizer
    limit = model_max_length(backbone)
    for flag, value in (("--max-length", d.max_length), ("--max-target-length", d.max_target_length)):
        if value is not None and value > limit:
            raise UserError(f"{flag} {value}: {name} takes at most {limit} tokens")
    max_length = d.max_length or limit
    max_target = d.max_target_length or max_length
    n_val = len(splits.val)
    if t.eval_generate_max < n_val:  # a fixed seeded subset, spread over the set (the loader sorts by length)
        task.eval_subset = set(random.Random(t.seed).sample(range(n_val), t.eval_generate_max))
    if t.eval_generate_max == 0:  # no generated texts per epoch: the best epoch by the loss
        task.default_monitor = "loss"
    collate = Seq2SeqCollate(tok.pad_token_id, multiple=8 if gpu else 1)

    def loader(split, train: bool) -> DataLoader:
        ds = Seq2SeqDataset(split, tok, max_length, max_target)
        return make_text_loader(ds, t.batch_size * (1 if train else 2), train=train,
                                group_by_length=d.group_by_length, seed=t.seed, collate=collate)

    train_loader = loader(splits.train, True)
    ds = train_loader.dataset
    how = splits.record["columns_chosen"]
    gen = backbone.module.generation_config
    summary = [f"source column: {splits.source_column} ({how['source']}); target column: {splits.target_column} "
               f"({how['target']})",
               f"pairs: {len(splits.train)} train, {n_val} val"
               f"{f', {len(splits.test)} test' if splits.test else ''} (val: {splits.record['val']['from']})",
               f"tokens per training pair: source mean {sum(ds.source_lengths) / len(ds):.1f} (max "
               f"{max(ds.source_lengths)}, {sum(n >= max_length for n in ds.source_lengths)} truncated to "
               f"{max_length}), target mean {sum(ds.target_lengths) / len(ds):.1f} (max {max(ds.target_lengths)}, "
               f"{sum(n >= max_target for n in ds.target_lengths)} truncated to {max_target})",
               f"generation: {gen.num_beams} beam(s), at most {gen.max_new_tokens} new tokens, length penalty "
               f"{gen.length_penalty:g}" + (f", forced first token {gen.forced_bos_token_id} ({m.tgt_lang})"
                                            if m.tgt_lang and gen.forced_bos_token_id is not None else "")
               + f"; per epoch on {min(t.eval_generate_max, n_val)} of {n_val} validation pairs, on all at the end"]
    record = {"classes": [], **splits.record, "skipped": [{"row": w, "reason": r} for w, r in splits.skipped]}
    extra = {"source_column": splits.source_column, "target_column": splits.target_column, "max_length": max_length,
             "max_target_length": max_target, **({"src_lang": m.src_lang} if m.src_lang else {}),
             **({"tgt_lang": m.tgt_lang} if m.tgt_lang else {})}
    return Prepared(backbone, task, train_loader, loader(splits.val, False),
                    loader(splits.test, False) if splits.test is not None else None, record, len(splits.skipped),
                    name, 0, None, max_length, f"max {max_length} source, {max_target} target tokens", summary,
                    extra_config=extra, sources={"tables": [p for p in (d.path, d.val) if p is not None]})


# task name -> the stage that reads its data and builds its model, task and loaders (a new task with data of
# its own kind adds its function here; tests/test_registries.py checks the keys against the schema)
PREPARERS = {
    "image-classification": prepare_images,
    "image-multilabel": prepare_images,
    "image-regression": prepare_images,
    "text-classification": prepare_text,
    "text-multilabel": prepare_text,
    "text-regression": prepare_text,
    "detection": prepare_detection,
    "seq2seq": prepare_seq2seq,
}
