"""A run's log: lines to stderr and to <run>/log.txt, for the duration of a run."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

log = logging.getLogger("finetunekit")


class RunLog:
    """Log lines to stderr and, once `attach` names it, to <run>/log.txt for the duration of a run. Lines
    logged before `attach` (a run checks its data and model before it claims its folder) are kept and
    written to the file first."""

    def __init__(self, path: Path | None, quiet: bool, main: bool = True, verbose: bool = False):
        self.main = main  # one of several processes but the first: errors only (the first logs each line once)
        self.handlers: list[logging.Handler] = []
        if not any(getattr(h, "_finetunekit", False) for h in log.handlers):
            console = logging.StreamHandler(sys.stderr)
            console.setFormatter(logging.Formatter("%(message)s"))
            # detail lines (log.debug: cache keys, memory layout, the libraries' warnings) only with --verbose;
            # log.txt holds them either way
            console.setLevel(logging.DEBUG if verbose else logging.INFO)
            self.handlers.append(console)
        self.early = Buffer()
        self.handlers.append(self.early)
        self.warned = Buffer(logging.WARNING)  # the run's warning lines, for metrics.json (`warnings`)
        self.handlers.append(self.warned)
        if path is not None:
            self.attach(path)

    def attach(self, path: Path) -> None:
        file = logging.FileHandler(path, encoding="utf-8")
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        for record in self.early.records:
            file.handle(record)
        entered = self.early in log.handlers  # (inside another RunLog, a search's, the buffer is all it added)
        if entered:
            log.removeHandler(self.early)
        self.handlers.remove(self.early)
        file._finetunekit = True  # type: ignore[attr-defined]
        if entered:  # the file takes over from the buffer now
            log.addHandler(file)
        self.handlers.append(file)

    def __enter__(self):
        for h in self.handlers:
            h._finetunekit = True  # type: ignore[attr-defined]
            log.addHandler(h)
        log.setLevel(logging.DEBUG if self.main else logging.ERROR)
        log.propagate = False
        return self

    @property
    def warnings(self) -> list[str]:
        """The warning lines logged so far (without their `warning: `), in order; errors are not among them."""
        return [r.getMessage().removeprefix("warning: ") for r in self.warned.records if r.levelno == logging.WARNING]

    def __exit__(self, *exc):
        for h in self.handlers:
            log.removeHandler(h)
            h.close()


class Buffer(logging.Handler):
    def __init__(self, level: int = logging.NOTSET):
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
