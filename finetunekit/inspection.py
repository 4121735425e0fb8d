"""`finetunekit inspect MODEL`: a backbone's layer groups, their sizes, and when each trains under a strategy."""

from __future__ import annotations

from .models import create_backbone, create_text_backbone, modality
from .models.groups import layer_groups
from .strategies import make_plan, plural


def describe(spec: str, *, strategy: str = "full", epochs: int = 10, num_classes: int = 2,
             pretrained: bool = False, **plan_options) -> str:
    """A table: group, tensors, parameters, and the epoch from which the group trains (or 'frozen')."""
    if modality(spec) == "seq2seq":
        from .models import resolve
        from .models.hf_seq2seq import Seq2SeqOptions

        source, name = resolve(spec, "seq2seq")
        backbone = source.create(name, 0, Seq2SeqOptions(pretrained=pretrained, spec=spec))
    elif modality(spec) == "text":
        backbone = create_text_backbone(spec, [str(i) for i in range(num_classes)], "classification",
                                        pretrained=pretrained)
    else:
        backbone = create_backbone(spec, num_classes, pretrained=pretrained)
    plan = make_plan(strategy, backbone, epochs, **plan_options)
    params = dict(backbone.module.named_parameters())
    rows = []
    for i, g in enumerate(layer_groups(backbone)):
        n = sum(params[p].numel() for p in g.params)
        starts = sorted({ph.start_epoch for ph in plan.phases for p in g.params if p in ph.trainable})
        some = [p for p in g.params if any(p in ph.trainable for ph in plan.phases)]
        when = "frozen" if not starts else f"epoch {starts[0] + 1}" + ("" if len(some) == len(g.params)
                                                                        else f" ({len(some)}/{len(g.params)} tensors)")
        rows.append((str(i), g.name, str(len(g.params)), f"{n:,}", when))
    total = sum(p.numel() for p in params.values())
    header = ("group", "name", "tensors", "parameters", f"trains from ({strategy}, {plural(epochs, 'epoch')})")
    widths = [max(len(r[c]) for r in rows + [header]) for c in range(len(header))]
    lines = [f"{spec}: {backbone.source}:{backbone.architecture}, {total / 1e6:.2f}M parameters, "
             f"{len(rows)} layer groups (input to output)"]
    lines += ["  ".join(v.ljust(w) if c < 2 else v.rjust(w) if c < 4 else v for c, (v, w) in
                        enumerate(zip(r, widths))) for r in [header] + rows]
    lines += [f"phases: " + "; ".join(f"from epoch {ph.start_epoch + 1}: {ph.description} (lr x{ph.lr_mult:g})"
                                      for ph in plan.phases)]
    return "\n".join(lines) + "\n"
