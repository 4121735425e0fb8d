"""`--peft`: parameter-efficient fine-tuning with the peft library. The pretrained weights stay frozen; small
added parameters train with the new head, which peft's `modules_to_save` keeps whole and saves with them.

    lora    LoraConfig: a low-rank update (alpha / r) B A beside each target layer: Linear, Conv2d,
            nn.MultiheadAttention (torchvision's ViT)
    dora    LoraConfig(use_dora=True): LoRA on the weight's direction and a trained magnitude per output
    ia3     IA3Config: trained vectors that rescale keys, values and the feed-forward activations
            (transformers models; the targets of peft's table for the model type)
    prompt  trainable tokens before the input: peft's PromptTuningConfig for transformers text encoders
            (sequence classification; initialized from the embeddings of sampled vocabulary tokens), the
            visual prompts of models/vpt.py for timm ViTs

`apply` runs as a build stage (build.peft) after the model is built and before the optimizer, because the
adapters are new parameters the optimizer must hold (an add-on's wrap_model runs after it is built). The
base's weights digest is taken first; the folder records it (models/adapter_folder.py).

Targets, unless --lora-targets names them (each a module name or name suffix, as peft matches a list):
`discover` takes, outside the head, the Linear layers inside the encoder's blocks where the source names
them (transformers: attention projections and MLP linears), the fused `qkv` and MLP `fc1`/`fc2` of timm
ViTs, nn.MultiheadAttention (LoRA only), and, for a model whose Conv2d layers outweigh its Linear ones (a
CNN), its convolutions of groups 1 (peft cannot merge LoRA into grouped and depthwise convolutions).

METHODS is the registry; its keys are the recipe's choices for model.peft (tests/test_registries.py).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UserError, first_line
from .models import Backbone
from .models.adapter_folder import Adapted, base_sha256, quiet_peft, wrap_prompted

log = logging.getLogger("finetunekit")

VIT_LINEARS = ("qkv", "fc1", "fc2")  # timm ViTs: the fused attention input and the MLP (not attn.proj)


@dataclass(frozen=True)
class PeftOptions:
    """The recipe's --peft options, as plain values."""

    method: str
    r: int = 8
    alpha: float | None = None  # None: 2 x r
    dropout: float = 0.0
    targets: tuple[str, ...] | None = None  # --lora-targets; None: discovered
    prompt_tokens: int = 10

    @classmethod
    def of(cls, m) -> PeftOptions | None:
        """From the recipe's model section (config.ModelConfig); None without --peft."""
        if m.peft is None:
            return None
        targets = tuple(t.strip() for t in m.lora_targets.split(",") if t.strip()) if m.lora_targets else None
        return cls(m.peft, m.lora_r, m.lora_alpha, m.lora_dropout, targets, m.prompt_tokens)

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.r


def apply(backbone: Backbone, o: PeftOptions, base: dict) -> str:
    """Put `o.method`'s adapters on `backbone`, in place: every base parameter frozen, the adapters and the
    head trainable, `backbone.peft` set. `base` is what rebuilds the base model (model, pretrained, weights,
    trust_remote_code); its weights digest is added. Returns the log line."""
    base = {**base, "sha256": base_sha256(backbone)}
    total = sum(p.numel() for p in backbone.module.parameters())
    targets, options, what = METHODS[o.method](backbone, o)
    module = backbone.module
    trainable = frozenset(n for n, p in module.named_parameters() if p.requires_grad)
    backbone.peft = Adapted(o.method, trainable, tuple(targets), options, base)
    count = sum(p.numel() for n, p in module.named_parameters() if n in trainable)
    where = f" on {len(targets)} modules ({', '.join(patterns(targets))})" if targets else ""
    return (f"--peft {o.method}: {what}{where}; {count:,} trainable parameters ({100 * count / total:.2f}% of "
            f"{total / 1e6:.2f}M), the head's included; the base weights stay frozen")


def digest(adapted: Adapted) -> str:
    """A short digest of the method, its options and targets: a checkpoint's fingerprint (resume's guard)."""
    import hashlib
    import json

    text = json.dumps([adapted.method, adapted.options, list(adapted.targets)], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def patterns(names: list[str] | tuple[str, ...]) -> list[str]:
    """Module names with their indices as * ('blocks.*.attn.qkv'), each once, in order."""
    return list(dict.fromkeys(re.sub(r"(?<=\.)\d+(?=\.|$)", "*", n) for n in names))


def discover(backbone: Backbone, attention: bool = True) -> list[str]:
    """The modules that get adapters when --lora-targets names none (the module docstring's rules)."""
    body = [(n, m) for n, m in backbone.module.named_modules() if n and not backbone.is_head(n)]
    mha = [n for n, m in body if isinstance(m, nn.MultiheadAttention)]
    linears = [(n, m) for n, m in body if isinstance(m, nn.Linear) and not any(n.startswith(a + ".") for a in mha)]
    if backbone.blocks:
        linears = [(n, m) for n, m in linears if n.startswith(backbone.blocks + ".")]
    if any(n.rsplit(".", 1)[-1] == "qkv" for n, _ in linears):
        linears = [(n, m) for n, m in linears if n.rsplit(".", 1)[-1] in VIT_LINEARS]
    convs = [(n, m) for n, m in body if isinstance(m, nn.Conv2d) and m.groups == 1]
    if sum(m.weight.numel() for _, m in convs) > sum(m.weight.numel() for _, m in linears) and not mha:
        return [n for n, _ in convs]
    chosen = {n for n, _ in linears} | (set(mha) if attention else set())
    return [n for n, _ in body if n in chosen]


def match(backbone: Backbone, names: tuple[str, ...]) -> list[str]:
    """The modules --lora-targets names (each a module name or its suffix, as peft matches a list)."""
    modules = [n for n, _ in backbone.module.named_modules() if n]
    found = []
    for t in names:
        hits = [n for n in modules if n == t or n.endswith("." + t)]
        if not hits:
            examples = ", ".join(patterns([n for n in discover(backbone)])[:4])
            raise UserError(f"--lora-targets {t}: matches no module of {backbone.architecture} (its layers: e.g. "
                            f"{examples}; see `finetunekit inspect`)")
        head = next((n for n in hits if backbone.is_head(n)), None)
        if head is not None:
            raise UserError(f"--lora-targets {t}: matches the head {head}, which trains whole and is saved whole; "
                            f"name layers of the backbone")
        found += hits
    chosen = set(found)
    return [n for n in modules if n in chosen]  # in the model's order


def _inject(backbone: Backbone, config, what: str) -> None:
    from peft import inject_adapter_in_model

    try:
        inject_adapter_in_model(config, backbone.module)
    except (ValueError, TypeError, RuntimeError) as e:  # peft refuses a layer type or a shape
        raise UserError(f"--peft {what}: peft cannot adapt {backbone.architecture} this way ({first_line(e)}); "
                        f"name other layers with --lora-targets") from None


def _lora(backbone: Backbone, o: PeftOptions, dora: bool = False):
    from peft import LoraConfig

    name = "dora" if dora else "lora"
    targets = match(backbone, o.targets) if o.targets else discover(backbone, attention=not dora)
    if not targets:
        raise UserError(f"--peft {name}: found no layers to adapt in {backbone.architecture}; name them with "
                        f"--lora-targets")
    config = LoraConfig(r=o.r, lora_alpha=o.lora_alpha, lora_dropout=o.dropout, target_modules=targets,
                        modules_to_save=list(backbone.heads), use_dora=dora)
    _inject(backbone, config, name)
    what = f"{'DoRA' if dora else 'LoRA'} r {o.r}, alpha {o.lora_alpha:g}, dropout {o.dropout:g}"
    return targets, {"r": o.r, "alpha": o.lora_alpha, "dropout": o.dropout}, what


def _ia3(backbone: Backbone, o: PeftOptions):
    from peft import IA3Config
    from peft.utils.constants import (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
                                      TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS)

    model_type = getattr(getattr(backbone.module, "config", None), "model_type", None)
    if o.targets is None and model_type not in TARGETS:
        raise UserError(f"--peft ia3: peft has no default targets for {backbone.architecture} (model type "
                        f"{model_type}); name them with --lora-targets")
    targets = match(backbone, o.targets or tuple(TARGETS[model_type]))
    suffixes = tuple(FEEDFORWARD.get(model_type, ()))
    feedforward = [n for n in targets if any(n == s or n.endswith("." + s) for s in suffixes)]
    _inject(backbone, IA3Config(target_modules=targets, feedforward_modules=feedforward,
                                modules_to_save=list(backbone.heads)), "ia3")
    return targets, {"feedforward": feedforward}, "IA3 (rescaled keys, values, feed-forward activations)"


def _prompt(backbone: Backbone, o: PeftOptions):
    n = o.prompt_tokens
    if backbone.adapter.modality == "image":
        from .models import vpt

        prompts = vpt.apply(backbone.module, n, backbone.architecture)
        for name, p in backbone.module.named_parameters():
            p.requires_grad_(name in prompts or backbone.is_head(name))
        return [], {"prompt_tokens": n}, f"{n} visual prompt tokens after the position embeddings"
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    config = PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=n, modules_to_save=list(backbone.heads),
                                prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB)
    try:
        with quiet_peft():
            wrapper = get_peft_model(backbone.module, config)
    except (ValueError, TypeError, AttributeError) as e:
        raise UserError(f"--peft prompt: peft's prompt tuning does not take {backbone.architecture} "
                        f"({first_line(e)}); use --peft lora") from None
    wrap_prompted(backbone, wrapper)
    return [], {"prompt_tokens": n}, f"{n} prompt tokens before the text (initialized from vocabulary embeddings)"


# name -> (backbone, options) -> (targets, options the folder records, what for the log line)
METHODS: dict[str, Callable[[Backbone, PeftOptions], tuple[list[str], dict, str]]] = {
    "lora": _lora,
    "dora": lambda backbone, o: _lora(backbone, o, dora=True),
    "ia3": _ia3,
    "prompt": _prompt,
}


def _make_require_grad(module: nn.Module, args, output):
    if isinstance(output, torch.Tensor) and output.is_floating_point() and not output.requires_grad:
        output.requires_grad_(True)


def require_input_grads(backbone: Backbone) -> None:
    """The first layer's output requires grad (transformers' enable_input_require_grads, for any source).

    With the base frozen, nothing before the first adapter requires grad; reentrant activation checkpointing
    (TIMM_REENTRANT_CKPT=1, or a model's own reentrant checkpoints) then sees no input that needs a gradient
    and returns none, so the adapters inside a checkpointed block would never train."""
    module = backbone.module
    first = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
    if first is None:
        first = next(m for n, m in module.named_modules() if n and any(True for _ in m.parameters(recurse=False)))
    first.register_forward_hook(_make_require_grad)
