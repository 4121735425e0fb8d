"""What an explanation explains: the output (class) it attributes, and how the model scores it.

    classification  the predicted class (highest logit), or --target by name; its softmax probability
    multi-label     the top class (highest logit), or --target by name; its sigmoid probability
    regression      the one output; its value (no --target)
    detection       refused (one line)
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError, did_you_mean


@dataclass(frozen=True)
class Target:
    index: int  # the output attributed
    label: str  # its class name ("value" for regression)
    score: float  # softmax / sigmoid probability, or the regression value
    predicted: str  # the model's own prediction (the top class, or the value)
    predicted_score: float  # its probability (regression: the value)

    def describe(self) -> str:
        """'predicted cat (0.932), explained dog (0.041)'; regression: 'predicted 3.21, explained the output'."""
        if self.label == "value":
            return f"predicted {self.predicted}, explained the output"
        return f"predicted {self.predicted} ({self.predicted_score:.3f}), explained {self.label} ({self.score:.3f})"


def check_task(model) -> None:
    """A UserError for tasks without per-output attributions (detection)."""
    kind = model.task.kind
    if kind in ("detection", "seq2seq"):
        what = "an object detector" if kind == "detection" else "a seq2seq (text generation) model"
        raise UserError(f"explain: {model.folder} is {what}; explain takes classification, multi-label and "
                        f"regression models")


def check_target(model, target: str | None) -> None:
    """A UserError now (before any explanation is computed) for a --target the model does not have."""
    if target is None:
        return
    if model.task.kind == "regression":
        raise UserError(f"--target {target}: a regression model has one output; leave --target out")
    if target not in model.classes:
        shown = ", ".join(model.classes[:10]) + (", ..." if len(model.classes) > 10 else "")
        raise UserError(f"--target {target}: not a class of this model (expected one of {shown})"
                        f"{did_you_mean(target, model.classes)}")


def resolve(model, logits, target: str | None) -> Target:
    """The output to attribute, from one sample's logits [num_outputs] (a torch tensor)."""
    check_task(model)
    check_target(model, target)
    kind = model.task.kind
    if kind == "regression":
        value = float(logits[0])
        return Target(0, "value", value, f"{value:.4g}", value)
    top = int(logits.argmax())
    index = top if target is None else model.classes.index(target)
    probs = logits.float().softmax(-1) if kind == "classification" else logits.float().sigmoid()
    return Target(index, model.classes[index], float(probs[index]), model.classes[top], float(probs[top]))
