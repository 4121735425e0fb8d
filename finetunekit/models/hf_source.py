"""Hugging Face transformers encoders: `hf:<hub id or local folder>` for any model that transformers' Auto
classes load for sequence classification (text tasks; image tasks: hf_image.py).

The module is transformers' own `AutoModelForSequenceClassification` model, so a saved folder loads with
plain transformers. The head is every top-level child outside the base model (BERT: classifier;
DistilBERT: pre_classifier + classifier; RoBERTa: classifier). `trust_remote_code` stays off unless the
user turns it on.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from ..errors import UserError
from . import folder as mf
from . import hub
from .base import Backbone, CreateOptions, Source

PROBLEM_TYPES = {"classification": "single_label_classification", "multilabel": "multi_label_classification",
                 "regression": "regression"}
MAX_LENGTH_CAP = 512
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
# --dropout: the first of these that the model's config has (the dropout in front of the classifier where
# the architecture has one: BERT/RoBERTa classifier_dropout, DistilBERT seq_classif_dropout; else the
# hidden dropout every layer applies: ViT hidden_dropout_prob, ...)
DROPOUT_FIELDS = ("classifier_dropout", "seq_classif_dropout", "hidden_dropout_prob", "hidden_dropout", "dropout")


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


def where(name: str, spec: str, fallback: str) -> str:
    """The folder or hub id to load from; a hub id that is not cached, offline, is one line now."""
    check_name(name)
    local = _local(name)
    if local is None and not hub.cached(name, ("config.json",)):
        reason = hub.unreachable()
        if reason:
            raise UserError(f"--model {spec}: not in the local Hugging Face cache and the Hub is out of reach "
                            f"({reason}); pass a local model folder as hf:PATH{fallback}")
    return str(local) if local is not None else name


def load_error(spec: str, what: str, e: Exception) -> UserError:
    text = str(e).strip()
    first = text.splitlines()[0][:240] if text else type(e).__name__
    if "trust_remote_code" in text:
        return UserError(f"--model {spec}: this model runs its own code from the hub; pass "
                         f"--trust-remote-code if you trust its authors")
    return UserError(f"--model {spec}: could not load it for {what} ({type(e).__name__}: {first})")


def set_dropout(config, p: float | None, spec: str) -> None:
    if p is None:
        return
    key = next((k for k in DROPOUT_FIELDS if hasattr(config, k)), None)
    if key is None:
        raise UserError(f"--dropout: {spec}'s config ({type(config).__name__}) has none of "
                        f"{', '.join(DROPOUT_FIELDS)}")
    setattr(config, key, p)


def labels_config(labels, kind: str) -> dict[str, Any]:
    num_labels = 1 if kind == "regression" else len(labels)
    id2label = {i: c for i, c in enumerate(labels)} if labels else {0: "value"}
    return dict(num_labels=num_labels, id2label=id2label, label2id={c: i for i, c in id2label.items()})


def blocks_of(module: nn.Module) -> str | None:
    """Dotted name of the encoder's list of layers (the first ModuleList as long as num_hidden_layers)."""
    n = getattr(module.config, "num_hidden_layers", None)
    return next((name for name, m in module.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n),
                None)


def head_names(module: nn.Module) -> str:
    base = module.base_model
    return ",".join(n for n, child in module.named_children()
                    if child is not base and any(True for _ in child.parameters()))


def wrap(module: nn.Module, tokenizer) -> Backbone:
    return Backbone(module=module, source="hf", architecture=type(module).__name__, head=head_names(module),
                    preprocessing=None, num_features=int(getattr(module.config, "hidden_size", 0) or 0),
                    tokenizer=tokenizer, blocks=blocks_of(module))


def model_max_length(backbone: Backbone) -> int:
    """The longest input the model takes: the tokenizer's and the position table's limit, at most 512."""
    limits = [getattr(backbone.tokenizer, "model_max_length", None),
              getattr(backbone.module.config, "max_position_embeddings", None)]
    return min([int(x) for x in limits if x and x < 1_000_000] + [MAX_LENGTH_CAP])


def read_id2label(config: dict, folder: Path) -> list[str]:
    """config.json's id2label as a list, index by index ({"0": "neg", "1": "pos"})."""
    id2label = mf.field(config, "id2label", folder, dict, expected="an object {\"0\": label, ...}")
    want = {str(i) for i in range(len(id2label))}
    if set(id2label) != want or not all(isinstance(v, str) for v in id2label.values()):
        raise UserError(f"{folder / mf.CONFIG}: field id2label: expected keys \"0\"..\"{len(id2label) - 1}\" "
                        f"with label names")
    return [id2label[str(i)] for i in range(len(id2label))]


def load_pretrained(folder: Path, auto_model, labels_field: str) -> nn.Module:
    """transformers' from_pretrained of a saved folder (it maps renamed tensors), every tensor checked: a
    head that does not fit the labels names `labels_field`; any other mismatch is the architecture's."""
    quiet_transformers()
    mf.check_weights_header(folder)

    def attempt(ignore: bool):
        return auto_model.from_pretrained(folder, output_loading_info=True, use_safetensors=True,
                                          ignore_mismatched_sizes=ignore)
    try:
        try:
            module, info = attempt(False)
        except RuntimeError as e:
            if "ignore_mismatched_sizes" not in str(e):
                raise
            module, info = attempt(True)  # to learn which tensors: reported below
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a broken folder fails in many ways
        text = str(e).strip()
        raise UserError(f"{folder}: cannot load the model folder ({type(e).__name__}: "
                        f"{text.splitlines()[0][:200] if text else ''})") from None
    heads = head_names(module).split(",")
    mismatched = [m[0] if isinstance(m, tuple) else m for m in info.get("mismatched_keys") or ()]
    if mismatched and all(any(k == h or k.startswith(h + ".") for h in heads) for k in mismatched):
        raise UserError(f"{folder / mf.CONFIG}: field {labels_field}: {module.config.num_labels} labels, but the "
                        f"head in {mf.WEIGHTS} has another size ({sorted(mismatched)[0]})")
    tied = set(getattr(module, "all_tied_weights_keys", None) or ())
    missing = sorted(k for k in info.get("missing_keys") or () if k not in tied)
    unexpected = sorted(info.get("unexpected_keys") or ())
    if missing or unexpected or mismatched:
        raise UserError(f"{folder / mf.WEIGHTS}: does not fit the architecture {type(module).__name__} of "
                        f"{mf.CONFIG}: {mf.mismatch(missing, unexpected, sorted(mismatched))}")
    return module


class HfSource(Source):
    """What the transformers sources share: gradient checkpointing and no MLP head."""

    name: ClassVar[str] = "hf"
    mlp_head: ClassVar[bool] = False

    @classmethod
    def check_name(cls, name: str) -> None:
        check_name(name)

    @classmethod
    def reset_head(cls, backbone: Backbone, num_outputs: int) -> None:
        """A new last Linear of the head with `num_outputs` (config.num_labels follows)."""
        module = backbone.module
        name = [n for h in backbone.heads for n, m in module.get_submodule(h).named_modules(prefix=h)
                if isinstance(m, nn.Linear)][-1]
        old = module.get_submodule(name)
        module.set_submodule(name, nn.Linear(old.in_features, num_outputs, bias=old.bias is not None))
        module.config.num_labels = num_outputs

    @classmethod
    def set_grad_checkpointing(cls, backbone: Backbone, enable: bool = True) -> None:
        module = backbone.module
        if not getattr(module, "supports_gradient_checkpointing", False):
            raise UserError(f"gradient checkpointing: transformers' {backbone.architecture} does not support it")
        if enable and hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5.x's name for it
            module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif enable:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            module.gradient_checkpointing_disable()


class HfTextSource(HfSource):
    modality: ClassVar[str] = "text"
    peft_methods: ClassVar[tuple[str, ...]] = ("lora", "dora", "ia3", "prompt")
    loads_in: ClassVar[str] = ("plain transformers: AutoModelForSequenceClassification.from_pretrained(FOLDER) "
                               "and AutoTokenizer.from_pretrained(FOLDER)")

    @classmethod
    def _where(cls, name: str, spec: str) -> str:
        return where(name, spec, ", or use the built-in minilm")

    @classmethod
    def create(cls, name: str, num_outputs: int, options: CreateOptions) -> Backbone:
        """`name`'s encoder with a new head: len(labels) outputs (1 for regression), problem_type and
        id2label/label2id set, so the saved config describes the task."""
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        quiet_transformers()
        spec = options.spec or f"hf:{name}"
        at = cls._where(name, spec)
        remote = options.trust_remote_code
        pretrained = options.pretrained and options.weights is None
        # Attention: no attn_implementation is passed on purpose. transformers 5.x picks "sdpa" (PyTorch's
        # scaled_dot_product_attention: flash / memory-efficient kernels on GPUs) for every architecture that
        # supports it and falls back to "eager" for the others; asking for "sdpa" explicitly would instead fail
        # on those. tests/test_fastpath.py checks that minilm loads with sdpa.
        try:
            config = AutoConfig.from_pretrained(at, **labels_config(options.labels, options.kind),
                                                problem_type=PROBLEM_TYPES[options.kind], trust_remote_code=remote)
            set_dropout(config, options.dropout, spec)
            tokenizer = AutoTokenizer.from_pretrained(at, trust_remote_code=remote)
            if pretrained:
                module = AutoModelForSequenceClassification.from_pretrained(at, config=config,
                                                                            trust_remote_code=remote)
            else:
                module = AutoModelForSequenceClassification.from_config(config, trust_remote_code=remote)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - hub, file and config errors come in many types
            raise load_error(spec, "sequence classification", e) from None
        if tokenizer.pad_token is None:  # decoder-style tokenizers: pad with the end-of-text token
            if tokenizer.eos_token is None:
                raise UserError(f"--model {spec}: its tokenizer has neither a pad nor an end-of-text token")
            tokenizer.pad_token = tokenizer.eos_token
        module.config.pad_token_id = tokenizer.pad_token_id
        backbone = wrap(module, tokenizer)
        if options.weights is not None:
            from .weights import load_weights, read_state_dict

            load_weights(backbone, read_state_dict(options.weights), f"--weights {options.weights}")
        return backbone

    @classmethod
    def save(cls, folder: Path, backbone: Backbone, classes: list[str], ours: dict) -> None:
        module = getattr(backbone.module, "_orig_mod", backbone.module)
        module.config.finetunekit = ours  # an extra config attribute: saved in config.json, ignored by transformers
        module.save_pretrained(folder)  # safetensors
        tokenizer = backbone.tokenizer
        tokenizer.model_max_length = ours["max_length"]  # plain transformers then truncates as we trained
        tokenizer.save_pretrained(folder)

    @classmethod
    def load(cls, folder: Path, config: dict) -> tuple[Backbone, str, list[str]]:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tasks = ("text-classification", "text-multilabel", "text-regression")
        default = {"multi_label_classification": "text-multilabel",
                   "regression": "text-regression"}.get(config.get("problem_type"), "text-classification")
        task = mf.field(config, "finetunekit.task", folder, str, required=False, default=default,
                        check=lambda v: v in tasks, expected=f"one of {', '.join(tasks)}")
        mf.field(config, "finetunekit.max_length", folder, int, required=False, check=lambda v: 1 <= v <= 65_536,
                 expected="an integer from 1 to 65536")
        classes = [] if task == "text-regression" else read_id2label(config, folder)
        module = load_pretrained(folder, AutoModelForSequenceClassification, "id2label")
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{folder}: cannot load the tokenizer ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''})") from None
        backbone = wrap(module, tokenizer)
        module.eval()
        return backbone, task, classes

    @classmethod
    def load_native(cls, folder: Path) -> nn.Module:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(folder).eval()
