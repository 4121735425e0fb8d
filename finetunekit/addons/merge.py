"""`fit --merge`: after a --peft run, its adapters folded into the weights as an ordinary model folder beside
the adapter one (RUN/merged; export/merge.py, the code `finetunekit export RUN --merge` runs)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .base import AddOn


class Merge(AddOn):
    name = "merge"

    def finish(self, best: Callable[[], torch.nn.Module], folder: Path | None,
               score: Callable[[torch.nn.Module], dict]) -> dict[str, Any]:
        if folder is None:  # not the main process
            return {}
        from ..export.merge import MERGED_DIR, merge_run

        return {"merged": merge_run(folder, folder.parent / MERGED_DIR, overwrite=True)}
