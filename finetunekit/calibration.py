"""Temperature scaling (Guo et al. 2017): probabilities people can trust, fitted on the validation set after
training (never on the test set) and saved as model/calibration.json (docs/calibration.md).

    fit(kind, logits, targets) -> temperature      one T (single-label) or one T per class (multi-label)
    scale(logits, temperature) -> logits / T       torch tensors or numpy arrays (torch-free: the runtime uses it)
    figures(kind, logits, targets, temperature)    {"ece", "nll"}: torchmetrics' CalibrationError (15 bins, l1)
    read(folder) / write(folder, entry)            model/calibration.json

The temperature minimises the mean negative log-likelihood of the validation samples. That NLL is convex in
beta = 1/T (softmax cross-entropy and BCE of beta * z are convex in beta), so its derivative is increasing and
the minimum is found by bisection on the derivative's sign over log beta, in float64: deterministic, no
learning rate, no start point; T is kept in [T_MIN, T_MAX]. Dividing logits by a positive T never changes a
sample's argmax, nor a multi-label decision at threshold 0.5 (sigmoid(z / T) > 0.5 iff z > 0).

This module imports torch only inside the functions that need it: `finetunekit.runtime` (no torch) reads
calibration.json and scales numpy logits through it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

FILE = "calibration.json"
BINS = 15
T_MIN, T_MAX = 0.05, 20.0  # the temperatures a fit may return
MIN_SAMPLES = 30  # fewer validation samples: no temperature is fitted (its value would be noise)
KINDS = ("classification", "multilabel")  # the task kinds with probabilities to calibrate
_STEPS = 100  # bisection steps over log beta in [log(1/T_MAX), log(1/T_MIN)]: far below float64's resolution


def scale(logits: Any, temperature: float | list[float] | None) -> Any:
    """`logits` [N, C] divided by T (one number, or one per class: broadcast over the last axis); as is when
    `temperature` is None. Torch tensors stay tensors, numpy arrays arrays."""
    if temperature is None:
        return logits
    if hasattr(logits, "new_tensor"):  # torch
        return logits / logits.new_tensor(temperature)
    import numpy as np

    return logits / np.asarray(temperature, dtype=logits.dtype)


def fit(kind: str, logits, targets) -> float | list[float]:
    """The temperature minimising the validation NLL: one float (classification, targets class indices [N]) or
    one per class (multi-label, targets multi-hot [N, C]; a class whose validation labels are all equal, or
    whose fit ends at a bound, keeps T = 1). A single-label T at a bound (`at_bound`) is returned as is: the
    caller decides (posthoc.py does not calibrate then)."""
    import torch

    z = logits.detach().double().cpu()
    if kind == "classification":
        y = targets.detach().long().cpu()
        z_true = z.gather(1, y[:, None]).squeeze(1)

        def slope(beta: torch.Tensor) -> torch.Tensor:  # d mean NLL / d beta, beta [1]
            p = (beta * z).softmax(-1)
            return ((p * z).sum(-1) - z_true).mean()[None]

        return float(1.0 / _bisect(slope, 1)[0])
    if kind == "multilabel":
        y = targets.detach().double().cpu()

        def slope(beta: torch.Tensor) -> torch.Tensor:  # per class, beta [C]
            return ((torch.sigmoid(beta * z) - y) * z).mean(0)

        temperature = 1.0 / _bisect(slope, z.shape[1])
        mixed = (y > 0.5).any(0) & (y < 0.5).any(0)
        return [float(t) if m and not at_bound(float(t)) else 1.0 for t, m in zip(temperature, mixed)]
    raise ValueError(f"no temperature scaling for {kind} tasks")


def at_bound(temperature: float) -> bool:
    """Whether a fitted T is T_MIN or T_MAX: the NLL kept falling towards the bound, so the data does not fix T
    (every validation sample right and the NLL going to 0 as T -> 0, as on `finetunekit demo`'s digits)."""
    return any(abs(math.log(temperature / b)) < 1e-6 for b in (T_MIN, T_MAX))


def _bisect(slope, n: int):
    """Per column, the beta in [1/T_MAX, 1/T_MIN] where the increasing `slope(beta)` crosses 0 (a bound when
    it does not)."""
    import torch

    lo = torch.full((n,), math.log(1 / T_MAX), dtype=torch.float64)
    hi = torch.full((n,), math.log(1 / T_MIN), dtype=torch.float64)
    for _ in range(_STEPS):
        mid = (lo + hi) / 2
        up = slope(mid.exp()) > 0  # past the minimum: it lies below mid
        hi, lo = torch.where(up, mid, hi), torch.where(up, lo, mid)
    return ((lo + hi) / 2).exp()


def probabilities(kind: str, logits, temperature=None):
    """Calibrated probabilities: softmax (classification) or sigmoid (multi-label) of logits / T, float64."""
    z = scale(logits.detach().double().cpu(), temperature)
    return z.softmax(-1) if kind == "classification" else z.sigmoid()


def figures(kind: str, logits, targets, temperature=None) -> dict[str, float]:
    """{"ece", "nll"} of logits / T against targets. ECE: torchmetrics' CalibrationError, 15 bins, l1 norm
    (multiclass for single-label; for multi-label the mean over classes of the binary ECE). NLL: the mean
    cross-entropy (multi-label: the mean binary cross-entropy over samples and classes)."""
    import torch
    import torch.nn.functional as F
    from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error

    z = scale(logits.detach().double().cpu(), temperature)
    if kind == "classification":
        y = targets.detach().long().cpu()
        ece = multiclass_calibration_error(z.softmax(-1).float(), y, num_classes=z.shape[1], n_bins=BINS, norm="l1")
        return {"ece": float(ece), "nll": float(F.cross_entropy(z, y))}
    y = targets.detach().double().cpu()
    p = z.sigmoid().float()
    per_class = [binary_calibration_error(p[:, c].contiguous(), (y[:, c] > 0.5).long(), n_bins=BINS, norm="l1")
                 for c in range(z.shape[1])]
    return {"ece": float(torch.stack(per_class).mean()),
            "nll": float(F.binary_cross_entropy_with_logits(z, y))}


def calibrate(kind: str, logits, targets) -> dict:
    """Fit T on these (validation) outputs; the calibration.json entry: the temperature and the figures before
    and after."""
    temperature = fit(kind, logits, targets)
    before, after = figures(kind, logits, targets), figures(kind, logits, targets, temperature)
    return {"method": "temperature", "temperature": temperature, "fitted_on": "validation",
            "samples": int(len(targets)), "ece_before": before["ece"], "ece_after": after["ece"],
            "nll_before": before["nll"], "nll_after": after["nll"], "bins": BINS}


def read(folder: str | os.PathLike) -> dict | None:
    """The model folder's calibration.json, or None when it has none."""
    path = Path(folder) / FILE
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        from .errors import UserError

        raise UserError(f"{path}: cannot read it ({type(e).__name__}); remove it to predict uncalibrated") from None
    return entry if entry.get("method") == "temperature" else None


def write(folder: Path, entry: dict) -> None:
    tmp = Path(folder) / (FILE + ".tmp")
    tmp.write_text(json.dumps(entry, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, Path(folder) / FILE)
