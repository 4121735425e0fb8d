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

    def _inputs(self, inputs: Any) -> tuple[list[Any], list[dict]]:
        raise NotImplementedError

    def _scores(self, items: list[Any], batch_size: int, skip: bool) -> tuple[Any, dict[int, str]]:
        raise NotImplementedError

    def predict(self, inputs: Any, batch_size: int = 64, top_k: int = 1, errors: str = "raise") -> list[dict]:
        """One dict per input, in input order: the task's prediction (label/score/top_k, labels/scores, or value).

        errors="raise": an unreadable image is a UserError naming it; "skip": its dict is {"path", "error"}.
        """
        if errors not in ("raise", "skip"):
            raise ValueError(f"errors={errors!r}: expected 'raise' or 'skip'")
        check_batch_size(batch_size)
        items, extras = self._inputs(inputs)
        logits, failed = self._scores(items, batch_size, skip=errors == "skip")
        results = iter(self.task.predict(logits, top_k=top_k))
        return [{**extra, "error": failed[i]} if i in failed else {**extra, **next(results)}
                for i, extra in enumerate(extras)]
