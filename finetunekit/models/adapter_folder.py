"""The model folder of a `--peft` run: the adapter alone, beside what rebuilds its base model.

    adapter_model.safetensors   the trained tensors: the adapters and the new head (peft's modules_to_save),
                                in peft's own file format
    adapter_config.json         peft's config (lora, dora, ia3, text prompt tuning; not visual prompts)
    config.json                 finetunekit's: the task, labels, preprocessing or max_length, and
                                `finetunekit.peft`: the method, its options, the targets, and the base model's
                                identity (--model, pretrained, --weights) with a SHA-256 of its weights

So the folder is small (the base is rebuilt, not stored) and plain peft loads it onto the base model:
`PeftModel.from_pretrained(base, FOLDER)` (for the text models, `base` is AutoModelForSequenceClassification
with the run's num_labels). `finetunekit.load` rebuilds the base as the run built it, refuses one whose weights
digest differs (another checkpoint behind the same name), and loads the adapter through peft's
`PeftModel.from_pretrained` as well. `merge` folds LoRA, DoRA and IA3 into the weights (peft's
merge_and_unload); export/merge.py writes that as an ordinary model folder.

Names: lora, dora and ia3 are injected in place (the module stays the library's model, its target layers
wrapped); text prompt tuning needs peft's PeftModelForSequenceClassification around the model, whose names
carry a `base_model.` prefix (`wrap_prompted` moves the head and blocks names with it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError, first_line
from . import folder as mf
from .base import Backbone
from .weights import weights_sha256

WEIGHTS = "adapter_model.safetensors"  # peft's file names (PeftModel.save_pretrained writes the same)
CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # peft's on-disk names of an adapter injected into a model


@dataclass
class Adapted:
    """What a --peft backbone carries (Backbone.peft)."""

    method: str  # a key of peft_methods.METHODS: lora | dora | ia3 | prompt
    trainable: frozenset[str]  # the parameters any strategy phase may train: the adapters and the head
    targets: tuple[str, ...]  # the modules the adapters wrap (() for prompts)
    options: dict[str, Any]  # what the folder records: r, alpha, dropout; prompt_tokens
    base: dict[str, Any]  # the base model: model (the --model spec), pretrained, weights, trust_remote_code, sha256
    peft_model: Any = None  # a loaded folder's peft.PeftModel (merge_and_unload), else None


def base_sha256(backbone: Backbone) -> str:
    """SHA-256 of the base model's tensors (names, dtypes, bytes), the head's left out (it is trained)."""
    return weights_sha256(backbone.module, backbone.is_head)


def wrap_prompted(backbone: Backbone, wrapper: nn.Module) -> None:
    """The backbone's module becomes peft's PeftModel around it; head and blocks names follow its prefix."""
    backbone.module = wrapper
    backbone.head = ",".join(f"base_model.{h}" for h in backbone.heads)
    backbone.blocks = f"base_model.{backbone.blocks}" if backbone.blocks else None


@contextlib.contextmanager
def quiet_peft():
    """PeftModel's constructor reads transformers' deprecated is_gradient_checkpointing: its FutureWarning is
    peft's to fix, not the user's to read."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _is_peft(module: nn.Module) -> bool:
    return hasattr(module, "peft_config")  # a PeftModel, or a model peft injected adapters into


def _is_wrapper(module: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(module, PeftModel)


def adapter_tensors(module: nn.Module, trainable: frozenset[str]) -> dict[str, torch.Tensor]:
    """The trained tensors of `module` (the run's model, or its EMA copy) in peft's file format."""
    from peft import get_peft_model_state_dict

    if not _is_peft(module):  # visual prompts: our own names
        state = module.state_dict()
        return {k: state[k].detach().cpu().contiguous() for k in sorted(trainable)}
    prefix = "" if _is_wrapper(module) else PEFT_PREFIX
    return {prefix + k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(module).items()}


def load_tensors(module: nn.Module, folder: Path) -> None:
    """Put a folder's adapter tensors into `module` (which has the same adapters): the run's best weights."""
    from peft import set_peft_model_state_dict

    from .weights import load_safetensors

    tensors = load_safetensors(folder / WEIGHTS, str(folder / WEIGHTS))
    if _is_peft(module):
        if not _is_wrapper(module):  # injected in place: the model's own names, as get_peft_model_state_dict gave
            tensors = {k.removeprefix(PEFT_PREFIX): v for k, v in tensors.items()}
        result = set_peft_model_state_dict(module, tensors)
    else:
        result = module.load_state_dict(tensors, strict=False)
    unexpected = sorted(k for k in result.unexpected_keys if k != "prompt_embeddings")  # peft loads that one apart
    if unexpected:
        raise UserError(f"{folder / WEIGHTS}: does not fit the model's adapters: {mf.mismatch([], unexpected, [])}")


def save(folder: Path, backbone: Backbone, classes: list[str], ours: dict) -> None:
    """The adapter folder of `backbone` (the module holding the weights to save)."""
    from .. import artifacts
    from ..checkpoint import save_tensors

    module, adapted = getattr(backbone.module, "_orig_mod", backbone.module), backbone.peft
    save_tensors(adapter_tensors(module, adapted.trainable), folder / WEIGHTS, metadata={"format": "pt"})
    if _is_peft(module):
        config = dataclasses.replace(module.peft_config["default"], inference_mode=True)
        inner = getattr(module, "base_model", module) if _is_wrapper(module) else module
        config.base_model_name_or_path = getattr(getattr(inner, "config", None), "_name_or_path", None) or \
            adapted.base["model"]
        config.save_pretrained(str(folder))
    pre = backbone.preprocessing
    section = {"method": adapted.method, **adapted.options, "targets": list(adapted.targets), "base": adapted.base}
    artifacts.write_json(folder / mf.CONFIG, {
        "label_names": list(classes),
        "finetunekit": {**ours, "peft": section, **({"preprocessing": pre.to_dict()} if pre is not None else {})}})


def load(folder: Path, config: dict) -> tuple[Backbone, str, list[str]]:
    """(the base model rebuilt with the folder's adapter on it, in eval mode; task name; classes)."""
    from ..config import TASK_KIND, TASKS
    from ..peft_methods import METHODS

    at = "finetunekit.peft"
    method = mf.field(config, f"{at}.method", folder, str, check=lambda v: v in METHODS,
                      expected=f"one of {', '.join(METHODS)}")
    task = mf.field(config, "finetunekit.task", folder, str, check=lambda v: v in TASKS and v != "detection",
                    expected="a classification, multi-label or regression task")
    classes = mf.field(config, "label_names", folder, list, check=lambda v: all(isinstance(x, str) for x in v),
                       expected="a list of class names")
    base = {"model": mf.field(config, f"{at}.base.model", folder, str, check=bool, expected="a --model value"),
            "pretrained": mf.field(config, f"{at}.base.pretrained", folder, bool),
            "weights": mf.field(config, f"{at}.base.weights", folder, (str, type(None)), required=False),
            "trust_remote_code": mf.field(config, f"{at}.base.trust_remote_code", folder, bool, required=False,
                                          default=False),
            "sha256": mf.field(config, f"{at}.base.sha256", folder, str, check=lambda v: len(v) == 64,
                               expected="a SHA-256 hex digest")}
    if base["weights"] is not None and not Path(base["weights"]).is_file():
        raise UserError(f"{folder / mf.CONFIG}: field {at}.base.weights: {base['weights']} is missing (the base "
                        f"weights the adapter was trained on)")
    kind = TASK_KIND[task]
    pre = mf.read_preprocessing(config, folder) if TASKS[task][0] == "image" else None
    backbone = _base(folder, base, kind, classes, pre, mf.read_head_type(config, folder) if pre else "linear")
    if base_sha256(backbone) != base["sha256"]:
        raise UserError(f"{folder}: the base model {base['model']} does not have the weights this adapter was "
                        f"trained on (their SHA-256 differs from {at}.base.sha256)")
    wrapper = _attach(folder, backbone, config)
    section = config["finetunekit"]["peft"]
    targets = tuple(t for t in section.get("targets") or () if isinstance(t, str))
    options = {k: v for k, v in section.items() if k not in ("method", "targets", "base")}
    backbone.peft = Adapted(method, frozenset(), targets, options, base, wrapper)  # nothing trains: inference
    backbone.module.eval().requires_grad_(False)
    return backbone, task, classes


def _base(folder: Path, base: dict, kind: str, classes: list[str], pre, head_type: str) -> Backbone:
    from . import create_backbone, create_text_backbone

    weights = Path(base["weights"]) if base["weights"] else None
    try:
        if pre is None:
            return create_text_backbone(base["model"], classes, kind, pretrained=base["pretrained"], weights=weights,
                                        trust_remote_code=base["trust_remote_code"])
        backbone = create_backbone(base["model"], len(classes) or 1, pretrained=base["pretrained"], weights=weights,
                                   head=head_type, image_size=pre.input_size, labels=classes, kind=kind)
    except UserError as e:
        raise UserError(f"{folder}: cannot rebuild its base model: {e}") from None
    backbone.preprocessing = pre
    return backbone


def _attach(folder: Path, backbone: Backbone, config: dict):
    """Put the folder's adapter on the rebuilt base: peft's own loader (returns its PeftModel, for merge), or
    the visual prompts (returns None)."""
    if not (folder / CONFIG).is_file():  # visual prompts
        from . import vpt

        n = mf.field(config, "finetunekit.peft.prompt_tokens", folder, int, check=lambda v: v >= 1,
                     expected="an integer >= 1")
        vpt.apply(backbone.module, n, backbone.architecture)
        load_tensors(backbone.module, folder)
        return None
    try:
        from peft import PeftModel
    except ImportError:
        raise UserError(f"{folder}: a peft adapter; loading it needs peft (pip install 'finetunekit[peft]')") from None
    try:
        with quiet_peft():
            wrapper = PeftModel.from_pretrained(backbone.module, str(folder))
    except Exception as e:  # noqa: BLE001 - a damaged adapter fails in many ways
        raise UserError(f"{folder}: cannot load the adapter onto its base model ({first_line(e)})") from None
    if wrapper.peft_config["default"].is_prompt_learning:
        wrap_prompted(backbone, wrapper)
    return wrapper


def merge(backbone: Backbone) -> Backbone:
    """A loaded adapter folder's backbone with LoRA, DoRA or IA3 folded into the weights (peft's
    merge_and_unload; the head's trained copy takes the head's place): an ordinary backbone. In place."""
    adapted = backbone.peft
    if adapted is None or adapted.peft_model is None or adapted.method == "prompt":
        raise UserError("--merge: folds the adapters of --peft lora, dora or ia3 into the weights; prompt tokens "
                        "are not weights of the model")
    merged = adapted.peft_model.merge_and_unload()
    return dataclasses.replace(backbone, module=merged, peft=None)
