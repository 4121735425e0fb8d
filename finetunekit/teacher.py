"""The teacher of knowledge distillation (`--teacher`; the loss is the add-on addons/distill.py): loaded
from a run directory or model folder, checked against the student, fed the student's batches, and its
logits cached when the student's inputs are the same every epoch.

The teacher sees what the student sees, after every augmentation (MixUp/CutMix included), through its own
preprocessing where that differs: an image batch, normalized for the student, is resized to the teacher's
input size and renormalized to the teacher's mean and std (`Renormalize`); a text batch is the student's
token ids when the two tokenizers are the same, else the teacher tokenizes the raw texts itself, which only
the cached path can do (token augmentation with two tokenizers is refused: the teacher cannot see the
augmented tokens).

Cached logits: when the student's inputs do not change between epochs (no augmentation; or a head on cached
backbone features, whose views are fixed), one pass computes the teacher's logits for every training sample
(and every cached view) and they are stored on disk under a key of the teacher's weights (SHA-256), the
training data's content and order, and both models' preprocessing (`features.load_or_extract`). The
training loader's samples then carry their logits (`attach`: (x, y, logits)); the add-on takes them off each
batch. A head on cached features needs this (the teacher cannot read feature vectors); elsewhere it saves
the teacher's forward pass on every epoch after the first run.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .errors import UserError
from .models.weights import weights_sha256
from .tasks import logits_of

log = logging.getLogger("finetunekit")

FORMAT = 1  # of a cached entry of teacher logits


def folder_of(spec: str) -> Path:
    """The model folder a --teacher value names (its config.json is there; no weights read yet)."""
    from .rundir import find_model_folder
    from .config import BUILTIN_MODELS

    if spec.startswith(("timm:", "torchvision:")) or spec in BUILTIN_MODELS:
        raise UserError(f"--teacher {spec}: the teacher must know the student's classes: give a finetunekit run "
                        f"directory or model folder (fine-tune the teacher with `finetunekit fit` first), or "
                        f"hf:<folder> of a classification model whose config.json names its labels")
    path = Path(spec[3:] if spec.startswith("hf:") else spec).expanduser()
    if not path.exists():
        hint = " (hf: takes a local folder; download a hub model first)" if spec.startswith("hf:") else ""
        raise UserError(f"--teacher {spec}: no such run directory or model folder{hint}")
    try:
        return find_model_folder(path)
    except UserError as e:
        raise UserError(f"--teacher {e}") from None


def _names(classes: list[str], limit: int = 6) -> str:
    shown = ", ".join(classes[:limit])
    return f"{len(classes)}: {shown}{', ...' if len(classes) > limit else ''}"


class Renormalize:
    """A batch normalized for the student -> the same images as the teacher wants them: resized to its input
    size (its interpolation, antialiased), then x * (std_s / std_t) + (mean_s - mean_t) / std_t per channel."""

    def __init__(self, student, teacher):
        self.size, self.mode = teacher.input_size, "bicubic" if teacher.interpolation == "bicubic" else "bilinear"
        self.same_stats = (student.mean, student.std) == (teacher.mean, teacher.std)
        self.scale = torch.tensor([s / t for s, t in zip(student.std, teacher.std)]).view(1, 3, 1, 1)
        self.shift = torch.tensor([(ms - mt) / t for ms, mt, t in zip(student.mean, teacher.mean, teacher.std)]
                                  ).view(1, 3, 1, 1)
        self.student_size = student.input_size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode=self.mode, align_corners=False, antialias=True)
        if not self.same_stats:
            self.scale, self.shift = self.scale.to(x.device), self.shift.to(x.device)
            x = x * self.scale + self.shift
        return x

    def __repr__(self) -> str:  # part of the cache key
        return (f"Renormalize(size={self.size}, mode={self.mode}, scale={self.scale.flatten().tolist()}, "
                f"shift={self.shift.flatten().tolist()})")

    def describe(self) -> str:
        what = [f"resized from {self.student_size}px to {self.size}px"] if self.size != self.student_size else []
        what += [] if self.same_stats else ["renormalized to its mean/std"]
        return "the student's input " + (" and ".join(what) if what else "as it is (same size, mean and std)")


class TokenInputs:
    """The student's token batch as the teacher's model takes it (the same tokenizer: its input names only)."""

    def __init__(self, names):
        self.names = tuple(names)

    def __call__(self, x: dict) -> dict:
        return {k: v for k, v in x.items() if k in self.names}

    def __repr__(self) -> str:
        return f"TokenInputs({self.names})"


class Teacher:
    """A loaded teacher, fed the student's batches: eval mode, no gradients, its logits as float32 in the
    student's class order."""

    def __init__(self, model, spec: str, order: list[int] | None, adapt, digest: str):
        self.model, self.spec, self.adapt, self.digest = model, spec, adapt, digest
        self.module = model.module.eval().requires_grad_(False)
        self.order = torch.tensor(order) if order is not None else None
        self.autocast = None  # the run's mixed precision (accelerate's autocast), set by load_teacher
        self.logits_source = "every batch"  # or "cached": where the add-on's logits come from (metrics.json)

    @torch.no_grad()
    def own(self, x) -> torch.Tensor:
        """Logits of a batch already in the teacher's own form (its tokenizer's ids, its image size)."""
        with self.autocast():
            logits = logits_of(self.module, x).float()
        if self.order is not None:
            self.order = self.order.to(logits.device)
            logits = logits[:, self.order]
        return logits

    def __call__(self, x) -> torch.Tensor:
        """Logits of a batch of the student's inputs (on the device)."""
        if self.adapt is None:
            raise UserError(f"--teacher {self.spec}: its tokenizer differs from the student's, so it cannot read "
                            f"the student's batches")
        return self.own(self.adapt(x))

    def as_module(self) -> nn.Module | None:
        """The teacher as a model of the student's inputs (for scoring on the validation set), or None."""
        return None if self.adapt is None else _AsModule(self)


class _AsModule(nn.Module):
    def __init__(self, teacher: Teacher):
        super().__init__()
        self.net, self._teacher = teacher.module, teacher

    def forward(self, x=None, **tokens):
        return self._teacher(tokens if x is None else x)


def same_tokenizer(a, b, texts: list[tuple[str, ...]]) -> bool:
    """Whether two tokenizers turn these texts (and the vocabulary) into the same ids."""
    if a.get_vocab() != b.get_vocab():
        return False
    probe = [t[0] for t in texts[:32]] + ["Hello World, ça va? 123 naïve CAFÉ"]
    return a(probe)["input_ids"] == b(probe)["input_ids"]


def load_teacher(spec: str, task_name: str, inputs, *, live: str | None, device, autocast) -> Teacher:
    """The teacher for this student (inputs: build's Prepared), checked: its task and classes (the same set;
    another order is mapped), its inputs (text: the same tokenizer, or cached logits). `live`: why its
    logits cannot be cached (then it must read the student's batches), or None."""
    import contextlib

    from . import fastpath
    from .artifacts import load

    folder = folder_of(spec)
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):  # training's random stream untouched
        model = load(folder)
    student, modality = inputs.task, inputs.backbone.adapter.modality
    if model.task.kind != student.kind or model.backbone.adapter.modality != modality:
        raise UserError(f"--teacher {spec}: a {model.task.kind} model of {model.backbone.adapter.modality}s; the "
                        f"student's task is {task_name}")
    if set(model.classes) != set(student.classes) or len(model.classes) != len(student.classes):
        raise UserError(f"--teacher {spec}: its classes ({_names(model.classes)}) are not the student's "
                        f"({_names(student.classes)})")
    order = None if model.classes == student.classes else [model.classes.index(c) for c in student.classes]
    if modality == "image":
        adapt = Renormalize(inputs.backbone.preprocessing, model.backbone.preprocessing)
        how = adapt.describe()
    elif same_tokenizer(inputs.backbone.tokenizer, model.tokenizer, inputs.train_loader.dataset.texts):
        adapt = TokenInputs(model.tokenizer.model_input_names)
        how = "the student's token ids (the same tokenizer)"
    elif live is not None:
        raise UserError(f"--teacher {spec}: its tokenizer differs from the student's and {live}, so the teacher "
                        f"cannot see the student's inputs; use a teacher with the student's tokenizer, or train "
                        f"without token augmentation (the teacher then tokenizes the texts itself, once)")
    else:
        adapt, how = None, "the raw texts through its own tokenizer (the student's differs)"
    teacher = Teacher(model, spec, order, adapt, weights_sha256(model.module))
    teacher.autocast = autocast if autocast is not None else contextlib.nullcontext
    model.to(device)
    if modality == "image":
        fastpath.channels_last(teacher.module)
    log.info("distillation: teacher %s (%s:%s, %s), reading %s%s", spec, model.backbone.source,
             model.backbone.architecture, f"{model.backbone.preprocessing.input_size}px" if modality == "image"
             else f"max {model.max_length} tokens", how, "; its classes reordered to the student's" if order else "")
    return teacher


def why_live(d, modality: str, kd_cache: str) -> str | None:
    """Why the student's training inputs change between epochs (data section `d`, a config.DataConfig), so the
    teacher's logits cannot be cached and it runs on every batch; None when they can be."""
    from .features import augmented

    if kd_cache == "off":
        return "--kd-cache off"
    if d.mixup or d.cutmix:
        return "MixUp/CutMix mix every batch anew"
    if modality == "image" and augmented(d):
        return f"--augment {d.augment} changes the images every epoch" if d.augment != "none" else \
            "--rotate/--elastic/--vflip change the images every epoch"
    if modality == "text" and (d.token_delete or d.token_swap or d.token_mask or d.synonyms):
        return "token augmentation changes the texts every epoch"
    return None


class WithLogits(Dataset):
    """A dataset's samples with their teacher logits appended: (x, y, logits [C]); a training key's seed picks
    one of K cached views as features.Features does."""

    def __init__(self, dataset: Dataset, logits: torch.Tensor):
        self.dataset, self.logits = dataset, logits  # logits [K, N, C]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        from .data.order import split_key

        i, seed = split_key(key)
        view = 0 if seed is None else seed % self.logits.shape[0]
        return (*self.dataset[key], self.logits[view, i])


class _Collate:
    """The loader's own collate over (x, y), the logits stacked after."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, samples):
        return (*self.inner([s[:-1] for s in samples]), torch.stack([s[-1] for s in samples]))


def attach(loader: DataLoader, logits: torch.Tensor) -> DataLoader:
    """`loader` (a training loader: its batch sampler, workers and collate kept) with each sample's logits."""
    return DataLoader(WithLogits(loader.dataset, logits), batch_sampler=loader.batch_sampler,
                      num_workers=loader.num_workers, collate_fn=_Collate(loader.collate_fn),
                      pin_memory=loader.pin_memory, generator=loader.generator,
                      worker_init_fn=loader.worker_init_fn, persistent_workers=loader.persistent_workers)


def compute(teacher: Teacher, dataset: Dataset, views: list[list], *, collate, transform, own: bool,
            batch_size: int, workers: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's logits for the samples of `dataset` under each view's keys: [K, N, C], and the targets.
    `transform`: the task's input transform (the decoded-image cache's uint8 -> float); `own`: the samples are
    already in the teacher's form (its tokenizer), else they are the student's."""
    from accelerate.utils import send_to_device

    from .data import die_with_parent
    from .features import _Keyed

    out, targets = [], torch.empty(0)
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        for keys in views:
            loader = DataLoader(_Keyed(dataset, keys), batch_size=batch_size, collate_fn=collate,
                                num_workers=workers, generator=torch.Generator(),
                                worker_init_fn=die_with_parent if workers else None)
            rows, ys = [], []
            for x, y in loader:
                x = send_to_device(transform(x) if transform is not None else x, device)
                rows.append((teacher.own(x) if own else teacher(x)).cpu())
                ys.append(y)
            out.append(torch.cat(rows))
            targets = torch.cat(ys)
    return torch.stack(out), targets


def cached(teacher: Teacher, parts: dict[str, Any], what: str, dataset: Dataset, views: list[list],
           **options) -> torch.Tensor:
    """`compute`, through the on-disk cache (features.load_or_extract) under `parts` + the teacher's digest."""
    from .features import load_or_extract

    started = time.perf_counter()
    key = {"format": FORMAT, "what": "teacher logits", "teacher": teacher.digest, "torch": torch.__version__,
           "order": teacher.order.tolist() if teacher.order is not None else None, "adapt": repr(teacher.adapt),
           "views": len(views), **parts}
    logits, _, hit = load_or_extract(key, lambda: compute(teacher, dataset, views, **options), what="teacher logits")
    log.info("distillation: the teacher's logits (%s): %d x %d%s, %s in %.1fs; reused every epoch", what,
             logits.shape[1], logits.shape[2], f" x {logits.shape[0]} views" if logits.shape[0] > 1 else "",
             "read from the cache" if hit else "computed", time.perf_counter() - started)
    return logits
