"""The stage after training: one pass of the best model over the validation (and test) set, whose outputs
serve both the calibration (calibration.py: the temperature fitted on validation, model/calibration.json, the
out-of-distribution threshold of uncertainty.py) and the predictions files (predictions.py).

    scored = score_best(accelerator, model, {"val": loader, "test": loader}, task, quiet)   every process
    metrics.update(finish(scored, task, originals, run_dir, model_dir, calibrate=...))        process 0 writes

The passes go through evaluation.evaluate (gather_for_metrics: each sample once, whatever the processes).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import calibration, predictions
from .evaluation import Outputs, evaluate

log = logging.getLogger("finetunekit")


@dataclass
class Scored:
    metrics: dict
    outputs: Any  # logits [N, C] (or a list of detections), in loader order
    targets: Any
    seconds: float = 0.0  # the pass's wall time


def score_best(accelerator, module: torch.nn.Module, loaders: dict, task, quiet: bool) -> dict[str, Scored]:
    """Each split's metrics and gathered outputs, from one evaluation pass of `module` (the best weights)."""
    out = {}
    # a task that scores a subset per epoch (seq2seq: generation) scores every sample here
    whole = getattr(task, "scoring_best", contextlib.nullcontext)
    for split, loader in loaders.items():
        kept, started = Outputs(), time.perf_counter()
        with whole():
            metrics = evaluate(accelerator, module, loader, task, desc=split, quiet=quiet, keep=kept)
        out[split] = Scored(metrics, *kept.joined(), seconds=time.perf_counter() - started)
    return out


def finish(scored: dict[str, Scored], task, originals: dict, run_dir: Path | None, model_dir: Path | None, *,
           calibrate: bool) -> dict:
    """Fit the calibration on validation (`calibrate`, classification and multi-label), write
    model/calibration.json and the predictions files (when `run_dir`/`model_dir` are given: process 0), and
    return metrics.json's "calibration" entry ({} when there is none). `originals`: each split's unprepared
    loader (its items and sample order)."""
    started = time.perf_counter()
    ordered = {}
    for split, s in scored.items():
        n = len(s.targets)
        order = predictions.loader_order(originals[split], n)
        ordered[split] = (predictions.in_dataset_order(s.outputs, order), predictions.in_dataset_order(s.targets, order))
    entry = _calibration(task, ordered, calibrate)
    temperature = entry.get("temperature") if entry else None
    if model_dir is not None and entry:
        calibration.write(model_dir, {k: v for k, v in entry.items() if k != "test"})
    written = []
    if run_dir is not None:
        for split, (outputs, targets) in ordered.items():
            path = run_dir / predictions.FILES[split]
            predictions.write(path, task, predictions.items_of(originals[split]), outputs, targets, temperature)
            written.append(path.name)
    if written:  # the validation pass is this stage's own (the test set was always scored once)
        val, rest = scored["val"].seconds, time.perf_counter() - started
        log.info("predictions: %s; %.1fs added (the best model's validation pass %.1fs, calibration and files "
                 "%.1fs)", ", ".join(written), val + rest, val, rest)
    return {"calibration": entry} if entry else {}


def _calibration(task, ordered: dict, calibrate: bool) -> dict:
    kind = task.kind
    if kind not in calibration.KINDS:
        log.info("calibration: none for %s (no class probabilities to calibrate)", kind)
        return {}
    if not calibrate:
        log.info("calibration: off (--no-calibration); predict gives uncalibrated probabilities")
        return {}
    logits, targets = ordered["val"]
    if len(targets) < calibration.MIN_SAMPLES:
        log.info("calibration: skipped: %d validation samples, fewer than the %d a temperature needs",
                 len(targets), calibration.MIN_SAMPLES)
        return {}
    entry = calibration.calibrate(kind, logits, targets)
    if isinstance(entry["temperature"], float) and calibration.at_bound(entry["temperature"]):
        log.info("calibration: skipped: the validation NLL keeps falling towards T = %g (%s); the data does not fix "
                 "a temperature", entry["temperature"],
                 "every validation sample is right" if entry["nll_after"] < 1e-3 else "a bound of the search")
        return {}
    if kind == "classification":
        from .uncertainty import fit_ood

        entry["ood"] = fit_ood(calibration.scale(logits.double(), entry["temperature"]).numpy())
    if "test" in ordered:
        z, y = ordered["test"]
        before, after = calibration.figures(kind, z, y), calibration.figures(kind, z, y, entry["temperature"])
        entry["test"] = {"samples": len(y), "ece_before": before["ece"], "ece_after": after["ece"],
                         "nll_before": before["nll"], "nll_after": after["nll"]}
    t = entry["temperature"]
    shown = f"T = {t:.4g}" if isinstance(t, float) else f"T per class {min(t):.3g}..{max(t):.3g}"
    test = entry.get("test")
    log.info("calibration: %s fitted on %d validation samples; ECE %.4f -> %.4f, NLL %.4f -> %.4f%s", shown,
             entry["samples"], entry["ece_before"], entry["ece_after"], entry["nll_before"], entry["nll_after"],
             f" (test: ECE {test['ece_before']:.4f} -> {test['ece_after']:.4f}, NLL {test['nll_before']:.4f} -> "
             f"{test['nll_after']:.4f})" if test else "")
    return entry
