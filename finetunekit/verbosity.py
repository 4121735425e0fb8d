"""What the console shows of the libraries underneath: without --verbose, their warnings (Python warnings from
torch, timm, transformers, accelerate; the WARNING lines of their loggers) go to finetunekit's log at DEBUG, which
log.txt keeps and the console shows only with --verbose. Their errors always show.

The CLI calls `configure` once it knows the flag (`fit`: the recipe's `verbose`); the Python API leaves the
libraries as they are. finetunekit's own detail lines are `log.debug` (runlog.RunLog shows them with verbose).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

log = logging.getLogger("finetunekit")

# the loggers of the libraries a run loads (transformers' and MLflow's own handlers: QUIET_ENV)
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
# read when each library sets up its logging (on import): transformers' own handler, MLflow's own handler
QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "MLFLOW_CONFIGURE_LOGGING": "false"}
_set_env: set[str] = set()  # the ones configure set (and may take back)


def configure(verbose: bool) -> None:
    """Quiet (verbose=False) or restore (True) the libraries' warnings on the console. Idempotent."""
    if verbose:
        warnings.showwarning = _original_showwarning
        for name in _set_env:
            os.environ.pop(name, None)
        _set_env.clear()
    else:
        warnings.showwarning = _to_debug
        for name, value in QUIET_ENV.items():
            if name not in os.environ:
                os.environ[name] = value
                _set_env.add(name)
    for name in LIBRARIES:
        library = logging.getLogger(name)
        if verbose:
            library.removeHandler(_forward)
            library.propagate = True
        elif _forward not in library.handlers:
            library.addHandler(_forward)
            library.propagate = False


@contextlib.contextmanager
def libraries(verbose: bool):
    """`configure(verbose)` for the duration of a command, and everything as it was after (the CLI run in-process,
    as tests and notebooks do, leaves no trace)."""
    showwarning = warnings.showwarning
    env = {name: os.environ.get(name) for name in QUIET_ENV}
    loggers = {name: (list(logging.getLogger(name).handlers), logging.getLogger(name).propagate) for name in LIBRARIES}
    configure(verbose)
    try:
        yield
    finally:
        warnings.showwarning = showwarning
        for name, value in env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _set_env.clear()
        for name, (handlers, propagate) in loggers.items():
            logging.getLogger(name).handlers[:] = handlers
            logging.getLogger(name).propagate = propagate
