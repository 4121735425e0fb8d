"""What the image sources (timm, torchvision) share: the create sequence and the timm-format model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from . import folder as mf
from . import pruned
from .base import Backbone, CreateOptions, Source
from .heads import apply_head
from .weights import load_weights, read_state_dict


class ImageSource(Source):
    modality: ClassVar[str] = "image"
    prunable: ClassVar[bool] = True
    peft_methods: ClassVar[tuple[str, ...]] = ("lora", "dora")

    @classmethod
    def create(cls, name: str, num_outputs: int, options: CreateOptions) -> Backbone:
        """The source's model; a fresh head of `num_outputs` (linear, or the MLP of --head); `weights` (a file)
        in place of the pretrained ones, its head kept when its shape fits; the input size last (ViTs
        resample the position embeddings they were given)."""
        use_hub = options.pretrained and options.weights is None
        backbone = cls._new(name, use_hub, options.drop_path, options.dropout if options.head == "linear" else None)
        cls.reset_head(backbone, num_outputs)
        apply_head(backbone, options.head, options.dropout)
        if options.weights is not None:
            load_weights(backbone, read_state_dict(options.weights), f"--weights {options.weights}")
        cls.set_input_size(backbone, options.image_size)
        return backbone

    @classmethod
    def _new(cls, name: str, pretrained: bool, drop_path: float | None, dropout: float | None) -> Backbone:
        """The model with its original head (replaced after)."""
        raise NotImplementedError

    @classmethod
    def _rebuild(cls, architecture: str, num_classes: int, model_args: dict[str, Any]) -> Backbone:
        """An untrained network of a saved architecture, head included (weights are loaded after)."""
        raise NotImplementedError

    @classmethod
    def save(cls, folder: Path, backbone: Backbone, classes: list[str], ours: dict) -> None:
        mf.write_image_folder(folder, backbone, classes, ours)

    @classmethod
    def load(cls, folder: Path, config: dict) -> tuple[Backbone, str, list[str]]:
        saved = mf.read_image_folder(folder, config)
        cls.check_architecture(saved["architecture"], folder)
        state = mf.read_weights(folder)
        backbone = cls._rebuild(saved["architecture"], saved["num_classes"], saved["model_args"])
        apply_head(backbone, saved["head_type"], None)  # dropout is inactive at inference
        if saved["pruned_layers"]:  # --prune: the architecture's layers resized to the saved channels
            pruned.apply(backbone.module, saved["pruned_layers"], folder, saved["architecture"])
            backbone.pruned_layers = dict(saved["pruned_layers"])
        backbone.preprocessing = saved["preprocessing"]
        backbone.model_args = dict(saved["model_args"])
        mf.load_into(backbone, state, folder)
        backbone.module.eval()
        return backbone, saved["task"], saved["labels"]

    @classmethod
    def check_architecture(cls, architecture: str, folder: Path) -> None:
        """A UserError naming config.json's architecture field when the source has no such model."""

    @classmethod
    def _refuse_mlp(cls, folder: Path) -> dict:
        config = mf.read_config(folder)
        if config.get("finetunekit", {}).get("pruned_layers"):
            from ..errors import UserError

            raise UserError(f"{folder}: its layers are pruned (--prune; finetunekit.pruned_layers), which only "
                            f"finetunekit.load rebuilds")
        if mf.read_head_type(config, folder) != "linear":
            from ..errors import UserError

            raise UserError(f"{folder}: its head is an MLP (finetunekit.head_type "
                            f"{config['finetunekit']['head_type']}), which only finetunekit.load rebuilds")
        return config


def last_linear(module: nn.Module) -> str:
    """The head is the last nn.Linear in registration order (fc, classifier[-1], heads.head, ...)."""
    from ..errors import UserError

    linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"--model: {type(module).__name__} has no linear classifier head to replace")
    return linears[-1]
