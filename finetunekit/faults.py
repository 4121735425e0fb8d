"""Fault injection for the crash tests: FINETUNEKIT_FAULT=<point>[@<n>][:oom|:enospc] kills the process
(SIGKILL, as `kill -9` would) the n-th time (default: the first) execution reaches that named point; with
`:oom` it raises torch.OutOfMemoryError there instead, as a GPU that ran out of memory would, and with
`:enospc` the OSError of a full disk. Points: `batch`
(after a training batch's backward pass, before the optimizer update), `update` (after an optimizer
update), `after-eval` (after an epoch's validation, before its checkpoint), `checkpoint-write` (inside
a checkpoint write, before its manifest). With several processes, FINETUNEKIT_FAULT_RANK=<rank> limits it to
that process (tests/test_distributed.py kills one of two). Unset, `point` costs one dictionary lookup."""

from __future__ import annotations

import errno
import os
import signal

_counts: dict[str, int] = {}


def _target() -> tuple[str, int, str] | None:
    spec = os.environ.get("FINETUNEKIT_FAULT")
    if not spec:
        return None
    only = os.environ.get("FINETUNEKIT_FAULT_RANK")  # several processes: the fault strikes this rank alone
    if only is not None and os.environ.get("RANK", "0") != only:
        return None
    spec, _, action = spec.partition(":")
    name, _, n = spec.partition("@")
    return name, int(n or 1), action or "kill"


_TARGET = _target()


def point(name: str) -> None:
    if _TARGET is None or _TARGET[0] != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == _TARGET[1]:
        if _TARGET[2] == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + " (injected)")
        if _TARGET[2] == "oom":
            import torch

            raise torch.OutOfMemoryError(f"out of memory (injected by FINETUNEKIT_FAULT at {name} {_counts[name]})")
        os.kill(os.getpid(), signal.SIGKILL)
