"""`predict` as every loaded model offers it, eager (inference.FineTunedModel) or exported
(runtime.RuntimeModel): torch-free, so the ONNX runtime path can share it. A subclass gives `_inputs` (items to
score, extra fields per result), `_scores` (their outputs in order, and {index: reason} for those that did not
read) and `task.predict`."""

from __future__ import annotations

from typing import Any

from .errors import UserError


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise UserError(f"batch_size: expected a value >= 1, got {batch_size}")


class Predictor:
    task: Any
    # model/calibration.json (an ONNX export: config.json's "calibration"); None: probabilities as the model gives
    # them. predict divides the logits by its temperature; `logits` stay raw. Set to None to opt out.
    calibration: dict | None = None

    @property
    def temperature(self) -> float | list[float] | None:
        return self.calibration.get("temperature") if self.calibration else None

    def _inputs(self, inputs: Any) -> tuple[list[Any], list[dict]]:
        raise NotImplementedError

    def _scores(self, items: list[Any], batch_size: int, skip: bool) -> tuple[Any, dict[int, str]]:
        raise NotImplementedError

    def _check_mc(self) -> None:
        """A one-line UserError when this model cannot do Monte-Carlo dropout passes."""
        raise UserError("--mc-dropout: needs the PyTorch model (a run or model folder), not an exported model")

    def _mc_scores(self, items: list[Any], batch_size: int, skip: bool, passes: int) -> Any:
        """[passes, N, C] logits of `passes` Monte-Carlo dropout passes (the eager model only)."""
        raise NotImplementedError

    def predict(self, inputs: Any, batch_size: int = 64, top_k: int = 1, errors: str = "raise",
                uncertainty: bool = False, mc_dropout: int = 0, ood_score: str | None = None) -> list[dict]:
        """One dict per input, in input order: the task's prediction (label/score/top_k, labels/scores, or value),
        its probabilities calibrated (`calibration`).

        errors="raise": an unreadable image is a UserError naming it; "skip": its dict is {"path", "error"}.
        uncertainty (single-label classification): also max_prob, entropy and, when the model was calibrated,
        ood_score and ood (`ood_score`: energy or msp, default the one fitted first); mc_dropout=N (implies
        uncertainty): N passes with the dropout layers in train mode (uncertainty.py names the fields).
        """
        from . import calibration
        from .uncertainty import SCORES, describe

        if errors not in ("raise", "skip"):
            raise ValueError(f"errors={errors!r}: expected 'raise' or 'skip'")
        check_batch_size(batch_size)
        uncertainty = uncertainty or mc_dropout > 0 or ood_score is not None
        if uncertainty:
            self._check_uncertainty(mc_dropout, ood_score, SCORES)
        items, extras = self._inputs(inputs)
        logits, failed = self._scores(items, batch_size, skip=errors == "skip")
        logits = calibration.scale(logits, self.temperature)
        results = self.task.predict(logits, top_k=top_k)
        if uncertainty:
            import numpy as np

            passes = None
            if mc_dropout:
                passes = calibration.scale(self._mc_scores(items, batch_size, errors == "skip", mc_dropout),
                                           self.temperature)
            fields = describe(np.asarray(logits), (self.calibration or {}).get("ood"), ood_score,
                              None if passes is None else np.asarray(passes), self.task.classes)
            results = [{**r, **f} for r, f in zip(results, fields)]
        results = iter(results)
        return [{**extra, "error": failed[i]} if i in failed else {**extra, **next(results)}
                for i, extra in enumerate(extras)]

    def _check_uncertainty(self, mc_dropout: int, ood_score: str | None, scores: tuple) -> None:
        if self.task.kind != "classification":
            raise UserError(f"--uncertainty: for single-label classification models, not {self.task.kind}")
        if mc_dropout < 0 or mc_dropout == 1:
            raise UserError(f"--mc-dropout {mc_dropout}: expected a number of passes >= 2")
        if mc_dropout:
            self._check_mc()
        if ood_score is not None and ood_score not in scores:
            raise UserError(f"--ood-score {ood_score}: expected one of {', '.join(scores)}")
        if ood_score is not None and not (self.calibration or {}).get("ood"):
            raise UserError("--ood-score: this model has no out-of-distribution threshold (it was fitted with "
                            "--no-calibration, or on too few validation samples)")
