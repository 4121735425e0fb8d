"""What the console shows of the libraries underneath: without --verbose, their warnings (Python warnings from
torch, timm, transformers, accelerate; the WARNING lines of their loggers) go to finetunekit's log at DEBUG, which
log.txt keeps and the console shows only with --verbose. Their errors always show.

The CLI calls `configure` once it knows the flag (`fit`: the recipe's `verbose`); the Python API leaves the
libraries as they are. finetunekit's own detail lines are `log.debug` (runlog.RunLog shows them with verbose).
"""

from __future__ import annotations

import logging
import os
import warnings

log = logging.getLogger("finetunekit")

# the loggers of the libraries a run loads (transformers' own handler is quieted by TRANSFORMERS_VERBOSITY)
LIBRARIES = ("accelerate", "timm", "torch", "torchvision", "transformers", "huggingface_hub", "peft", "mlflow",
             "wandb", "PIL", "urllib3")
_original_showwarning = warnings.showwarning


def _to_debug(message, category, filename, lineno, file=None, line=None) -> None:
    log.debug("%s (%s:%s): %s", category.__name__, os.path.basename(str(filename)), lineno,
              str(message).strip().splitlines()[0] if str(message).strip() else "")


class _Forward(logging.Handler):
    """A library's log record into finetunekit's log: at DEBUG below ERROR, as it was from ERROR up."""

    def emit(self, record: logging.LogRecord) -> None:
        level = record.levelno if record.levelno >= logging.ERROR else logging.DEBUG
        if log.isEnabledFor(level):
            log.log(level, "%s: %s", record.name, record.getMessage())


_forward = _Forward()
_set_transformers: str | bool = False  # whether configure set TRANSFORMERS_VERBOSITY (and may take it back)


def configure(verbose: bool) -> None:
    """Quiet (verbose=False) or restore (True) the libraries' warnings on the console. Idempotent."""
    global _set_transformers
    if verbose:
        warnings.showwarning = _original_showwarning
        if _set_transformers:
            os.environ.pop("TRANSFORMERS_VERBOSITY", None)
            _set_transformers = False
    else:
        warnings.showwarning = _to_debug
        if "TRANSFORMERS_VERBOSITY" not in os.environ:  # read when transformers configures its logger
            os.environ["TRANSFORMERS_VERBOSITY"] = _set_transformers = "error"
    for name in LIBRARIES:
        library = logging.getLogger(name)
        if verbose:
            library.removeHandler(_forward)
            library.propagate = True
        elif _forward not in library.handlers:
            library.addHandler(_forward)
            library.propagate = False
