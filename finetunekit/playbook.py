"""`--strategy auto` (the default): the fine-tuning playbook's choice of strategy, made from the data.

The guides' rule: extract features (a linear probe) when the data is small and close to the pretraining
data, fine-tune everything when it is large or far from it, and unfreeze in stages in between. Here
"small" is counted in training samples per class, and "far" in how much the images are upscaled to reach
the model's input size (a 32 px thumbnail blown up to 224 px is not an ImageNet photo). The thresholds
come from the measurements in docs/strategies.md (`bench/bench_defaults.py` reruns them):

    images upscaled 2x or more                  full          (cifar10, digits: full beats the probe by 14, 3 points)
    at most SMALL samples per class             linear-probe  (flowers, raccoon crops: ties full, 10x faster)
    at most MEDIUM samples per class            lp-ft         (the playbook's middle; no dataset here is in it)
    more                                        full
    text                                        full          (minilm's probe: 0.57 against 0.86 on SST-2)
    detection                                   full          (the detector's own trainable layers)

The choice and its reason are one log line; the resolved recipe records the strategy, so `--resume` and a
re-run train the same plan. Any explicit `--strategy` wins.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

EPOCHS = {"image": 10, "text": 3}  # the default --epochs (text: SST-2's best dev epoch comes early, docs/strategies.md)
SMALL = 200  # training samples per class at or below which a linear probe is chosen
MEDIUM = 1000  # ... at or below which lp-ft is chosen; above: full
FAR = 2.0  # images upscaled by this much or more are far from the pretraining data: full
SAMPLED = 64  # image headers read to estimate the native resolution


@dataclass(frozen=True)
class Choice:
    strategy: str
    reason: str

    def line(self) -> str:
        return f"strategy auto -> {self.strategy}: {self.reason}"


def default_epochs(modality: str) -> int:
    return EPOCHS[modality]


def per_class(kind: str, targets: list) -> float:
    """Training samples per class: the median class count (classification), the median positives per label
    (multi-label), half the samples (regression: as two classes would hold them)."""
    if not targets:
        return 0.0
    if kind == "multilabel":
        return float(statistics.median(sum(t[i] for t in targets) for i in range(len(targets[0]))))
    if kind == "regression":
        return len(targets) / 2
    return float(statistics.median(Counter(targets).values()))


def native_short_side(paths: list[Path]) -> float | None:
    """The median shorter side, in pixels, of up to SAMPLED training images spread over the list (headers
    only); None when none can be read."""
    from PIL import Image

    if not paths:
        return None
    step = max(1, len(paths) // SAMPLED)
    sides = []
    for p in paths[::step][:SAMPLED]:
        try:
            with Image.open(p) as im:
                sides.append(min(im.size))
        except OSError:
            continue
    return float(statistics.median(sides)) if sides else None


def choose(task: str, modality: str, kind: str, targets: list, image_paths: list[Path] | None = None,
           input_size: int | None = None) -> Choice:
    """The strategy for this data (see the module docstring for the rule and where it was measured)."""
    if task == "detection":
        return Choice("full", "detection trains the detector's heads and its top backbone stages "
                              "(--trainable-layers)")
    if modality == "text":
        return Choice("full", "text encoders gain most from fine-tuning every layer (docs/strategies.md: "
                              "a linear probe on minilm reached 0.57 against 0.86 on SST-2)")
    n = per_class(kind, targets)
    unit = "positives per label" if kind == "multilabel" else "samples per class"
    side = native_short_side(image_paths or [])
    if side and input_size and input_size / side >= FAR:
        return Choice("full", f"images are {side:.0f} px against the model's {input_size} px input "
                              f"({input_size / side:.1f}x upscaled): far from the pretraining photos, so every "
                              f"layer adapts")
    size = f" at {side:.0f} px" if side else ""
    if n <= SMALL:
        return Choice("linear-probe", f"{n:.0f} {unit}{size} (<= {SMALL}): few enough that the pretrained "
                                      f"features with a new head generalize best, on cached features")
    if n <= MEDIUM:
        return Choice("lp-ft", f"{n:.0f} {unit}{size} (<= {MEDIUM}): the head first on fixed features, "
                               f"then every layer")
    return Choice("full", f"{n:.0f} {unit}{size} (> {MEDIUM}): enough data to fine-tune every layer")
