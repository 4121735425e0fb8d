"""Exporters: one module per format, each `export(backbone, task, out, **options)`. EXPORTERS is the
registry; the run writes its best model with EXPORTERS["model-folder"]."""

from __future__ import annotations

from . import model_folder

EXPORTERS = {"model-folder": model_folder.export}
