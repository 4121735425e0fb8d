"""Quantization-aware training (`--qat`) with torchao, for models that compute in Linear layers
(transformer encoders; ViTs but for their patch convolution).

Before training, `wrap_model` swaps every nn.Linear for torchao's FakeQuantizedLinear (`quantize_` with a
`QATConfig`): int8 weights, symmetric, one scale per output channel; int8 activations, asymmetric, one
scale and zero point per token, chosen at run time. The swap keeps the layers' Parameter objects, so the
optimizer built before it trains them unchanged; the state dict's keys are the plain model's, so the model
folder, checkpoints and resume see an ordinary model (its fp32 "latent" weights).

After training, `finish` loads the best weights, scores them three ways on the validation set (fp32 with
fake quantization off, fake-quantized, and converted to real int8) and writes the int8 model as
`model.int8.safetensors` in the model folder. The conversion swaps the layers back (`QATConfig(step=
"convert")`) and applies `Int8DynamicActivationInt8WeightConfig` with the same scheme, so the int8 model
computes what training simulated (int8 x int8 matmuls with int32 accumulation, `torch._int_mm`).
`load_int8(folder)` loads it back. Post-training quantization of plain fp32 weights (`ptq`) is the same
conversion without the fake-quantized training: bench/bench_qat.py measures the two side by side.

Not CNNs: torchao's eager QAT swaps Linear and Embedding layers only. Convolutions need the PT2E flow
(torch.export, `prepare_qat_pt2e`, the X86 Inductor quantizer), whose exported graph module cannot switch
between train() and eval() as the loop does and renames every parameter (the strategy's groups, the
model folder and resume are keyed by name); `wrap_model` refuses a model whose layer weights are mostly
convolutions, and `finetunekit export --quantize static` (ONNX Runtime) is their int8 path.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from .base import AddOn

log = logging.getLogger("finetunekit")

FILE = "model.int8.safetensors"
SCHEME = ("int8 weights (symmetric, per output channel), int8 activations (asymmetric, per token, dynamic); "
          "Linear layers")
FORMAT = "torchao-int8-dynamic"  # the safetensors metadata's "format"
_PARTS = ("qdata", "scale", "zero_point")  # an Int8Tensor weight, flattened to plain tensors


def _linear(module: nn.Module, fqn: str = "") -> bool:
    return type(module) is nn.Linear


def qat_config(step: str):
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    if step == "convert":
        return QATConfig(step="convert")
    # torchao's per-token fake quantization is asymmetric only; int8_config() matches it
    activations = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    weights = IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True)
    return QATConfig(activation_config=activations, weight_config=weights, step="prepare")


def int8_config():
    """The real int8 scheme the fake quantization simulates."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, MappingType

    return Int8DynamicActivationInt8WeightConfig(act_mapping_type=MappingType.ASYMMETRIC, set_inductor_config=False)


def prepare(module: nn.Module) -> int:
    """Swap `module`'s nn.Linear layers for fake-quantized ones, in place; returns how many."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedLinear

    quantize_(module, qat_config("prepare"), filter_fn=_linear)
    return sum(isinstance(m, FakeQuantizedLinear) for m in module.modules())


def set_fake_quant(module: nn.Module, enabled: bool) -> None:
    """Fake quantization on or off (off: the fp32 latent weights, as the model folder holds them)."""
    from torchao.quantization.qat import FakeQuantizedLinear

    for m in module.modules():
        if isinstance(m, FakeQuantizedLinear):
            for q in (m.activation_fake_quantizer, m.weight_fake_quantizer):
                if q is not None:
                    q.enabled = enabled


def convert(module: nn.Module) -> nn.Module:
    """The int8 model, in place: fake-quantized layers back to nn.Linear, then real int8 weights."""
    from torchao.quantization import quantize_

    quantize_(module, qat_config("convert"))
    return ptq(module)


def ptq(module: nn.Module) -> nn.Module:
    """Post-training quantization of a plain fp32 model to the same int8 scheme, in place."""
    from torchao.quantization import quantize_

    quantize_(module, int8_config(), filter_fn=_linear)
    return module


def int8_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The int8 model's state as plain tensors: an int8 weight `w` as `w.qdata` (int8 [out, in]),
    `w.scale` and `w.zero_point` ([out, 1]); everything else as it is."""
    from torchao.quantization import Int8Tensor

    out = {}
    for name, t in module.state_dict().items():
        if isinstance(t, Int8Tensor):
            out.update({f"{name}.{p}": getattr(t, p).detach().contiguous().clone() for p in _PARTS
                        if getattr(t, p, None) is not None})
        else:
            out[name] = t.detach().contiguous().clone()  # clone: safetensors refuses tensors sharing memory
    return out


def save_int8(module: nn.Module, path: Path) -> None:
    import torchao
    from safetensors.torch import save_file

    save_file(int8_tensors(module), str(path), metadata={"format": FORMAT, "scheme": SCHEME,
                                                         "torchao": torchao.__version__})


def load_int8(path: str | Path):
    """A run's (or model folder's) int8 model: `finetunekit.load`, its Linear layers quantized to the same
    scheme, then the int8 tensors of model.int8.safetensors put in. Returns the loaded model (its
    `.predict` runs int8)."""
    from safetensors import safe_open
    from torchao.quantization import Int8Tensor

    from ..artifacts import load

    model = load(path)
    file = model.folder / FILE
    if not file.is_file():
        raise UserError(f"{model.folder}: no {FILE} (written by `finetunekit fit --qat`)")
    with safe_open(str(file), "pt") as f:
        if (f.metadata() or {}).get("format") != FORMAT:
            raise UserError(f"{file}: not a {FORMAT} file")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    module = ptq(model.module)
    state = module.state_dict()
    with torch.no_grad():
        for name, t in state.items():
            if isinstance(t, Int8Tensor):
                for p in _PARTS:
                    if getattr(t, p, None) is not None:
                        getattr(t, p).copy_(tensors[f"{name}.{p}"])
            elif name in tensors:
                t.copy_(tensors[name])
    return model


def conv_share(module: nn.Module) -> float:
    """The share of `module`'s layer weights (Linear and convolutions) that are convolutions."""
    conv = sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.modules.conv._ConvNd))
    linear = sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))
    return conv / max(conv + linear, 1)


class QAT(AddOn):
    name = "qat"

    def __init__(self, backbone, max_accuracy_drop: float = 1.0):
        self.backbone, self.max_accuracy_drop = backbone, max_accuracy_drop

    def wrap_model(self, module: nn.Module) -> nn.Module:
        if module is not self.backbone.module:  # build.fast_inputs never caches features under --qat
            raise UserError("--qat: the model trains on cached features; QAT needs the whole model")
        share = conv_share(module)
        if share > 0.5:
            raise UserError(f"--qat: {self.backbone.architecture} keeps {100 * share:.0f}% of its layer weights in "
                            f"convolutions and torchao's QAT fake-quantizes Linear layers only; for an int8 CNN use "
                            f"`finetunekit export RUN --quantize static` (docs/export.md)")
        n = prepare(module)
        log.info("QAT: %d Linear layers fake-quantized (%s)", n, SCHEME)
        return module

    def model_config(self) -> dict[str, Any]:
        return {"qat": {"file": FILE, "format": FORMAT, "scheme": SCHEME}}

    def finish(self, best: Callable[[], nn.Module], folder: Path | None,
               score: Callable[[nn.Module], dict]) -> dict[str, Any]:
        model = best()
        fake = score(model)
        set_fake_quant(model, False)
        fp32 = score(model)
        set_fake_quant(model, True)
        int8 = convert(copy.deepcopy(model))
        q = score(int8)
        if folder is not None:
            save_int8(int8, folder / FILE)
        plain = {k: v for k, v in fp32.items() if k != "samples"}
        entry: dict[str, Any] = {"file": FILE, "scheme": SCHEME, "fp32": plain,
                                 "fake_quant": {k: v for k, v in fake.items() if k != "samples"},
                                 "int8": {k: v for k, v in q.items() if k != "samples"}, "samples": q.get("samples")}
        if "accuracy" in fp32:
            drop = 100 * (fp32["accuracy"] - q["accuracy"])
            entry.update(drop_points=drop, max_drop_points=self.max_accuracy_drop)
            log.info("QAT: validation accuracy fp32 %.4f, fake-quantized %.4f, int8 %.4f (%s)",
                     fp32["accuracy"], fake["accuracy"], q["accuracy"], folder / FILE if folder else FILE)
            if drop > self.max_accuracy_drop:
                entry["warning"] = (f"int8 validation accuracy {q['accuracy']:.4f} is {drop:.1f} points below the "
                                    f"fp32 weights' {fp32['accuracy']:.4f} (more than --max-accuracy-drop "
                                    f"{self.max_accuracy_drop:g})")
                log.warning("warning: %s", entry["warning"])
        return {"qat": entry}
