"""Uncertainty of single-label predictions and the out-of-distribution flag (`predict --uncertainty`;
docs/calibration.md). numpy only: the eager model and the torch-free runtime (ONNX) share it.

Per item, from the calibrated logits z / T:
    max_prob      the calibrated probability of the predicted class
    entropy       the predictive entropy -sum p log p (nats; 0 = certain, log C = uniform)
    ood_score     the in-distribution score: "energy" = logsumexp(z / T) (the negative free energy of Liu et al.
                  2020), or "msp" = max_prob (Hendrycks & Gimpel 2017); higher = more like the training data
    ood           ood_score < the threshold fitted at fit time: the score's 5th percentile over the validation
                  samples, so 95 % of in-distribution samples are kept (calibration.json's "ood")
With N Monte-Carlo dropout passes (probabilities p_1..p_N, dropout layers in train mode):
    mc_label, mc_probability     the class of the mean probability, and that mean
    mc_entropy                   the entropy of the mean probability
    mutual_information           mc_entropy - the mean entropy of the passes (what the passes disagree on)
    mc_variance                  the variance over passes of the predicted class's probability
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SCORES = ("energy", "msp")  # the first is the default
TPR = 0.95  # the fraction of validation samples the OOD threshold keeps as in-distribution


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(np.clip(p, 1e-300, None))).sum(-1)


def ood_score(z: np.ndarray, score: str) -> np.ndarray:
    """The in-distribution score of calibrated logits z [N, C]: higher = more in-distribution."""
    z = np.asarray(z, dtype=np.float64)
    if score == "msp":
        return softmax(z).max(-1)
    if score == "energy":
        m = z.max(-1)
        return m + np.log(np.exp(z - m[:, None]).sum(-1))
    raise ValueError(f"ood score {score!r}: expected one of {SCORES}")


def fit_ood(z: np.ndarray, tpr: float = TPR) -> dict:
    """calibration.json's "ood": for each score the threshold that keeps `tpr` of these (validation) samples,
    the first score the default."""
    thresholds = {s: float(np.quantile(ood_score(z, s), 1 - tpr)) for s in SCORES}
    return {"score": SCORES[0], "threshold": thresholds[SCORES[0]], "tpr": tpr, "thresholds": thresholds}


def describe(z: np.ndarray, ood: dict | None = None, score: str | None = None,
             passes: np.ndarray | None = None, classes: Sequence[str] = ()) -> list[dict]:
    """The uncertainty fields of each item: z [N, C] calibrated logits; `passes` [P, N, C] calibrated logits of P
    Monte-Carlo dropout passes; `ood` calibration.json's entry (no OOD fields without it)."""
    z = np.asarray(z, dtype=np.float64)
    p = softmax(z)
    fields: dict[str, np.ndarray | list] = {"max_prob": p.max(-1), "entropy": entropy(p)}
    if ood is not None:
        name = score or ood["score"]
        threshold = (ood.get("thresholds") or {}).get(name, ood["threshold"] if name == ood["score"] else None)
        s = ood_score(z, name)
        fields["ood_score"], fields["ood"] = s, [bool(v < threshold) for v in s]
    if passes is not None:
        each = softmax(np.asarray(passes, dtype=np.float64))  # [P, N, C]
        mean = each.mean(0)
        top = mean.argmax(-1)
        fields["mc_label"] = [classes[i] for i in top] if classes else top
        fields["mc_probability"] = mean.max(-1)
        fields["mc_entropy"] = entropy(mean)
        fields["mutual_information"] = np.clip(entropy(mean) - entropy(each).mean(0), 0, None)
        fields["mc_variance"] = each[:, np.arange(len(top)), top].var(0)
    return [{k: (v[i] if isinstance(v[i], (bool, str)) else float(v[i])) for k, v in fields.items()}
            for i in range(len(z))]
