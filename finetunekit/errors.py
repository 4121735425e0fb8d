"""The errors users see, each as a single line: a bad input (exit code 2), a run stopped mid-way."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input from the user (option, file, data). The CLI prints it as one line and exits 2."""

    exit_code = 2


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest choice, or '' when nothing is close."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def first_line(e: BaseException, limit: int = 200) -> str:
    """'Type: the first line of its message' (cut to `limit` characters), or 'Type' when it has none: a
    library's error inside one of ours, still on one line."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:limit]}" if text else type(e).__name__


class TrainingStopped(UserError):
    """A run that stopped on purpose mid-way: non-finite values (exit 1), or a signal after its checkpoint
    was written (exit 128 + the signal number, as shells report a signal)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
