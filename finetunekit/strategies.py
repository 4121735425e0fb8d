"""Strategies: which parameters train at each epoch, at what learning-rate multiple.

A strategy is a `Plan`: a list of phases, each starting at an epoch, naming the trainable parameters and
a multiplier on every group's learning rate. The optimizer holds *every* parameter from the first step
(a frozen one simply has no gradient, so AdamW leaves it untouched, weight decay included), and the
schedule spans the whole run; a phase change only flips `requires_grad` and scales each param group's
`lr_scale`, which timm's schedulers apply at every update. So unfreezing never adds param groups that a
scheduler or a resumed optimizer has not seen.

    full             everything trains
    linear-probe     the head only (the backbone runs in eval mode: a fixed feature extractor)
    bitfit           biases + the head (default lr: 10x the full fine-tune one, see optim.DEFAULT_LR)
    norm-head        normalization layers + the head (likewise)
    freeze-unfreeze  the head only for --head-epochs at 10x lr, then everything (fastai's fine_tune)
    lp-ft            a linear probe (eval-mode backbone) for --head-epochs at 10x lr, then full fine-tuning
    gradual          the head only at 10x lr, then one more layer group from the top every
                     --unfreeze-every epochs (ULMFiT's gradual unfreezing)

With --peft, the backbone's own weights never train: every phase trains only what the method added (the
adapters, or the prompt tokens) and the head's trained copy; "everything" means those, a layer group's share
means its adapters, and head-only phases take no extra 10x (the --peft default lr is already 10x the full one).

On top of any strategy: --freeze-layers N (the embeddings/stem and the first N blocks), --freeze PATTERNS
(parameter-name globs), --freeze-types TYPES (norm, embedding, conv, linear) stay frozen throughout.
A module none of whose parameters train runs in eval mode, so BatchNorm statistics and dropout inside a
frozen part do not drift.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .errors import UserError
from .models import Backbone
from .models.groups import Group, layer_groups

HEAD_PHASE_LR_MULT = 10.0  # head-only phases: the linear-probe default lr is 10x the full fine-tune one
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
_TYPES = {"norm": _NORMS, "embedding": (nn.Embedding, nn.EmbeddingBag), "conv": (nn.modules.conv._ConvNd,),
          "linear": (nn.Linear,)}


@dataclass
class Phase:
    start_epoch: int  # 0-based
    trainable: frozenset[str]
    lr_mult: float
    description: str
    on_features: bool = False  # a head-only phase before any other: trains on cached features (build.py)


@dataclass
class Plan:
    strategy: str
    phases: list[Phase]

    def phase_at(self, epoch: int) -> Phase:
        return [p for p in self.phases if p.start_epoch <= epoch][-1]


def plural(n: float, word: str) -> str:
    """'1 epoch', '2 epochs', '0.5 epochs'."""
    return f"{n:g} {word}" + ("" if n == 1 else "s")


def _is_norm_param(module: nn.Module, name: str) -> bool:
    owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
    return isinstance(owner, _NORMS) or type(owner).__name__.lower().endswith(("norm", "layernorm", "rmsnorm"))


def always_frozen(backbone: Backbone, freeze: str | None, freeze_types: str | None,
                  freeze_layers: int | None) -> set[str]:
    """Parameters that stay frozen whatever the phase (never head parameters)."""
    module = backbone.module
    names = [n for n, _ in module.named_parameters() if not backbone.is_head(n)]
    frozen: set[str] = set()
    if freeze:
        patterns = [p.strip() for p in freeze.split(",") if p.strip()]
        for pattern in patterns:
            hits = {n for n in names if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n, pattern + ".*")}
            if not hits:
                raise UserError(f"--freeze {pattern}: matches no parameter of {backbone.architecture} "
                                f"(see `finetunekit inspect`)")
            frozen |= hits
    if freeze_types:
        for kind in (t.strip() for t in freeze_types.split(",") if t.strip()):
            if kind not in _TYPES:
                raise UserError(f"--freeze-types {kind}: expected some of {', '.join(_TYPES)}")
            owners = {n for n, m in module.named_modules() if isinstance(m, _TYPES[kind])}
            frozen |= {n for n in names if (n.rsplit(".", 1)[0] if "." in n else "") in owners
                       or (kind == "norm" and _is_norm_param(module, n))}
    if freeze_layers is not None:
        frozen |= set(frozen_by_depth(backbone, freeze_layers))
    return frozen


@dataclass
class _Parts:
    """What a strategy's plan is made of: the model's layer groups and parameter names, and the options."""

    strategy: str
    backbone: Backbone
    groups: list[Group]
    everything: set[str]
    head: set[str]
    fixed: set[str]  # always frozen (--freeze, --freeze-types, --freeze-layers)
    epochs: int
    head_epochs: int | None
    unfreeze_every: int
    head_mult: float = HEAD_PHASE_LR_MULT  # the lr multiple of head-only phases (1 under --peft)
    all_of_it: str = "all parameters"  # what "everything" is, for the log ("the adapters + head" under --peft)

    def phase(self, start: int, names: set[str], mult: float, what: str) -> Phase:
        return Phase(start, frozenset(names - self.fixed), mult, what)


def _full(p: _Parts) -> list[Phase]:
    return [p.phase(0, p.everything, 1.0, p.all_of_it)]


def _linear_probe(p: _Parts) -> list[Phase]:
    return [p.phase(0, p.head, 1.0, "head only")]


def _bitfit(p: _Parts) -> list[Phase]:
    return [p.phase(0, p.head | {n for n in p.everything if n.endswith("bias")}, 1.0, "biases + head")]


def _norm_head(p: _Parts) -> list[Phase]:
    module = p.backbone.module
    return [p.phase(0, p.head | {n for n in p.everything if _is_norm_param(module, n)}, 1.0, "norm layers + head")]


def _head_then_all(default_head_epochs) -> Callable[[_Parts], list[Phase]]:
    def plan(p: _Parts) -> list[Phase]:
        k = p.head_epochs if p.head_epochs is not None else default_head_epochs(p.epochs)
        if k >= p.epochs:
            raise UserError(f"--head-epochs {k}: must be less than --epochs {p.epochs} for --strategy {p.strategy}")
        return [p.phase(0, p.head, p.head_mult, f"head only ({plural(k, 'epoch')})"),
                p.phase(k, p.everything, 1.0, p.all_of_it)]
    return plan


def _gradual(p: _Parts) -> list[Phase]:
    """The head first, then one more group (top down) every `unfreeze_every` epochs."""
    body = [g for g in p.groups if not g.is_head]
    phases, names = [], set(p.head)
    for i, start in enumerate(range(0, p.epochs, p.unfreeze_every)):
        if i:
            if not body:
                break
            g: Group = body.pop()
            names = names | set(g.params)
        phases.append(p.phase(start, names, p.head_mult if i == 0 else 1.0,
                              "head only" if i == 0 else
                              f"head + the top {'group' if i == 1 else f'{i} groups'} (down to {g.name})"))
    return phases


# name -> plan builder; the recipe's choices (config.TrainConfig.strategy) are checked against it in tests
STRATEGIES: dict[str, Callable[[_Parts], list[Phase]]] = {
    "full": _full,
    "linear-probe": _linear_probe,
    "freeze-unfreeze": _head_then_all(lambda epochs: 1),
    "gradual": _gradual,
    "lp-ft": _head_then_all(lambda epochs: max(1, epochs // 2)),
    "bitfit": _bitfit,
    "norm-head": _norm_head,
}


def make_plan(strategy: str, backbone: Backbone, epochs: int, *, head_epochs: int | None = None,
              unfreeze_every: int = 1, freeze: str | None = None, freeze_types: str | None = None,
              freeze_layers: int | None = None) -> Plan:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}")
    groups = layer_groups(backbone)
    everything = {n for g in groups for n in g.params}
    fixed = always_frozen(backbone, freeze, freeze_types, freeze_layers)
    if backbone.peft is not None:  # the base weights stay frozen: only the adapters and the head's copy train
        fixed |= everything - backbone.peft.trainable
        groups = [g for g in groups if not set(g.params) <= fixed]  # gradual: no phase that unfreezes nothing
    peft = backbone.peft is not None
    parts = _Parts(strategy, backbone, groups, everything, {n for g in groups if g.is_head for n in g.params},
                   fixed, epochs, head_epochs, unfreeze_every, 1.0 if peft else HEAD_PHASE_LR_MULT,
                   f"the {backbone.peft.method} adapters + head" if peft else "all parameters")
    return Plan(strategy, STRATEGIES[strategy](parts))


def apply_phase(phase: Phase, module: nn.Module, optimizer=None) -> None:
    """requires_grad for the phase; each param group's lr_scale = its base scale x the phase multiplier."""
    for name, p in module.named_parameters():
        p.requires_grad_(name in phase.trainable)
    if optimizer is not None:
        for group in optimizer.param_groups:
            group.setdefault("base_lr_scale", group.get("lr_scale", 1.0))
            group["lr_scale"] = group["base_lr_scale"] * phase.lr_mult


def frozen_by_depth(backbone: Backbone, n: int) -> list[str]:
    """Parameters registered before block `n` of `backbone.blocks`: the embeddings and blocks 0..n-1."""
    if backbone.blocks is None:
        raise UserError(f"--freeze-layers: {backbone.source}:{backbone.architecture} does not name its "
                        f"layers; freezing by depth works for transformers encoders")
    blocks = backbone.module.get_submodule(backbone.blocks)
    if n > len(blocks):
        raise UserError(f"--freeze-layers {n}: the model has {len(blocks)} layers")
    prefix = backbone.blocks + "."
    frozen = []
    for name, _ in backbone.module.named_parameters():
        if backbone.is_head(name):
            continue
        if name.startswith(prefix):
            if int(name[len(prefix):].split(".", 1)[0]) >= n:
                break  # blocks n.. and whatever follows them (final norm, pooler) train
        frozen.append(name)
    return frozen


def set_train_mode(module: nn.Module, inner: nn.Module | None = None) -> None:
    """model.train(), except modules none of whose parameters train: they run in eval mode.

    `module` may be a distributed wrapper; `inner` is then the wrapped model.
    """
    module.train()
    for _, m in (inner or module).named_modules():
        params = list(m.parameters())
        if params and not any(p.requires_grad for p in params):
            m.eval()
