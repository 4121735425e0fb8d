"""Hugging Face transformers encoders: `hf:<hub id or local folder>` for any model that transformers' Auto
classes load for sequence classification.

The module is transformers' own `AutoModelForSequenceClassification` model, so a saved folder loads with
plain transformers. The head is every top-level child outside the base model (BERT: classifier;
DistilBERT: pre_classifier + classifier; RoBERTa: classifier). `trust_remote_code` stays off unless the
user turns it on.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from ..errors import UserError
from . import hub
from .base import Backbone

PROBLEM_TYPES = {"classification": "single_label_classification", "multilabel": "multi_label_classification",
                 "regression": "regression"}
MAX_LENGTH_CAP = 512
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def quiet_transformers() -> None:
    """transformers' load reports and progress bars would drown our log; errors still surface."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _local(name: str) -> Path | None:
    p = Path(name).expanduser()
    if p.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        return p
    return None


def check_name(name: str) -> None:
    local = _local(name)
    if local is not None:
        if not local.is_dir():
            raise UserError(f"--model hf:{name}: no such folder")
        if not (local / "config.json").is_file():
            raise UserError(f"--model hf:{name}: not a Hugging Face model folder (no config.json)")
    elif not _HUB_ID.fullmatch(name):
        raise UserError(f"--model hf:{name}: expected a hub id like 'bert-base-uncased' or 'org/name', "
                        f"or a local model folder")


def create(name: str, labels: Sequence[str], kind: str, *, pretrained: bool, trust_remote_code: bool = False,
           spec: str | None = None) -> Backbone:
    """`name`'s encoder with a new head: len(labels) outputs (1 for regression), problem_type and
    id2label/label2id set, so the saved config describes the task."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    quiet_transformers()
    spec = spec or f"hf:{name}"
    check_name(name)
    local = _local(name)
    where = str(local) if local is not None else name
    if local is None and not hub.cached(name, ("config.json",)):
        reason = hub.unreachable()
        if reason:
            raise UserError(f"--model {spec}: not in the local Hugging Face cache and the Hub is out of reach "
                            f"({reason}); pass a local model folder as hf:PATH, or use the built-in minilm")
    num_labels = 1 if kind == "regression" else len(labels)
    id2label = {i: c for i, c in enumerate(labels)} if labels else {0: "value"}
    # Attention: no attn_implementation is passed on purpose. transformers 5.x picks "sdpa" (PyTorch's
    # scaled_dot_product_attention: flash / memory-efficient kernels on GPUs) for every architecture that
    # supports it and falls back to "eager" for the others; asking for "sdpa" explicitly would instead fail
    # on those. tests/test_fastpath.py checks that minilm loads with sdpa.
    try:
        config = AutoConfig.from_pretrained(where, num_labels=num_labels, id2label=id2label,
                                            label2id={c: i for i, c in id2label.items()},
                                            problem_type=PROBLEM_TYPES[kind], trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
        if pretrained:
            module = AutoModelForSequenceClassification.from_pretrained(where, config=config,
                                                                        trust_remote_code=trust_remote_code)
        else:
            module = AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - hub, file and config errors come in many types
        text = str(e).strip()
        first = text.splitlines()[0][:240] if text else type(e).__name__
        if "trust_remote_code" in text:
            raise UserError(f"--model {spec}: this model runs its own code from the hub; pass "
                            f"--trust-remote-code if you trust its authors") from None
        raise UserError(f"--model {spec}: could not load it for sequence classification "
                        f"({type(e).__name__}: {first})") from None
    if tokenizer.pad_token is None:  # decoder-style tokenizers: pad with the end-of-text token
        if tokenizer.eos_token is None:
            raise UserError(f"--model {spec}: its tokenizer has neither a pad nor an end-of-text token")
        tokenizer.pad_token = tokenizer.eos_token
    module.config.pad_token_id = tokenizer.pad_token_id
    return wrap(module, tokenizer)


def wrap(module: nn.Module, tokenizer) -> Backbone:
    base = module.base_model
    heads = [n for n, child in module.named_children()
             if child is not base and any(True for _ in child.parameters())]
    return Backbone(module=module, source="hf", architecture=type(module).__name__, head=",".join(heads),
                    preprocessing=None, num_features=int(getattr(module.config, "hidden_size", 0) or 0),
                    tokenizer=tokenizer, blocks=_blocks(module))


def _blocks(module: nn.Module) -> str | None:
    """Dotted name of the encoder's list of layers (the first ModuleList as long as num_hidden_layers)."""
    n = getattr(module.config, "num_hidden_layers", None)
    return next((name for name, m in module.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n),
                None)


def model_max_length(backbone: Backbone) -> int:
    """The longest input the model takes: the tokenizer's and the position table's limit, at most 512."""
    limits = [getattr(backbone.tokenizer, "model_max_length", None),
              getattr(backbone.module.config, "max_position_embeddings", None)]
    return min([int(x) for x in limits if x and x < 1_000_000] + [MAX_LENGTH_CAP])
