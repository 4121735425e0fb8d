"""`finetunekit export RUN --merge` and `fit --merge`: a --peft run's adapters folded into the weights.

The adapter folder is loaded as `finetunekit.load` loads it (the base rebuilt, the adapter put on by peft),
peft's merge_and_unload folds LoRA, DoRA or IA3 into the target layers and puts the head's trained copy in
the head's place, and the result is written by the ordinary model-folder exporter: a folder plain timm,
torchvision or transformers loads, with no adapter left in it (its config records `merged_from`). Before
the folder counts as written, the merged model's logits are compared with the adapter model's on a few
inputs (random images at the model's size; short texts).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from ..errors import UserError

log = logging.getLogger("finetunekit")

MERGED_DIR = "merged"
SAMPLE_TEXTS = ["a short sample text", "another, somewhat longer sentence to compare the two models on",
                "fine"]
MAX_DIFFERENCE = 1e-3  # |logits| the merged model may differ by (fp32 reassociation: ~1e-6 measured)
_DROP = ("version", "task", "source", "model", "head", "peft", "preprocessing")  # rewritten by the exporter


def default_out(run: Path) -> Path:
    """RUN/merged for a run directory; beside the folder for a model folder."""
    from ..rundir import find_model_folder

    return find_model_folder(Path(run)).parent / MERGED_DIR


def _logits(model) -> torch.Tensor:
    from ..inference import TextModel

    if isinstance(model, TextModel):
        texts = [tuple([t] * len(model.text_columns)) for t in SAMPLE_TEXTS]
        return model.logits(texts)
    size = model.backbone.preprocessing.input_size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    model.module.eval()
    with torch.inference_mode():
        return model.module(x).float()


def merge_run(run: str | Path, out: str | Path | None = None, overwrite: bool = False) -> dict:
    """Write the merged model folder of run (or adapter folder) `run` to `out` (default RUN/merged); returns
    what metrics.json and the CLI report: the folder, the method, the largest logit difference."""
    from ..artifacts import load, save_model_folder
    from ..models.adapter_folder import merge
    from ..models.folder import read_config

    out = Path(out) if out is not None else default_out(Path(run))
    if out.exists() and not overwrite:
        raise UserError(f"--out {out}: exists; pass --overwrite to replace it")
    model = load(run)
    adapted = model.backbone.peft
    if adapted is None:
        raise UserError(f"{run}: not the adapter of a `fit --peft` run (its config.json has no finetunekit.peft); "
                        f"there is nothing to merge")
    ours = read_config(model.folder).get("finetunekit", {})
    before = _logits(model)
    model.backbone = merge(model.backbone)
    after = _logits(model)
    difference = float((before - after).abs().max()) if before.numel() else 0.0
    if not difference <= MAX_DIFFERENCE:
        raise UserError(f"--merge: the merged model's logits differ from the adapter's by {difference:.3g} (more "
                        f"than {MAX_DIFFERENCE:g}); the merged folder was not written")
    extra = {k: v for k, v in ours.items() if k not in _DROP}
    extra["merged_from"] = {"method": adapted.method, **adapted.options, "base": adapted.base}
    if out.exists():
        shutil.rmtree(out)
    save_model_folder(out, model.backbone, model.classes, adapted.base["model"], ours["task"], extra)
    if model.calibration is not None:  # the same function as the adapter model: its temperature holds
        from ..calibration import write

        write(out, model.calibration)
    log.info("--merge: %s folded into the weights: %s (largest logit difference %.2g)", adapted.method, out,
             difference)
    return {"folder": str(out), "method": adapted.method, "max_logit_difference": difference}
