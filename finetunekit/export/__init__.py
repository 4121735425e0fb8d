"""Exporters: one module per format, each `export(backbone, task, out, **options)`. EXPORTERS is the
registry; the run writes its best model with EXPORTERS["model-folder"], and `finetunekit export`
(export.bundle) writes ONNX or TorchScript through the parity gate (export.parity; docs/export.md)."""

from __future__ import annotations

from . import model_folder, onnx, torchscript

EXPORTERS = {"model-folder": model_folder.export, "onnx": onnx.export, "torchscript": torchscript.export}
