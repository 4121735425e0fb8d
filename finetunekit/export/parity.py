"""The parity gate every exported model passes before it is written: the exported graph against eager
PyTorch on real validation inputs, at batch 1 and at batch N.

fp32 passes when the largest |logit difference| is <= 1e-4 and, for models with several outputs, the top-1
(argmax) agrees on every sample. A model that fails is never shipped: the exporter tries its other path or
stops with ParityFailed (docs/export.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..errors import UserError

FP32_TOLERANCE = 1e-4  # max |Δlogit| of an fp32 export against eager PyTorch

Feeds = dict[str, np.ndarray]  # input name -> batch array, as onnxruntime takes it


class ParityFailed(UserError):
    """An export whose outputs differ from eager PyTorch beyond the gate's tolerance (exit code 1)."""

    exit_code = 1


def measure(reference: Callable[[Feeds], np.ndarray], candidate: Callable[[Feeds], np.ndarray],
            batches: Sequence[Feeds], tolerance: float = FP32_TOLERANCE) -> dict:
    """Run both on each batch: {"max_abs_diff", "top1_agreement" (None for one output), "samples",
    "batch_sizes", "tolerance", "passed"}. A shape mismatch or a non-finite output counts as a failure."""
    worst, agree, total, sizes, problem = 0.0, 0, 0, [], None
    several = True
    for feeds in batches:
        ref = np.asarray(reference(feeds), dtype=np.float64)
        got = np.asarray(candidate(feeds), dtype=np.float64)
        sizes.append(int(ref.shape[0]))
        if ref.shape != got.shape:
            problem = f"output shape {list(got.shape)}, expected {list(ref.shape)}"
            worst = float("inf")
            continue
        diff = np.abs(ref - got)
        worst = max(worst, float(diff.max()) if np.isfinite(diff).all() else float("inf"))
        several = ref.ndim == 2 and ref.shape[1] > 1
        if several:
            agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        total += ref.shape[0]
    top1 = agree / total if several and total else None
    passed = problem is None and worst <= tolerance and (top1 is None or top1 == 1.0)
    return {"max_abs_diff": worst, "top1_agreement": top1, "samples": total, "batch_sizes": sizes,
            "tolerance": tolerance, "passed": passed, **({"problem": problem} if problem else {})}


def describe(parity: dict) -> str:
    """'max |Δlogit| 2.4e-07, top-1 agreement 100.0% (batches of 1 and 8)' for logs and errors."""
    if parity.get("problem"):
        return parity["problem"]
    top1 = "" if parity["top1_agreement"] is None else f", top-1 agreement {100 * parity['top1_agreement']:.1f}%"
    sizes = " and ".join(str(s) for s in parity["batch_sizes"])
    return f"max |Δlogit| {parity['max_abs_diff']:.2g}{top1} (batches of {sizes})"
