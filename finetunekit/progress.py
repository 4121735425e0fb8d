"""Progress of a pass over batches (a training epoch, an evaluation pass), for whoever watches.

On a terminal (stderr a TTY, or a notebook): a tqdm bar, its figures refreshed every `log_every` batches. When
nobody watches a terminal (stderr piped to a file, a scheduler's log) or with --quiet: no bar, whose every refresh
would land in the file, but one log line every FINETUNEKIT_PROGRESS_SECONDS (120) on a long pass:

    epoch 2/10: batch 340/1000, loss 0.4100, accuracy 0.8812, 212 samples/s

The per-epoch line (loop.py) comes either way.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator

log = logging.getLogger("finetunekit")

DEFAULT_SECONDS = 120.0


def interactive() -> bool:
    """Whether a person watches the output: stderr is a terminal, or this runs in a notebook."""
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed
        tty = False
    return tty or "ipykernel" in sys.modules


def interval() -> float:
    """Seconds between progress lines when no terminal watches (FINETUNEKIT_PROGRESS_SECONDS, default 120)."""
    try:
        return max(0.0, float(os.environ.get("FINETUNEKIT_PROGRESS_SECONDS", DEFAULT_SECONDS)))
    except ValueError:
        return DEFAULT_SECONDS


class Progress:
    """Iterate `iterable` as `for batch in Progress(...)`; every batch, `due(n)` says whether to pass figures
    to `show` (which may need a device sync to compute: ask first)."""

    def __init__(self, iterable: Iterable, desc: str, total: int | None = None, initial: int = 0,
                 quiet: bool = False, disable: bool = False, every: int = 25):
        """quiet (--quiet): the lines, never a bar; disable: neither (a process other than the first)."""
        self.iterable, self.desc, self.total, self.every = iterable, desc, total, every
        self.count = initial
        self.bar = None
        self.lines = False
        if not disable and not quiet and interactive():
            from tqdm.auto import tqdm

            self.bar = tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, initial=initial, total=total)
        elif not disable:
            self.lines, self.seconds = True, interval()
            self.last = time.perf_counter()

    def __iter__(self) -> Iterator:
        for item in (self.bar if self.bar is not None else self.iterable):
            yield item
            self.count += 1

    def due(self, batch: int) -> bool:
        """Whether the figures are wanted after `batch` (1-based) batches: every `every` batches on a terminal,
        once `interval()` seconds have passed since the last line otherwise."""
        if self.bar is not None:
            return batch % self.every == 0
        return self.lines and time.perf_counter() - self.last >= self.seconds

    def show(self, figures: dict[str, str] | None = None, batch: int | None = None) -> None:
        figures = figures or {}
        if self.bar is not None:
            self.bar.set_postfix(figures)
        elif self.lines:
            n = self.count + 1 if batch is None else batch
            of = f"/{self.total}" if self.total else ""
            said = "".join(f", {v} {k}" if k.endswith("/s") else f", {k} {v}" for k, v in figures.items())
            log.info("%s: batch %d%s%s", self.desc, n, of, said)
            self.last = time.perf_counter()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
