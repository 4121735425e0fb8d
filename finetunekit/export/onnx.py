"""ONNX: `torch.onnx.export`, the dynamo path (dynamo=True, PyTorch's default) first, then the
TorchScript-based path (dynamo=False); each candidate runs in onnxruntime through the parity gate, and the
first that passes is kept. If neither passes, ParityFailed: a wrong model is never written.

Why both: the dynamo exporter has had open accuracy bugs (pytorch/pytorch#169178, #166797), the older path
is deprecated; whichever reproduces eager PyTorch on real inputs is the one shipped.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .parity import ParityFailed, describe, measure

FILE = "model.onnx"
PATHS = ("dynamo", "torchscript")  # tried in this order
OPSET = 18


def export(backbone, task, out: Path, *, samples: Sequence[Any], tta: str = "none", max_length: int | None = None,
           batch: int = 8, paths: Sequence[str] = PATHS) -> dict:
    """Write out/model.onnx for `backbone` (its logits for `task`); returns {"file", "exporter", "parity",
    "inputs", "outputs", "rejected"}."""
    import onnxruntime as ort

    from . import graph as G  # torch loads on use: importing the registry stays light

    module, names, batches = G.build(backbone, samples, tta=tta, max_length=max_length, batch=batch)
    text = G.is_text(backbone)
    reference = G.eager(module, names)
    target = Path(out) / FILE
    rejected: list[str] = []
    for path in paths:
        target.unlink(missing_ok=True)
        try:
            convert(module, G.example(batches, names), names, target, dynamo=path == "dynamo", text=text)
            session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
            parity = measure(reference, lambda feeds: session.run([G.OUTPUT], feeds)[0], batches)
        except Exception as e:  # noqa: BLE001 - an exporter crash is one more rejected path, named below
            rejected.append(f"{path}: {type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e) else ''}")
            continue
        if parity["passed"]:
            return {"file": FILE, "exporter": f"torch.onnx.export(dynamo={path == 'dynamo'})", "parity": parity,
                    "inputs": names, "outputs": [G.OUTPUT], "rejected": rejected}
        rejected.append(f"{path}: {describe(parity)}, over the gate's {parity['tolerance']:g}")
    target.unlink(missing_ok=True)
    raise ParityFailed("ONNX export: no exporter path reproduces eager PyTorch, nothing written ("
                       + "; ".join(rejected) + ")")


def convert(module: torch.nn.Module, example: tuple[torch.Tensor, ...], names: Sequence[str], target: Path, *,
            dynamo: bool, text: bool) -> None:
    """One torch.onnx.export call: a dynamic batch axis (and sequence axis for text), one file."""
    import torch

    from . import graph as G

    axes = {0: "batch", 1: "sequence"} if text else {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation and tracer notes; the gate is the judge
        if dynamo:
            dims = {i: torch.export.Dim.DYNAMIC for i in axes}
            torch.onnx.export(module, example, str(target), dynamo=True, input_names=list(names),
                              output_names=[G.OUTPUT], dynamic_shapes=tuple(dims for _ in names),
                              external_data=False, opset_version=OPSET, verbose=False)
        else:
            dynamic = {n: axes for n in names} | {G.OUTPUT: {0: "batch"}}
            torch.onnx.export(module, example, str(target), dynamo=False, input_names=list(names),
                              output_names=[G.OUTPUT], dynamic_axes=dynamic, opset_version=17)
