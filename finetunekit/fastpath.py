"""The fast path: what the builder adds on top of accelerate for speed (see docs/speed.md).

    channels_last        CNNs, on GPUs and CPUs: weights and input batches in NHWC, the layout cuDNN's
                         fastest convolution kernels (tensor cores) and oneDNN's on the CPU want (an
                         EfficientNet-Lite0 training step at 64 px: 1.27x faster on this machine's CPU);
                         not for ViTs and other transformers, whose only convolution is a patch embedding
    compile_with_fallback  --compile: torch.compile, and eager execution with one log line when it fails
    match_param_layout   a resumed optimizer's state in its parameters' layout (fused kernels need it)
    cpu_bf16             whether `--precision auto` takes bf16 autocast for a model on this CPU (its
                         instruction set, and whether the model is a CNN)

None of these changes what is saved: state dicts keep their keys, and every writer copies tensors
contiguous (checkpoint._tensors, artifacts._write_image).
"""

from __future__ import annotations

import logging
import os

import torch

from .errors import first_line
from torch import nn

log = logging.getLogger("finetunekit")

# CPU instructions with which bf16 autocast measured faster than fp32 in training, with accuracy kept
# (bench/bench_cpu_precision.py, docs/speed.md); first match wins. It pays for transformers only: on an
# Intel Xeon with AMX, minilm trains 1.64x and ViT-S/16 2.36x faster, SST-2 dev accuracy kept; on an AMD
# EPYC with AVX512-BF16 (no AMX) minilm 1.57x. CNNs stay fp32: EfficientNet-Lite0's depthwise convolutions
# ran 0.94x (224 px) and 0.52x (64 px) with AMX, 1.33x and 0.55x without.
BF16_PAYS: tuple[tuple[str, str], ...] = (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"))
COMPILE_BACKEND = "inductor"  # torch.compile's default; tests swap in a backend that fails


def is_cnn(module: nn.Module) -> bool:
    """Whether `module` has a sliding-window Conv2d (kernel != stride). A ViT's or Swin's only Conv2d is its
    patch embedding, kernel == stride (16/16, 4/4): that alone does not make a CNN."""
    return any(isinstance(m, nn.Conv2d) and m.kernel_size != m.stride for m in module.modules())


def channels_last(module: nn.Module) -> bool:
    """Put `module`'s 4-D weights in channels_last and convert its 4-D tensor input to it as it comes in (a
    forward pre-hook, kept by copies such as the EMA's), when it is a CNN (`is_cnn`). The parameters stay
    the same objects (an optimizer built over them keeps working). Returns whether `module` is in channels_last
    (a second call converts nothing again)."""
    if getattr(module, "_channels_last", False):  # already converted (the feature extraction does it first)
        return True
    if not is_cnn(module):
        return False
    module.to(memory_format=torch.channels_last)
    module.register_forward_pre_hook(_input_channels_last)
    module._channels_last = True
    return True


def _input_channels_last(module: nn.Module, args: tuple):
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        return (x.contiguous(memory_format=torch.channels_last), *args[1:])  # [B, C, H, W], NHWC strides
    return None


def match_param_layout(optimizer) -> None:
    """Give each optimizer state tensor its parameter's strides. A state dict loaded from a checkpoint is
    contiguous; fused Adam(W) reads a parameter and its moments as flat memory, so a channels_last
    parameter with contiguous moments would be updated with the wrong moments, silently."""
    for p, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.shape == p.shape and value.stride() != p.stride():
                state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def compile_with_fallback(module: nn.Module) -> nn.Module:
    """torch.compile(module), falling back to eager execution if compiling fails.

    A compilation error (no C++ compiler, an operation the compiler does not support) surfaces at the first
    call of the compiled module, not at torch.compile; so its forward tries the compiled path and, when
    that raises and the eager module then succeeds, logs one line and runs eagerly from then on (an error
    of the model itself is raised again by the eager call). An error that first appears when the backward
    pass is compiled is not caught. The parameters are the module's own; accelerate's
    `unwrap_model(compiled, keep_torch_compile=False)` returns `module`, whose state dict keys carry no
    `_orig_mod.` prefix."""
    compiled = torch.compile(module, backend=COMPILE_BACKEND)
    compiled_forward = compiled.forward

    def forward(*args, **kwargs):
        try:
            return compiled_forward(*args, **kwargs)
        except torch.OutOfMemoryError:
            raise  # the run's own out-of-memory stop says what to do
        except Exception as e:  # noqa: BLE001 - compiler failures come in many types
            out = module(*args, **kwargs)
            compiled.forward = module.__call__  # eager from now on
            log.warning("--compile: torch.compile failed (%s); running eagerly", _reason(e))
            return out

    compiled.forward = forward
    return compiled


def _reason(e: BaseException) -> str:
    """'Type: first line' of the innermost cause (dynamo wraps a backend's error in BackendCompilerFailed)."""
    while getattr(e, "inner_exception", None) is not None or e.__cause__ is not None:
        e = getattr(e, "inner_exception", None) or e.__cause__
    return first_line(e)


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            line = next((x for x in f if x.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.split(":", 1)[1].split()) if ":" in line else set()


def cpu_bf16(module: nn.Module) -> str | None:
    """Why `--precision auto` runs `module` in bf16 autocast on this CPU (the instructions that make it
    pay), or None for fp32: a CNN (`is_cnn`) is fp32 on every CPU. FINETUNEKIT_CPU_BF16=1 or 0 overrides
    the detection for every model (the tests pin 0: their exact numbers are fp32's)."""
    forced = os.environ.get("FINETUNEKIT_CPU_BF16")
    if forced in ("0", "1"):
        return "FINETUNEKIT_CPU_BF16=1" if forced == "1" else None
    if is_cnn(module):
        return None
    flags = cpu_flags()
    for flag, name in BF16_PAYS:
        if flag in flags:
            return f"{name}, not a CNN"
    return None
