"""Checks of a recipe that need no data scan: paths exist, options fit the task, the model name resolves.

They run before anything heavy loads or anything at --out changes, so a mistake costs one line, not a run.
"""

from __future__ import annotations

import importlib.util

from .config import TASK_KIND, TASKS, Recipe
from .errors import UserError
from .tracking import check as check_trackers
from .shardfiles import is_shards, shard_files


# options that only one kind of input reads: setting one for the other is a mistake worth a message
_TEXT_ONLY = {"data": ("text_column", "max_length", "group_by_length",
                       "token_delete", "token_swap", "token_mask", "synonyms", "synonym_prob"),
              "model": ("trust_remote_code",)}
_IMAGE_ONLY = {"data": ("image_size", "augment", "mixup", "cutmix", "mixup_off_epoch", "rotate", "elastic",
                        "vflip", "tta", "cache_views", "cache_images"),
               "model": ("drop_path", "head", "prune")}
# options only a detector reads, and the image options a detector does not (it resizes by --min-size/--max-size)
_DETECTION_ONLY = {"model": ("anchor_sizes", "aspect_ratios", "anchors", "hard_examples", "nms_threshold", "score_threshold",
                             "detections_per_image", "min_size", "max_size", "trainable_layers")}
_NOT_DETECTION = {"data": ("image_size", "mixup", "cutmix", "mixup_off_epoch", "rotate", "elastic", "vflip", "tta",
                           "cache_views", "cache_images", "label_column", "label_delimiter"),
                  "model": ("drop_path", "head", "dropout", "prune", "peft"),
                  "train": ("class_weights", "label_smoothing", "focal_gamma", "threshold", "l1_penalty",
                            "grad_checkpointing", "freeze_layers", "qat", "merge")}

# options only --task seq2seq reads, and the text-classification ones it does not
_SEQ2SEQ_ONLY = {"data": ("source_column", "target_column", "max_target_length"),
                 "model": ("num_beams", "max_new_tokens", "length_penalty", "src_lang", "tgt_lang"),
                 "train": ("eval_generate_max",)}
_NOT_SEQ2SEQ = {"data": ("text_column", "label_column", "label_delimiter", "token_delete", "token_swap", "token_mask",
                         "synonyms", "synonym_prob"),
                "model": ("dropout", "peft"),
                "train": ("class_weights", "focal_gamma", "threshold", "l1_penalty", "qat", "merge", "teacher")}
# T5-family models overflow in float16 (their feed-forward activations pass 65504): bf16 or fp32 only
FP16_OVERFLOWS = ("t5", "mt5", "umt5", "longt5", "switch_transformers")

# --prune with strategies that train none of the backbone's convolutions: nothing would recover what pruning removed
_NO_RECOVERY = ("linear-probe", "bitfit", "norm-head")
# the options each --peft method reads (the others set with it are a mistake worth a message)
_PEFT_OPTIONS = {"model": {"lora_r": ("lora", "dora"), "lora_alpha": ("lora", "dora"), "lora_dropout": ("lora", "dora"),
                           "lora_targets": ("lora", "dora", "ia3"), "prompt_tokens": ("prompt",)},
                 "train": {"merge": ("lora", "dora", "ia3")}}
# strategies that pick base parameters to train (or none but the head): with --peft the adapters train instead
_NOT_PEFT = ("linear-probe", "bitfit", "norm-head")


def _set(recipe: Recipe, table: dict[str, tuple[str, ...]]) -> str | None:
    """The flag of the first option of `table` set to other than its default."""
    for section, names in table.items():
        part = getattr(recipe, section)
        for name in names:
            if getattr(part, name) != type(part).model_fields[name].default:
                return f"--{name.replace('_', '-')}"
    return None


def preflight(recipe: Recipe) -> None:
    """Checks that need no data scan: paths exist, options fit the task, the model name resolves."""
    from .twostage import resolve as resolve_init

    recipe = resolve_init(recipe)  # --init: its folder checked, its --model taken (twostage.py)
    d, m, t = recipe.data, recipe.model, recipe.train
    modality, losses, monitors = TASKS[recipe.task]
    if d.path is None:
        raise UserError("--data: required: " + ("a folder of class folders, a folder with train/ and val/, "
                                                "or a CSV manifest path,label" if modality == "image" else
                                                "a CSV, TSV, JSONL or Parquet table"))
    check_trackers(recipe.trackers)  # --log-with mlflow without mlflow installed: one line naming the extra
    shards = recipe.task == "image-classification" and is_shards(d.path)
    for flag, path in (("--data", d.path), ("--val", d.val), ("--test", d.test), ("--weights", m.weights),
                       ("--synonyms", d.synonyms)):
        if shards and flag in ("--data", "--val", "--test") and path is not None and not path.is_dir():
            shard_files(path, flag)  # each file of a pattern exists, or the one-line error names the first missing
        elif path is not None and not path.exists():
            raise UserError(f"{flag} {path}: no such file or folder")
    detection, seq2seq = recipe.task == "detection", recipe.task == "seq2seq"
    for wrong in (_TEXT_ONLY if modality == "image" else _IMAGE_ONLY, _NOT_DETECTION if detection else _DETECTION_ONLY,
                  _NOT_SEQ2SEQ if seq2seq else _SEQ2SEQ_ONLY):
        flag = _set(recipe, wrong)
        if flag is not None:
            hint = " (a detector resizes by --min-size/--max-size)" if flag == "--image-size" else ""
            raise UserError(f"{flag}: does not apply to --task {recipe.task}{hint}")
    if recipe.task == "image-classification":
        for name in ("label_column", "label_delimiter"):
            if getattr(d, name) is not None:
                raise UserError(f"--{name.replace('_', '-')}: does not apply to --task image-classification "
                                f"(class folders, or a manifest with columns path,label)")
    if m.prune and t.strategy in _NO_RECOVERY:
        raise UserError(f"--prune {m.prune:g}: --strategy {t.strategy} trains none of the backbone's convolutions, so "
                        f"nothing recovers what pruning removes; use full, lp-ft, freeze-unfreeze or gradual")
    _peft_options(recipe)
    if (d.mixup or d.cutmix) and recipe.task != "image-classification":
        raise UserError(f"--mixup/--cutmix: for --task image-classification, not {recipe.task}")
    if (d.mixup or d.cutmix) and t.batch_size != "auto" and t.batch_size % 2:
        raise UserError(f"--batch-size {t.batch_size}: MixUp/CutMix mix each batch with its reverse and need an "
                        f"even batch size")
    if (d.mixup or d.cutmix) and t.loss == "focal":
        raise UserError("--loss focal: does not take the soft targets of MixUp/CutMix; use ce")
    if t.loss != "auto" and t.loss not in losses:
        raise UserError(f"--loss {t.loss}: for --task {recipe.task} expected one of {', '.join(losses)}")
    if t.metric != "auto" and t.metric not in monitors:
        raise UserError(f"--metric {t.metric}: for --task {recipe.task} expected one of {', '.join(monitors)}")
    _distillation(recipe)
    _domain_adaptation(recipe)
    from .checkpoint import parse_period
    from .models import check_spec, modality as model_modality  # imports torch: after the instant checks
    if t.qat:
        try:
            import torchao  # noqa: F401 - the `qat` extra
        except ImportError:
            raise UserError("--qat: needs torchao, which is not installed (pip install 'finetunekit[qat]')") from None
    from .models.heads import check_head

    check_head(m.head)
    _distributed(recipe)
    parse_period(t.checkpoint_every)

    if modality == "image" and not detection and not shards:
        from .data.detection import looks_like_detection

        hint = looks_like_detection(d.path)
        if hint:
            raise UserError(hint)
    if detection:
        _detection(recipe)
    if seq2seq:
        _seq2seq(recipe)
        return
    check_spec(recipe.model_name, "detection" if detection else modality)
    _detector_fits(recipe.model_name, detection)
    if model_modality(recipe.model_name, modality) != modality:  # hf: reads what the task needs
        hint = "hf:<hub id or folder> or minilm" if modality == "text" else \
            "timm:<name>, torchvision:<name>, hf:<hub id or folder> or efficientnet_lite0"
        article = "an" if modality == "image" else "a"
        raise UserError(f"--model {recipe.model_name}: reads {model_modality(recipe.model_name, modality)}s, but "
                        f"--task {recipe.task} needs {article} {modality} model ({hint})")
    if m.prune:
        _prunable(recipe)  # the model's source: after the imports above
    if t.teacher is not None:
        from .teacher import folder_of

        folder_of(t.teacher)  # a run directory or model folder (its classes are checked against the data's later)
    if m.peft:
        from .models import resolve

        if importlib.util.find_spec("peft") is None:
            raise UserError(f"--peft {m.peft}: needs peft, which is not installed (pip install 'finetunekit[peft]')")
        resolve(recipe.model_name, modality)[0].check_peft(recipe.model_name, m.peft)


def _distillation(recipe: Recipe) -> None:
    """--teacher and the --kd-* options: set together, for tasks with classes."""
    t = recipe.train
    if t.teacher is None:
        flag = _set(recipe, {"train": ("kd_alpha", "kd_temperature", "kd_hard", "kd_cache")})
        if flag is not None:
            raise UserError(f"{flag}: needs --teacher (the run directory or model folder to distill from)")
        return
    if TASK_KIND[recipe.task] not in ("classification", "multilabel"):
        raise UserError(f"--teacher: distillation is for classification and multi-label tasks, not --task "
                        f"{recipe.task}")
    if t.kd_hard and t.kd_temperature != type(t).model_fields["kd_temperature"].default:
        raise UserError("--kd-temperature: does not apply to --kd-hard (cross-entropy on the teacher's top class)")


# tasks whose batches are (image tensor, targets) through one model call: the target batch can ride along
_ADAPTABLE = ("image-classification", "image-multilabel", "image-regression")


def _domain_adaptation(recipe: Recipe) -> None:
    """--domain-adapt, --target-data and --da-weight: set together, for image tasks whose backbone trains; the
    target folder holds images (the count is a walk of names only: the files are read at the start of training)."""
    d, t = recipe.data, recipe.train
    if t.domain_adapt == "none":
        if d.target_data is not None:
            raise UserError("--target-data: needs --domain-adapt coral or mmd (the loss that aligns the training "
                            "images' features with the target images')")
        if t.da_weight != type(t).model_fields["da_weight"].default:
            raise UserError("--da-weight: needs --domain-adapt coral or mmd")
        return
    flag = f"--domain-adapt {t.domain_adapt}"
    if recipe.task not in _ADAPTABLE:
        raise UserError(f"{flag}: for --task {', '.join(_ADAPTABLE)}, not {recipe.task}")
    if d.target_data is None:
        raise UserError(f"{flag}: needs --target-data DIR, a folder of unlabeled images of the target domain")
    if not d.target_data.is_dir():
        raise UserError(f"--target-data {d.target_data}: "
                        f"{'not a folder' if d.target_data.exists() else 'no such folder'} (expected a folder of "
                        f"unlabeled target-domain images, sub-folders allowed)")
    from .imagefiles import images_under, no_images

    found = len(images_under(d.target_data))
    if not found:
        raise UserError(no_images(f"--target-data {d.target_data}"))
    if found < 2:
        raise UserError(f"--target-data {d.target_data}: one image; the alignment compares batches of at least 2")
    if t.strategy == "linear-probe":
        raise UserError(f"{flag}: --strategy linear-probe trains the head alone on the frozen backbone's features: "
                        f"nothing the alignment could move; use full (or lp-ft, freeze-unfreeze, gradual)")


def _peft_options(recipe: Recipe) -> None:
    """--peft and its options: each read by the method it is set with; the combinations that cannot work."""
    m, t = recipe.model, recipe.train
    for section, options in _PEFT_OPTIONS.items():
        part = getattr(recipe, section)
        for name, methods in options.items():
            if getattr(part, name) != type(part).model_fields[name].default and m.peft not in methods:
                raise UserError(f"--{name.replace('_', '-')}: applies to --peft {' or '.join(methods)}"
                                f"{f', not --peft {m.peft}' if m.peft else ''}")
    if not m.peft:
        return
    if m.lora_targets is not None and not any(x.strip() for x in m.lora_targets.split(",")):
        raise UserError("--lora-targets: expected comma-separated module names (qkv,fc1,fc2)")
    if t.strategy in _NOT_PEFT:
        raise UserError(f"--strategy {t.strategy}: chooses base weights to train, but with --peft {m.peft} the "
                        f"adapters train; use auto, full, freeze-unfreeze, lp-ft or gradual")
    for flag, on in (("--prune", m.prune), ("--qat", t.qat)):
        if on:
            raise UserError(f"{flag}: not with --peft {m.peft} (it changes the base weights the adapter is "
                            f"trained for)")
    if not m.pretrained and m.weights is None:
        raise UserError(f"--no-pretrained: --peft {m.peft} adapts pretrained weights, and its model folder keeps the "
                        f"adapter alone (a random base cannot be rebuilt); drop it or pass --weights FILE")


def _distributed(recipe: Recipe) -> None:
    """--sync-bn needs a GPU (torch's SyncBatchNorm has no CPU kernel); --processes inside a launcher must match it."""
    import torch

    from .distributed import check_world

    t = recipe.train
    if t.sync_bn and (t.cpu or not torch.cuda.is_available()):
        raise UserError("--sync-bn: torch's SyncBatchNorm runs on GPUs only (it has no CPU kernel); on the CPU, "
                        "drop it (each process normalizes over its own share of the batch), or use a model "
                        "without BatchNorm")
    check_world(t.processes)
    if t.fsdp:
        _fsdp(recipe)


# options that do not work on a sharded model, and why (each tried in 2 CPU processes: docs/distributed.md)
_NOT_FSDP = {
    "--ema": ("train.ema", "its average is a deep copy of the model, and FSDP does not support deepcopy"),
    "--l1-penalty": ("train.l1_penalty", "it would hold the head's weights from before they were sharded, and "
                                         "penalize nothing"),
    "--qat": ("train.qat", "its int8 conversion reads the whole model in process 0 alone"),
    "--peft": ("model.peft", "its adapter's reload for the test set and --merge are not verified on sharded "
                             "weights"),
}


def _fsdp(recipe: Recipe) -> None:
    """--fsdp with an option that does not work on a sharded model: one line, before any process starts."""
    from .config import flatten

    values = flatten(recipe.model_dump())
    for flag, (key, why) in _NOT_FSDP.items():
        if values.get(key):
            raise UserError(f"--fsdp: not with {flag} ({why}); drop one of them")
    if recipe.task == "detection":
        raise UserError("--fsdp: not with --task detection (torchvision's detectors are not sharded here); drop it")
    if recipe.task == "seq2seq":
        raise UserError("--fsdp: not with --task seq2seq (its embeddings are tied to the output layer across layer "
                        "groups, which this sharding does not verify); drop it")
    if recipe.train.domain_adapt != "none":
        raise UserError(f"--fsdp: not with --domain-adapt {recipe.train.domain_adapt} (its hooks on the head and the "
                        f"model's forward are not verified on a sharded model); drop one of them")


def _detection(recipe: Recipe) -> None:
    """Detection options that need no data: numbers parse, sizes are ordered, a COCO evaluator is installed."""
    from .inputs import parse_numbers
    from .tasks.detection import backend

    m = recipe.model
    parse_numbers(m.anchor_sizes, "--anchor-sizes", int)
    parse_numbers(m.aspect_ratios, "--aspect-ratios")
    if m.anchors == "auto" and (m.anchor_sizes or m.aspect_ratios):
        raise UserError(f"--anchors auto: fits the anchor sizes and aspect ratios itself; drop "
                        f"{'--anchor-sizes' if m.anchor_sizes else '--aspect-ratios'} (or --anchors model)")
    if m.min_size is not None and m.max_size is not None and m.max_size < m.min_size:
        raise UserError(f"--max-size {m.max_size}: must be at least --min-size {m.min_size}")
    if backend() is None:
        raise UserError("--task detection: needs pycocotools or faster-coco-eval for mean average precision "
                        "(pip install pycocotools)")


def _seq2seq(recipe: Recipe) -> None:
    """--task seq2seq: an encoder-decoder model (hf:), the metrics' libraries installed, no fp16 for T5."""
    import json
    from pathlib import Path

    from .models import check_spec, resolve

    spec, t = recipe.model_name, recipe.train
    source = resolve(spec, "seq2seq")[0]
    if source.modality != "seq2seq":
        raise UserError(f"--model {spec}: not an encoder-decoder model; --task seq2seq takes hf:<hub id or folder> "
                        f"of a T5, BART, mBART, Marian or other AutoModelForSeq2SeqLM model")
    check_spec(spec, "seq2seq")
    missing = [name for name, module in (("sacrebleu", "sacrebleu"), ("rouge-score", "rouge_score"))
               if importlib.util.find_spec(module) is None]
    if missing:
        raise UserError(f"--task seq2seq: needs {' and '.join(missing)} for BLEU, chrF and ROUGE-L "
                        f"(pip install 'finetunekit[seq2seq]')")
    config = Path(spec.partition(":")[2]).expanduser() / "config.json"
    model_type = None
    if config.is_file():
        try:
            model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError, AttributeError):
            model_type = None  # the loader names what is wrong with the folder
    else:
        model_type = next((k for k in FP16_OVERFLOWS if k in spec.lower()), None)
    if t.strategy in ("linear-probe", "lp-ft", "freeze-unfreeze", "gradual"):  # lm_head is tied to the embeddings
        raise UserError(f"--strategy {t.strategy}: starts with the head alone, and a seq2seq model's output layer "
                        f"shares its weights with the embeddings (T5, BART), so that phase trains nothing of its own; "
                        f"use full (the default for seq2seq)")
    if t.metric in ("bleu", "chrf", "rouge_l") and t.eval_generate_max == 0:
        raise UserError(f"--metric {t.metric}: scores the texts generated after each epoch, and --eval-generate-max 0 "
                        f"generates none; raise it or use --metric loss")
    if t.precision == "fp16" and model_type in FP16_OVERFLOWS:
        raise UserError(f"--precision fp16: {spec} is a {model_type} model, whose activations overflow float16 "
                        f"(inf/NaN losses); use --precision bf16 (GPUs since Ampere) or no")


def _prunable(recipe: Recipe) -> None:
    from .models import resolve

    m = recipe.model
    if importlib.util.find_spec("torch_pruning") is None:
        raise UserError(f"--prune {m.prune:g}: needs torch-pruning (pip install 'finetunekit[prune]')")
    if not resolve(recipe.model_name, "image")[0].prunable:
        raise UserError(f"--prune {m.prune:g}: for the CNNs of timm, torchvision and the built-in efficientnet_lite0, "
                        f"not --model {recipe.model_name}")


def _detector_fits(spec: str, detection: bool) -> None:
    from .models import resolve

    source = resolve(spec, "detection" if detection else None)[0]
    if detection and not getattr(source, "detector", False):
        raise UserError(f"--model {spec}: a classification model; --task detection takes the built-in "
                        f"fasterrcnn_efficientnet_lite0 or torchvision:fasterrcnn_resnet50_fpn(_v2), "
                        f"torchvision:fasterrcnn_mobilenet_v3_large(_320)_fpn")
    if not detection and getattr(source, "detector", False):
        raise UserError(f"--model {spec}: a detector; use it with --task detection")
