"""The Backbone (a network and how to feed it) and the Source contract every model source answers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from ..data.transforms import Preprocessing
from ..errors import UserError

if TYPE_CHECKING:
    from .groups import Group


@dataclass
class Backbone:
    """A network whose head outputs `num_outputs` logits, and how to feed and rebuild it.

    `module` is the source library's own model (a timm, torchvision or transformers `nn.Module`), so its
    state dict keeps the library's names and loads back with that library alone.
    """

    module: nn.Module
    source: str  # a key of models.SOURCES: "timm" | "torchvision" | "hf" | "hf-image"
    architecture: str  # the source's model name, e.g. "tf_efficientnet_lite0", "BertForSequenceClassification"
    head: str  # dotted name of the head module; comma-separated when it is several (DistilBERT)
    preprocessing: Preprocessing | None  # images: size, mean, std, crop
    num_features: int  # width of the features the head reads
    tokenizer: Any = None  # text: the model's tokenizer
    blocks: str | None = None  # dotted name of the ModuleList of blocks/layers, input to output, if known
    image_processor: Any = None  # hf-image: the model's transformers image processor (saved with it)
    model_args: dict[str, Any] = field(default_factory=dict)  # constructor arguments that rebuild the
    # saved shapes (timm's img_size, torchvision's image_size), saved as config.json's model_args
    pruned_layers: dict[str, dict[str, int]] = field(default_factory=dict)  # --prune: the layers whose shapes
    # differ from the architecture's ({"blocks.1.0.conv_pw": {"in_channels": 16, "out_channels": 67, "groups": 1}}),
    # saved as config.json's finetunekit.pruned_layers and applied before the weights load (models/pruned.py)
    peft: Any = None  # --peft: the method, the parameters any phase may train (adapters and head) and the base
    # model's identity (models/adapter_folder.Adapted); its model folder keeps the adapter alone

    @property
    def heads(self) -> tuple[str, ...]:
        return tuple(self.head.split(","))

    @property
    def adapter(self) -> type[Source]:
        from .registry import SOURCES

        return SOURCES[self.source]

    def is_head(self, name: str) -> bool:
        """Whether a parameter, buffer or module `name` belongs to the head."""
        return any(name == h or name.startswith(h + ".") for h in self.heads)

    def head_parameter_names(self) -> set[str]:
        return {n for n, _ in self.module.named_parameters() if self.is_head(n)}


@dataclass(frozen=True)
class CreateOptions:
    """What a fit asks of a new backbone (plain values, from the recipe's model and data sections)."""

    pretrained: bool = True
    weights: Path | None = None  # a file replacing the source's pretrained weights
    drop_path: float | None = None
    dropout: float | None = None
    head: str = "linear"  # linear | mlp:N
    image_size: int | None = None  # images: the input size; None = the model's own
    labels: tuple[str, ...] = ()  # class names (hf: id2label); () for regression
    kind: str = "classification"  # classification | multilabel | regression
    trust_remote_code: bool = False
    spec: str = ""  # the --model value, for messages


class Source:
    """One model source: the same questions answered for timm, torchvision and transformers.

    Adapters are classes with class methods (no state: the state is the Backbone). `loads_in` states what
    loads a saved model folder besides `finetunekit.load` (docs/models.md; tests/test_adapters.py checks it).
    """

    name: ClassVar[str]  # the key in SOURCES and the `source` recorded in a model folder
    modality: ClassVar[str]  # "image" | "text"
    loads_in: ClassVar[str] = ""
    mlp_head: ClassVar[bool] = True  # whether --head mlp:N can replace the head
    prunable: ClassVar[bool] = False  # whether --prune can remove channels (its folder records the pruned shapes)
    peft_methods: ClassVar[tuple[str, ...]] = ()  # the --peft methods its models take (check_peft: per model)

    @classmethod
    def check_name(cls, name: str) -> None:
        """Cheap validation of the part after `source:`, before any data is read."""

    @classmethod
    def check_peft(cls, spec: str, method: str) -> None:
        """A UserError (before any data is read) when `--peft method` does not apply to `--model spec`."""
        if method not in cls.peft_methods:
            takes = f" (it takes --peft {', '.join(cls.peft_methods)})" if cls.peft_methods else ""
            raise UserError(f"--peft {method}: does not apply to --model {spec}{takes}")

    @classmethod
    def create(cls, name: str, num_outputs: int, options: CreateOptions) -> Backbone:
        raise NotImplementedError

    @classmethod
    def reset_head(cls, backbone: Backbone, num_outputs: int) -> None:
        raise NotImplementedError

    @classmethod
    def layer_groups(cls, backbone: Backbone) -> list[Group]:
        from .groups import default_groups

        return default_groups(backbone)

    @classmethod
    def data_config(cls, backbone: Backbone) -> Preprocessing | Any:
        """Images: the Preprocessing (mean, std, size, interpolation, crop); text: the tokenizer."""
        return backbone.preprocessing if cls.modality == "image" else backbone.tokenizer

    @classmethod
    def set_input_size(cls, backbone: Backbone, size: int | None) -> None:
        """Feed the model `size` x `size` images (ViTs: their position embeddings resampled)."""
        if size is not None:
            backbone.preprocessing = backbone.preprocessing.with_size(size)

    @classmethod
    def set_grad_checkpointing(cls, backbone: Backbone, enable: bool = True) -> None:
        raise UserError(f"gradient checkpointing: not supported for {cls.name}:{backbone.architecture}")

    @classmethod
    def save(cls, folder: Path, backbone: Backbone, classes: list[str], ours: dict) -> None:
        """Write model.safetensors and config.json (and the source's own files) into `folder`."""
        raise NotImplementedError

    @classmethod
    def load(cls, folder: Path, config: dict) -> tuple[Backbone, str, list[str]]:
        """(backbone with the saved weights, in eval mode; task name; classes) from a validated folder."""
        raise NotImplementedError

    @classmethod
    def load_native(cls, folder: Path) -> nn.Module:
        """The folder loaded with the source's own library alone (interop), as its users would."""
        raise UserError(f"{folder}: {cls.name} folders load with finetunekit.load only")
