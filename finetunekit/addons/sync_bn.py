"""`--sync-bn`: BatchNorm layers become SyncBatchNorm before the model is wrapped for several processes, so
their batch statistics cover the global batch instead of each process's share (torch's
`convert_sync_batchnorm`; GPUs only: preflight refuses it on the CPU). The new layers keep the old ones'
Parameter objects, so the optimizer built before this hook still holds them."""

from __future__ import annotations

import logging

import torch

from .base import AddOn

log = logging.getLogger("finetunekit")


class SyncBN(AddOn):
    name = "sync-bn"

    def __init__(self, processes: int):
        self.processes = processes

    def wrap_model(self, module: torch.nn.Module) -> torch.nn.Module:
        norms = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())
        if self.processes < 2 or not norms:
            log.info("--sync-bn: changes nothing (%s)", "one process" if self.processes < 2 else "no BatchNorm layers")
            return module
        log.info("--sync-bn: %d BatchNorm layers -> SyncBatchNorm over %d processes", norms, self.processes)
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
