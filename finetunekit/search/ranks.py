"""Several training processes (`accelerate launch ... -m finetunekit.cli search`): rank 0 samples each trial and
talks to the storage; the other ranks receive what it decided (the trial's parameters, whether to prune) by
accelerate's broadcast_object_list over the process group. One process: every call returns its argument."""

from __future__ import annotations

from typing import Any


def state():
    """accelerate's PartialState (it initialises the process group under `accelerate launch`)."""
    from accelerate import PartialState

    return PartialState()


def is_main() -> bool:
    return state().is_main_process


def share(value: Any) -> Any:
    """Rank 0's `value` on every rank (the argument of the other ranks is ignored)."""
    s = state()
    if s.num_processes <= 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value if s.is_main_process else None]
    broadcast_object_list(box, from_process=0)
    return box[0]
