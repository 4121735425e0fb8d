"""Layer groups: a backbone's parameters in groups ordered from input to output, the head last.

Layer-wise learning-rate decay and gradual unfreezing read these groups. Where the source says how its
model is layered, that is used; otherwise module order decides:

    timm          the model's own group_matcher(coarse=True): stem, then each stage/block group
    transformers  everything before the encoder layers (embeddings), each layer, what follows (pooler)
    otherwise     one group per top-level child module with parameters, in registration order
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .base import Backbone


@dataclass
class Group:
    name: str
    params: list[str]  # parameter names, in the module's order

    @property
    def is_head(self) -> bool:
        return self.name == "head"


def layer_groups(backbone: Backbone) -> list[Group]:
    """The backbone's groups, as its source orders them (Source.layer_groups)."""
    return backbone.adapter.layer_groups(backbone)


def default_groups(backbone: Backbone) -> list[Group]:
    """Blocks when the backbone names them (`blocks`), else one group per top-level child; the head last."""
    body, head = _split(backbone)
    groups = _block_groups(body, backbone.blocks) if backbone.blocks is not None else _child_groups(body)
    return _finish(groups, head)


def timm_groups(backbone: Backbone) -> list[Group]:
    """timm's own group_matcher(coarse=True) where the model has one."""
    if not hasattr(backbone.module, "group_matcher"):
        return default_groups(backbone)
    body, head = _split(backbone)
    return _finish(_timm_groups(backbone.module, set(body)), head)


def _split(backbone: Backbone) -> tuple[list[str], list[str]]:
    names = [n for n, _ in backbone.module.named_parameters()]
    return [n for n in names if not backbone.is_head(n)], [n for n in names if backbone.is_head(n)]


def _finish(groups: list[Group], head: list[str]) -> list[Group]:
    return [g for g in groups if g.params] + ([Group("head", head)] if head else [])


def _timm_groups(module, body: set[str]) -> list[Group]:
    from timm.models import group_parameters

    grouped = group_parameters(module, module.group_matcher(coarse=True))
    out = []
    for _, params in sorted(grouped.items()):
        params = [p for p in params if p in body]
        if params:
            out.append(Group(_span(params), params))
    return out


def _block_groups(body: list[str], blocks: str) -> list[Group]:
    prefix = blocks + "."
    before: list[str] = []
    per_block: dict[int, list[str]] = {}
    after: list[str] = []
    for n in body:
        if n.startswith(prefix):
            per_block.setdefault(int(n[len(prefix):].split(".", 1)[0]), []).append(n)
        else:
            (after if per_block else before).append(n)
    return ([Group(_span(before), before)] + [Group(f"{blocks}.{i}", per_block[i]) for i in sorted(per_block)]
            + [Group(_span(after), after)])


def _child_groups(body: list[str]) -> list[Group]:
    by_child: dict[str, list[str]] = {}
    for n in body:
        by_child.setdefault(n.split(".", 1)[0], []).append(n)
    return [Group(child, params) for child, params in by_child.items()]


def _module_of(param: str) -> str:
    return param.rsplit(".", 1)[0] if "." in param else param


def _span(params: Iterable[str]) -> str:
    """A short name for a group: its first and last module ('conv_stem..bn1', 'blocks.6..bn2')."""
    params = list(params)
    if not params:
        return ""
    first, last = (".".join(_module_of(p).split(".")[:2]) for p in (params[0], params[-1]))
    return first if first == last else f"{first}..{last}"
