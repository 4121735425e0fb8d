"""The build stages of a run, each with explicit inputs and a typed result:

    accelerator(...)                  devices, precision, accumulation (accelerate)
    inputs(...)                       data, model and task (finetunekit.inputs), --batch-size auto's probe
    playbook(...)                     --strategy auto and the default --epochs, from the data (finetunekit.playbook)
    teacher(...)                      --teacher: the distillation teacher, loaded and checked (finetunekit.teacher)
    prune(...)                        --prune: structured channel pruning of the backbone (finetunekit.pruning)
    peft(...)                         --peft: adapters on the frozen backbone (finetunekit.peft_methods)
    hyperparameters(...) -> Hyper     lr, schedule, warmup and the monitored metric, defaults resolved
    plan_and_optimizer(...)           the strategy's plan (its first phase applied) and the optimizer
    fast_inputs(...) -> Trained       what actually trains, on what: cached features, the decoded-image cache
    teacher_logits(...) -> Trained    --teacher: its logits cached on the training loaders whose inputs never change
    addons(...) -> AddOns             EMA, MixUp/CutMix, TTA, the L1 penalty, gradient checkpointing, QAT, distillation
    resolved_recipe(...)              the recipe with every default the run chose written in

run.py calls them in this order. A stage reads the recipe's typed sections; what it builds (datasets,
models, tasks, add-ons, the loop) gets plain arguments.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from . import distributed, fastpath, faults, features
from .addons import ADDONS
from .addons.base import AddOns
from .config import TASK_KIND, DataConfig, ModelConfig, Recipe, TrainConfig, absolute_paths
from .data import make_loader
from .errors import UserError
from .inputs import Prepared, prepare_inputs
from .models.weights import weights_sha256
from .playbook import Choice, choose, default_epochs
from .optim import DEFAULT_MIN_LR_RATIO, DEFAULT_SCHEDULER, build_optimizer, default_lr, default_warmup
from .strategies import Phase, Plan, apply_phase, make_plan, plural

log = logging.getLogger("finetunekit")

AUTO_BATCH = 32  # --batch-size auto aims at an effective batch of this x --grad-accum (a task's own
# `auto_batch` where it has one: detection's 8)


def accelerator(precision: str, grad_accum: int, cpu: bool, run_dir: Path | None, module: nn.Module | None = None,
                log_with: Sequence[str] = (), fsdp: bool = False):
    """accelerate's Accelerator. `--precision auto`: bf16 on GPUs that support it, else fp16; on the CPU bf16
    where `fastpath.cpu_bf16(module)` says it pays for this model, else fp32 (also while the model is not
    built yet: `with_model_precision` decides once it is). `log_with`: the run's trackers (tracking.py). `--fsdp`
    on several GPUs: accelerate's FSDP2 plugin (whole state dicts for the model folder; on the CPU accelerate
    cannot shard: finetunekit.sharding does)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DataLoaderConfiguration

    # one Accelerator per run, also when several runs share a process (tests, notebooks, sweeps)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    gpu = torch.cuda.is_available() and not cpu
    if precision == "auto":
        why = None if gpu or module is None else fastpath.cpu_bf16(module)
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if gpu else "bf16" if why else "no"
        if why:
            log.info("--precision auto: bf16 autocast on this CPU (%s)", why)
    if precision == "fp16" and not gpu:
        raise UserError("--precision fp16: needs a GPU; use bf16 or no on the CPU")
    kwargs: dict[str, Any] = {}
    if run_dir is not None and log_with:
        from .tracking import trackers

        kwargs = dict(log_with=trackers(list(log_with), run_dir), project_dir=str(run_dir))
    if fsdp and gpu and distributed.world_size() > 1:  # the wrap policy's classes are set once the model is built
        from accelerate.utils import FullyShardedDataParallelPlugin

        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", state_dict_type="FULL_STATE_DICT",
            reshard_after_forward=True, cpu_ram_efficient_loading=False)
    # on a GPU, batches go to the device without blocking the host (the image loaders pin their memory)
    return Accelerator(mixed_precision=precision, gradient_accumulation_steps=grad_accum, cpu=cpu,
                       dataloader_config=DataLoaderConfiguration(non_blocking=gpu), **kwargs)


def with_model_precision(accel, t: TrainConfig, module: nn.Module, run_dir: Path | None, log_with: Sequence[str] = ()):
    """The run's Accelerator once its model is built: `--precision auto` on the CPU decides per model (bf16
    for transformers on CPUs with bf16 instructions, fp32 for CNNs), so the one built before the model
    (fp32) is replaced where the model takes bf16. (`--batch-size auto` probed in fp32: bf16 needs less.)
    A T5-family model on a GPU without bf16 trains in fp32, not fp16 (its activations overflow float16)."""
    from .preflight import FP16_OVERFLOWS

    model_type = getattr(getattr(module, "config", None), "model_type", None)
    if t.precision == "auto" and accel.mixed_precision == "fp16" and model_type in FP16_OVERFLOWS:
        log.info("--precision auto: fp32, not fp16, for this %s model (it overflows float16; this GPU has no bf16)",
                 model_type)
        return accelerator("no", t.grad_accum, t.cpu, run_dir, module, log_with, fsdp=t.fsdp)
    if t.precision != "auto" or accel.device.type != "cpu" or not fastpath.cpu_bf16(module):
        return accel
    return accelerator(t.precision, t.grad_accum, t.cpu, run_dir, module, log_with, fsdp=t.fsdp)


def inputs(recipe: Recipe, accelerator) -> tuple[Recipe, Prepared]:
    """The run's data, model and task; with --batch-size auto, the recipe with the chosen numbers in."""
    if recipe.train.batch_size == "auto":
        return auto_batch(recipe, accelerator)
    return recipe, prepare_inputs(recipe.task, recipe.data, recipe.model, recipe.train,
                                  gpu=accelerator.device.type == "cuda")


def playbook(recipe: Recipe, inputs: Prepared) -> tuple[Recipe, list[str]]:
    """The recipe with what finetunekit.playbook decides from the data filled in: --strategy auto's choice,
    and the default --epochs of the modality; and the log lines that say what was chosen and why."""
    t, lines = recipe.train, []
    if t.strategy != "auto" and t.epochs is not None:
        return recipe, lines
    resolved = recipe.model_copy(deep=True)
    if t.epochs is None:
        resolved.train.epochs = default_epochs(recipe.modality)
    if t.strategy == "auto":
        m = recipe.model
        choice = Choice("full", f"--prune {m.prune:g}: every layer trains to recover what pruning "
                                f"removed") if m.prune else \
            Choice("full", f"--peft {m.peft}: the adapters and the new head train together from the first "
                           f"epoch") if m.peft else \
            choose(recipe.task, recipe.modality, TASK_KIND[recipe.task], inputs.train_targets,
                   inputs.sources.get("train"), inputs.image_size)
        if m.init:  # --init: the features the head starts on are the earlier run's, not the source's
            choice = Choice(choice.strategy, choice.reason.replace("the pretrained features",
                                                                   f"the features of --init {m.init}"))
        if choice.strategy == "linear-probe" and t.domain_adapt != "none":  # a frozen backbone aligns nothing
            choice = Choice("lp-ft", f"{choice.reason}; but --domain-adapt {t.domain_adapt} needs the backbone to "
                                     f"train: the head first on fixed features, then every layer with the alignment")
        resolved.train.strategy = choice.strategy
        lines.append(choice.line())
    return resolved, lines


def prune(m: ModelConfig, inputs: Prepared) -> str | None:
    """--prune: channels removed from the backbone in place, before the optimizer sees its parameters
    (finetunekit.pruning); the log line that says how much, or None."""
    if not m.prune:
        return None
    from .pruning import prune as prune_channels

    report = prune_channels(inputs.backbone, m.prune, inputs.image_size)
    inputs.extra_config["prune"] = m.prune  # recorded in the model folder beside its pruned_layers
    return report.line()


def peft(m: ModelConfig, inputs: Prepared) -> str | None:
    """--peft: the method's adapters put on the backbone in place, every base weight frozen, before the
    optimizer sees its parameters (finetunekit.peft_methods); the log line that says what trains, or None."""
    from .peft_methods import PeftOptions, apply

    options = PeftOptions.of(m)
    if options is None:
        return None
    base = {"model": inputs.model_name, "pretrained": m.pretrained and m.weights is None,
            "weights": str(m.weights.resolve()) if m.weights else None, "trust_remote_code": m.trust_remote_code}
    return apply(inputs.backbone, options, base)


@dataclass
class Hyper:
    lr: float
    scheduler: str  # the schedule kind, "auto" resolved
    warmup: float  # epochs
    min_lr_ratio: float
    monitor: str  # the validation metric that picks the best epoch
    effective_batch: int


def hyperparameters(t: TrainConfig, modality: str, task, processes: int, peft: str | None = None) -> Hyper:
    effective_batch = t.batch_size * t.grad_accum * processes
    lr = t.lr or default_lr(modality, t.strategy, effective_batch, t.optimizer, peft=peft is not None)
    kind = DEFAULT_SCHEDULER[modality] if t.scheduler == "auto" else t.scheduler
    warmup = t.warmup if t.warmup is not None else \
        0.3 * t.epochs if kind == "onecycle" else default_warmup(modality, t.epochs)
    min_lr_ratio = DEFAULT_MIN_LR_RATIO[kind] if t.min_lr_ratio is None else t.min_lr_ratio
    monitor = task.default_monitor if t.metric == "auto" else t.metric
    return Hyper(lr, kind, warmup, min_lr_ratio, monitor, effective_batch)


def plan_and_optimizer(t: TrainConfig, backbone, lr: float, fused: bool = False):
    """The strategy's plan (its first phase applied) and the optimizer over every parameter."""
    plan = make_plan(t.strategy, backbone, t.epochs, head_epochs=t.head_epochs, unfreeze_every=t.unfreeze_every,
                     freeze=t.freeze, freeze_types=t.freeze_types, freeze_layers=t.freeze_layers)
    apply_phase(plan.phases[0], backbone.module)
    optimizer = build_optimizer(backbone, lr, t.weight_decay, name=t.optimizer, momentum=t.momentum,
                                layer_decay=t.layer_decay, head_lr_mult=t.head_lr_mult, fused=fused)
    return plan, optimizer


@dataclass
class Trained:
    """What trains and what it reads: the whole model on its loaders, or (linear probe on cached
    features) the head alone on feature loaders; for a staged strategy, also the head and feature loaders
    of its leading head-only phases."""

    module: nn.Module
    plan: Plan
    train_loader: Any
    val_loader: Any
    cached: bool  # the head on cached features, the whole run
    cache_images: str | None  # the decoded-image cache, resolved: on | off (images), None (text)
    features: tuple | None = None  # (head, train loader, val loader) for the phases marked on_features


def fast_inputs(recipe: Recipe, inputs: Prepared, plan: Plan, split_hashes: dict[str, str], device,
                pin_memory: bool, processes: int = 1) -> Trained:
    """Cached features for a linear probe, and for the head-only phases a staged strategy begins with, when
    they can be used; else (and for the other phases) the decoded-image cache for images when it pays;
    else the model on its loaders as prepared."""
    d, t = recipe.data, recipe.train
    reason = features.why_not(d, recipe.modality, inputs.backbone) or \
        ("shard data is streamed: nothing is cached" if inputs.streamed else None) or \
        ("--qat trains through the fake-quantized backbone" if t.qat else None) or \
        ("--kd-cache off: the teacher reads the images of every batch" if t.teacher and t.kd_cache == "off" else None) or \
        (f"--peft {recipe.model.peft}: the head is peft's trained copy inside the model" if recipe.model.peft else None) or \
        ("--fsdp: the whole model is sharded across the processes" if t.fsdp and processes > 1 else None)
    if t.strategy == "linear-probe":
        if reason is None:
            head, train, val = cached_features(d, recipe.model, t, inputs, split_hashes, device)
            plan = Plan(plan.strategy, [Phase(0, frozenset(n for n, _ in head.named_parameters()), 1.0,
                                              "the head, on cached features")])
            return Trained(head, plan, train, val, True, None)
        log.info("features not cached: %s", reason)
    cached_phases = None
    leading = _leading_head_phases(plan, inputs.backbone)
    if leading:
        reason = reason or ("--ema averages the whole model" if t.ema else None) or \
            ("several processes: the head alone would not synchronize its gradients" if processes > 1 else None)
        if reason is None:
            cached_phases = cached_features(d, recipe.model, t, inputs, split_hashes, device)
            plan = Plan(plan.strategy, [dataclasses.replace(p, on_features=True) if i < leading else p
                                        for i, p in enumerate(plan.phases)])
            k = plan.phases[leading].start_epoch
            log.info("the head-only phase (%s) trains on cached features", plural(k, "epoch"))
        else:
            log.info("head-only phase: features not cached: %s", reason)
    if inputs.streamed:  # shards: read as a stream every epoch (docs/data.md)
        log.debug("decoded images: not cached (shard data is streamed)")
        return Trained(inputs.backbone.module, plan, inputs.train_loader, inputs.val_loader, False, "off",
                       cached_phases)
    if recipe.modality != "image" or not inputs.task.decoded_cache:  # detection: its samples carry their boxes
        return Trained(inputs.backbone.module, plan, inputs.train_loader, inputs.val_loader, False, None,
                       cached_phases)
    decoded = decoded_loaders(d, t, inputs, split_hashes, pin_memory)
    if decoded is None:
        return Trained(inputs.backbone.module, plan, inputs.train_loader, inputs.val_loader, False, "off",
                       cached_phases)
    train, val, normalize = decoded
    inputs.task.input_transform = normalize  # uint8 batches -> the model's input, where they train
    return Trained(inputs.backbone.module, plan, train, val, False, "on", cached_phases)


def _leading_head_phases(plan: Plan, backbone) -> int:
    """How many phases at the start of `plan` train the head alone (the backbone still as loaded)."""
    head = frozenset(n for n, _ in backbone.module.named_parameters() if backbone.is_head(n))
    n = 0
    while n < len(plan.phases) and plan.phases[n].trainable and plan.phases[n].trainable <= head:
        n += 1
    return n if n < len(plan.phases) else 0  # a plan of head-only phases is a linear probe: handled above


def cached_features(d: DataConfig, m: ModelConfig, t: TrainConfig, inputs: Prepared, split_hashes: dict[str, str],
                    device):
    """The head to train (with the model's dropout in front, if any) and loaders over cached features.

    With augmentation, `--cache-views K` caches K augmented views of each training image; without it the
    features are computed once, unaugmented (what a linear probe does best with: docs/strategies.md). With
    an automatic validation split, unaugmented features are cached as one pool over train and val, keyed by
    content alone, so another --seed (another split) reads them back instead of running the backbone."""
    import timm

    from .checkpoint import sha256_file
    from .data import ImageDataset, Split

    backbone = inputs.backbone
    train_ds, val_ds = inputs.train_loader.dataset, inputs.val_loader.dataset
    views = d.cache_views or 1
    augmented = features.augmented(d) and d.cache_views is not None
    if features.augmented(d) and not augmented:
        log.info("features cached without augmentation (the linear-probe default; --cache-views K caches K "
                 "augmented views per image)")
        train_ds = copy.copy(train_ds)
        train_ds.transform = val_ds.transform
    common = {"format": features.FORMAT, "model": inputs.model_name, "pretrained": m.pretrained,
              "weights": sha256_file(m.weights) if m.weights else None, "head": backbone.heads[0],
              "backbone_sha256": weights_sha256(backbone.module, backbone.is_head),  # the weights as they are: a random init differs by seed
              "preprocessing": backbone.preprocessing.to_dict(), "torch": torch.__version__,
              "timm": timm.__version__}

    def extract(ds, aug: bool, what: str, parts: dict):
        started = time.perf_counter()
        x, y, hit = features.load_or_extract(parts, lambda: features.extract(
            backbone, ds, views=parts["views"], seed=t.seed, augmented=aug, device=device,
            batch_size=t.batch_size, workers=inputs.num_workers))  # 32 beat 64: 1.2x on EfficientNet-Lite0, 96 px
        log.info("features (%s): %d x %d%s, %s in %.1fs", what, x.shape[1], x.shape[2],
                 f" x {x.shape[0]} views" if x.shape[0] > 1 else "", "read from the cache" if hit else "computed",
                 time.perf_counter() - started)
        return x, y

    pooled = not augmented and "fraction" in (inputs.split_record.get("val") or {})
    if pooled:  # one pool over train and val in content order: the same for every seed's split
        splits = {"train": train_ds, "val": val_ds}
        file_keys = {split: [f"{label!r}\0{sha256_file(Path(path))}" for path, label in zip(ds.paths, ds.labels)]
                     for split, ds in splits.items()}  # label and content: what a pooled row stands for
        items = {k: (path, label) for split, ds in splits.items()
                 for k, path, label in zip(file_keys[split], ds.paths, ds.labels)}
        keys = sorted(items)
        pool = ImageDataset(Split([items[k][0] for k in keys], [items[k][1] for k in keys]), val_ds.transform)
        x, y = extract(pool, False, "train and val, pooled", {
            **common, "data": _sha256_of(keys), "transform": repr(val_ds.transform), "views": 1, "seed": None})
        index = {k: i for i, k in enumerate(keys)}
        cached = {}
        for split in splits:
            rows = torch.tensor([index[k] for k in file_keys[split]], dtype=torch.long)
            cached[split] = (x[:, rows], y[rows])
    else:
        cached = {split: extract(ds, aug, split, {
            **common, "data": split_hashes[split], "targets": _sha256_of(repr(y) for y in ds.labels),
            "transform": repr(ds.transform), "views": views if aug else 1, "seed": t.seed if aug else None})
            for split, ds, aug in (("train", train_ds, augmented), ("val", val_ds, False))}
    out = {split: make_loader(features.Features(*cached[split]), t.batch_size * (1 if split == "train" else 2),
                              train=split == "train", workers=0, seed=t.seed) for split in ("train", "val")}
    head = backbone.module.get_submodule(backbone.heads[0])
    trained = features.WithDropout(m.dropout, head) if m.dropout and m.head == "linear" else head
    return trained, out["train"], out["val"]


def _sha256_of(lines) -> str:
    import hashlib

    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def decoded_loaders(d: DataConfig, t: TrainConfig, inputs: Prepared, split_hashes: dict[str, str],
                    pin_memory: bool):
    """Training and validation loaders over the decoded-image cache (uint8 batches) and the Normalize that
    turns their batches into the model's input; None when the cache is off or does not pay."""
    from .data.decoded import Normalize, decoded_datasets

    pre = inputs.backbone.preprocessing
    datasets = decoded_datasets({"train": inputs.train_loader.dataset, "val": inputs.val_loader.dataset},
                                split_hashes, mode=d.cache_images, epochs=t.epochs, pre=pre, augment=d.augment,
                                rotate=d.rotate, elastic=d.elastic, vflip=d.vflip)
    if datasets is None:
        return None
    train, val = (make_loader(datasets[s], t.batch_size * (1 if s == "train" else 2), train=s == "train",
                              workers=inputs.num_workers, seed=t.seed, pin_memory=pin_memory)
                  for s in ("train", "val"))
    return train, val, Normalize(pre.mean, pre.std)


def with_head(backbone, trained: nn.Module) -> nn.Module:
    """The whole model carrying `trained`'s head weights (the trained head itself, or its EMA copy)."""
    head, name = features.head_of(trained), backbone.heads[0]
    if head is backbone.module.get_submodule(name):
        return backbone.module
    full = copy.deepcopy(backbone.module)
    full.get_submodule(name).load_state_dict(head.state_dict())
    return full


def teacher(recipe: Recipe, inputs: Prepared, accelerator):
    """--teacher: the distillation teacher (finetunekit.teacher), loaded and checked against the student (task,
    classes, inputs) and on the device; None without one. Before the run claims its folder: a teacher that does
    not fit is a one-line error."""
    t = recipe.train
    if t.teacher is None:
        return None
    from .teacher import load_teacher, why_live

    return load_teacher(t.teacher, recipe.task, inputs, live=why_live(recipe.data, recipe.modality, t.kd_cache),
                        device=accelerator.device, autocast=accelerator.autocast)


def teacher_logits(recipe: Recipe, inputs: Prepared, trained: Trained, teacher, split_hashes: dict[str, str],
                   device) -> Trained:
    """The training loaders whose inputs are the same every epoch, their samples carrying the teacher's logits,
    computed once (finetunekit.teacher): a head on cached features always (the teacher cannot read features:
    its logits are of the same views), the whole model's loader when nothing changes its inputs between epochs
    (else the teacher runs on every batch, said in the log)."""
    if teacher is None:
        return trained
    from .data.order import sample_seed
    from .teacher import attach, cached, why_live

    d, t = recipe.data, recipe.train
    options = dict(batch_size=t.batch_size * 2, device=device)
    out, sources = trained, []
    if trained.cached or trained.features is not None:  # the views the cached features were computed from
        ds, aug = inputs.train_loader.dataset, features.augmented(d) and d.cache_views is not None
        if not aug:
            ds = copy.copy(ds)
            ds.transform = inputs.val_loader.dataset.transform
        views = [[(i, sample_seed(t.seed, features.VIEW_EPOCHS + v, i)) if aug else i for i in range(len(ds))]
                 for v in range((d.cache_views or 1) if aug else 1)]
        logits = cached(teacher, {"data": split_hashes["train"], "transform": repr(ds.transform),
                                  "seed": t.seed if aug else None}, "train, the cached features' views", ds, views,
                        collate=None, transform=None, own=False, workers=inputs.num_workers, **options)
        if trained.cached:
            out = dataclasses.replace(out, train_loader=attach(out.train_loader, logits))
        else:
            head, train, val = out.features
            out = dataclasses.replace(out, features=(head, attach(train, logits), val))
        sources.append("cached" if trained.cached else "cached (head phase, on features)")
    if not trained.cached:
        reason = ("shard data is streamed: nothing is cached" if inputs.streamed else None) or \
            why_live(d, recipe.modality, t.kd_cache)
        if reason is None:
            ds, parts, own, collate = _teacher_inputs(recipe, inputs, trained, teacher, split_hashes)
            logits = cached(teacher, parts, "train", ds, [list(range(len(ds)))], collate=collate,
                            transform=inputs.task.input_transform, own=own, workers=0 if own else inputs.num_workers,
                            **options)
            out = dataclasses.replace(out, train_loader=attach(out.train_loader, logits))
            sources.append("cached")
        else:
            log.info("distillation: the teacher runs on every training batch (%s)", reason)
            sources.append("every batch")
    teacher.logits_source = " + ".join(dict.fromkeys(sources))
    return out


def _teacher_inputs(recipe: Recipe, inputs: Prepared, trained: Trained, teacher, split_hashes: dict[str, str]):
    """What the teacher reads for cached logits of the whole model's (unchanging) training inputs: (dataset,
    the cache key's parts, whether the samples are in the teacher's own form, their collate)."""
    ds = trained.train_loader.dataset
    if recipe.modality == "image":  # the training dataset itself (the decoded-image cache's uint8, or files)
        return ds, {"data": split_hashes["train"], "dataset": type(ds).__name__, "transform": repr(ds.transform),
                    "student": inputs.backbone.preprocessing.to_dict()}, False, trained.train_loader.collate_fn
    from .data.text import PadCollate, TextDataset

    parts = {"data": _sha256_of("\0".join(t) for t in ds.texts), "dataset": "text"}
    if teacher.adapt is not None:  # the same tokenizer: the student's own ids
        tok = inputs.backbone.tokenizer
        return ds, {**parts, "tokenizer": [tok.name_or_path, ds.max_length]}, False, trained.train_loader.collate_fn
    tok, length = teacher.model.tokenizer, teacher.model.max_length
    own = TextDataset(ds.texts, ds.targets, tok, length)
    return own, {**parts, "tokenizer": [tok.name_or_path, length]}, True, \
        PadCollate(tok.pad_token_id, tok.padding_side == "left", torch.float32)


def addons(d: DataConfig, t: TrainConfig, modality: str, backbone, task, teacher=None, processes: int = 1,
           workers: int = 0) -> AddOns:
    """The run's add-ons, in the order their hooks run. `workers`: the target images' loader's (--domain-adapt)."""
    out = AddOns()
    if t.sync_bn:  # first: every later hook sees the model's final layers
        out.append(ADDONS["sync-bn"](processes))
    if t.grad_checkpointing:
        out.append(ADDONS["grad-checkpointing"](backbone))
    if t.qat:  # first: the layers it swaps are the ones every later hook sees
        out.append(ADDONS["qat"](backbone, t.max_accuracy_drop))
    if modality == "image" and (d.mixup or d.cutmix):
        out.append(ADDONS["mixup"](d.mixup, d.cutmix, t.label_smoothing, task.num_outputs, d.mixup_off_epoch))
    if teacher is not None:  # after MixUp/CutMix: the teacher sees the mixed batch
        out.append(ADDONS["distill"](teacher, t.kd_alpha, t.kd_temperature, t.kd_hard, task.kind == "multilabel",
                                     getattr(task, "threshold", 0.5)))
    if t.domain_adapt != "none":  # after MixUp and the teacher: they see the source batch alone
        out.append(domain_adaptation(d, t, backbone, workers))
    if t.l1_penalty:
        head_weights = [p for n, p in backbone.module.named_parameters() if backbone.is_head(n) and p.ndim >= 2]
        out.append(ADDONS["l1"](t.l1_penalty, head_weights))
    if t.ema:
        out.append(ADDONS["ema"](t.ema))
    if t.merge:
        out.append(ADDONS["merge"]())
    if modality == "image" and d.tta != "none":
        out.append(ADDONS["tta"](d.tta))
    return out


def domain_adaptation(d: DataConfig, t: TrainConfig, backbone, workers: int):
    """--domain-adapt: the target images (scanned once: the unreadable ones left out, their content hashed) on a
    loader with the training transforms, and the add-on that aligns each training batch with a batch of them."""
    from .addons.domain_adapt import content_hash, target_loader
    from .data import build_transform
    from .data.images import scan_images
    from .imagefiles import images_under

    if len(backbone.heads) != 1:
        raise UserError(f"--domain-adapt {t.domain_adapt}: the model's head is several modules ({backbone.head}); "
                        f"one is needed")
    paths = images_under(d.target_data)
    report = scan_images(paths)
    if report.bad:
        log.warning("domain adaptation: skipped %d unreadable target image(s) of %d (first: %s: %s)", len(report.bad),
                    len(paths), *report.bad[0])
        paths = [p for p, ok in zip(paths, report.ok) if ok]
    if len(paths) < 2:
        raise UserError(f"--target-data {d.target_data}: {len(paths)} readable image(s); the alignment needs at "
                        f"least 2")
    transform = build_transform(backbone.preprocessing, d.augment, rotate=d.rotate, elastic=d.elastic, vflip=d.vflip)
    loader, sampler = target_loader(paths, transform, t.batch_size, seed=t.seed + 1_000_003 * distributed.rank(),
                                    workers=workers)
    digest = content_hash(d.target_data, paths)
    log.info("domain adaptation: %s (weight %g) between each training batch and a batch of the %d unlabeled images "
             "of %s (content %s), on the features the head reads", t.domain_adapt, t.da_weight, len(paths),
             d.target_data, digest[:12])
    return ADDONS["domain-adapt"](t.domain_adapt, t.da_weight, backbone, loader, sampler, folder=d.target_data,
                                  images=len(paths), digest=digest)


def resolved_recipe(recipe: Recipe, out: Path, hyper: Hyper, inputs: Prepared, trained: Trained) -> Recipe:
    """The recipe as the run ran it: every default it resolved filled in, so a re-run (or --resume)
    makes the same choices."""
    r = recipe.model_copy(deep=True)
    r.out, r.resume, r.resume_force, r.overwrite = out, None, False, False
    r.train.lr, r.train.scheduler, r.train.warmup = hyper.lr, hyper.scheduler, hyper.warmup
    r.train.min_lr_ratio, r.train.metric = hyper.min_lr_ratio, hyper.monitor
    r.model.name = inputs.model_name
    r.data.num_workers = inputs.num_workers
    if inputs.image_size is not None:
        r.data.image_size = inputs.image_size
    if inputs.max_length is not None:
        r.data.max_length = inputs.max_length
    if trained.cache_images is not None:
        r.data.cache_images = trained.cache_images
    return absolute_paths(r)  # the file names the same data wherever it is read from (--resume, --config)


def auto_batch(recipe: Recipe, accelerator) -> tuple[Recipe, Prepared]:
    """--batch-size auto: the largest of AUTO_BATCH x grad_accum, half that, ... whose forward and backward
    pass on real training samples fits in memory, with grad_accum raised to keep the effective batch.
    Returns the recipe with the numbers filled in and its prepared inputs."""
    from accelerate.utils import send_to_device

    from .tasks import TASKS

    target = getattr(TASKS[recipe.task], "auto_batch", AUTO_BATCH) * recipe.train.grad_accum
    size = target
    gpu = accelerator.device.type == "cuda"
    while True:
        trial = recipe.model_copy(deep=True)
        trial.train.batch_size, trial.train.grad_accum = size, -(-target // size)
        inputs = prepare_inputs(trial.task, trial.data, trial.model, trial.train, gpu=gpu)
        module = inputs.backbone.module.to(accelerator.device)
        loader = getattr(inputs.train_loader, "loader", inputs.train_loader)  # a stream's DataLoader (data.shards)
        if isinstance(loader.dataset, torch.utils.data.IterableDataset):  # shards: the first samples of the stream
            samples = list(itertools.islice(iter(loader.dataset), min(size, len(loader.dataset))))
        else:
            samples = [loader.dataset[(i, 0)] for i in range(min(size, len(loader.dataset)))]
        batch = send_to_device(loader.collate_fn(samples), accelerator.device)  # tensors, dicts, lists of either
        buffers = {k: b.clone() for k, b in module.named_buffers()}  # BatchNorm statistics: put back after
        try:
            faults.point("probe")
            with torch.random.fork_rng(devices=range(torch.cuda.device_count())), accelerator.autocast():
                inputs.task.step(module, inputs.task.prepare(batch)).loss.backward()
            fits = True
        except torch.OutOfMemoryError:
            fits = False
        module.zero_grad(set_to_none=True)
        with torch.no_grad():
            for k, b in module.named_buffers():
                b.copy_(buffers[k])
        if fits:
            break
        del module, inputs, batch, buffers
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if size == 1:
            raise UserError("--batch-size auto: even a batch of 1 does not fit in memory; try a smaller "
                            "--image-size or --max-length, or another model")
        log.info("--batch-size auto: %d does not fit", size)
        size //= 2
    log.info("--batch-size auto: %d x --grad-accum %d (effective batch %d)", size, trial.train.grad_accum,
             size * trial.train.grad_accum)
    return trial, inputs
