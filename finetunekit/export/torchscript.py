"""TorchScript: `torch.jit.trace` of the same logits graph as ONNX, through the same parity gate, saved as
model.pt (load it with torch.jit.load). PyTorch deprecates TorchScript in favour of torch.export; this format
is for users whose serving stack still needs it."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .parity import ParityFailed, describe, measure

FILE = "model.pt"


def export(backbone, task, out: Path, *, samples: Sequence[Any], tta: str = "none", max_length: int | None = None,
           batch: int = 8) -> dict:
    """Write out/model.pt; returns {"file", "exporter", "parity", "inputs", "outputs", "rejected"}."""
    import torch  # torch loads on use: importing the registry stays light

    from . import graph as G

    module, names, batches = G.build(backbone, samples, tta=tta, max_length=max_length, batch=batch)
    target = Path(out) / FILE
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # TorchScript's deprecation and tracer warnings; the gate is the judge
        traced = torch.jit.trace(module, G.example(batches, names), check_trace=False, strict=False)
        traced.save(str(target))
        loaded = torch.jit.load(str(target)).eval()

    @torch.inference_mode()
    def candidate(feeds):
        return loaded(*(torch.from_numpy(feeds[n]) for n in names)).float().numpy()

    parity = measure(G.eager(module, names), candidate, batches)
    if not parity["passed"]:
        target.unlink(missing_ok=True)
        raise ParityFailed(f"TorchScript export: the traced model does not reproduce eager PyTorch "
                           f"({describe(parity)}, over the gate's {parity['tolerance']:g}); nothing written")
    return {"file": FILE, "exporter": "torch.jit.trace", "parity": parity, "inputs": names,
            "outputs": [G.OUTPUT], "rejected": []}
