"""Several training processes (`accelerate launch ... -m finetunekit.cli search`): rank 0 samples each trial and
talks to the storage; the other ranks receive what it decided (the trial's parameters, whether to prune) by
accelerate's broadcast_object_list over the process group. One process: every call returns its argument and no
process group is set up."""

from __future__ import annotations

import os
from typing import Any

_cpu = False


def configure(cpu: bool) -> None:
    """The run's --cpu, before the first call: the process group's backend follows it (gloo on the CPU)."""
    global _cpu
    _cpu = cpu


def _processes() -> int:
    return max(int(os.environ.get(k, "1") or 1) for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))


def state():
    """accelerate's PartialState (it initialises the process group under `accelerate launch`); the run's
    Accelerator later shares it."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=_cpu or parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())


def is_main() -> bool:
    return _processes() <= 1 or state().is_main_process


def share(value: Any) -> Any:
    """Rank 0's `value` on every rank (the argument of the other ranks is ignored)."""
    if _processes() <= 1:
        return value
    s = state()
    if s.num_processes <= 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value if s.is_main_process else None]
    broadcast_object_list(box, from_process=0)
    return box[0]
