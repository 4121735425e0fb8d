"""Fault injection for the crash tests: FINETUNEKIT_FAULT=<point>[@<n>] kills the process (SIGKILL, as
`kill -9` would) the n-th time (default: the first) execution reaches that named point. Points: `batch`
(after a training batch's backward pass, before the optimizer update), `update` (after an optimizer
update), `after-eval` (after an epoch's validation, before its checkpoint), `checkpoint-write` (inside
a checkpoint write, before its manifest). Unset, `point` costs one dictionary lookup."""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def _target() -> tuple[str, int] | None:
    spec = os.environ.get("FINETUNEKIT_FAULT")
    if not spec:
        return None
    name, _, n = spec.partition("@")
    return name, int(n or 1)


_TARGET = _target()


def point(name: str) -> None:
    if _TARGET is None or _TARGET[0] != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == _TARGET[1]:
        os.kill(os.getpid(), signal.SIGKILL)
