"""Where a study lives, and what happens to the trial of a worker that dies.

- default: a journal file in the study folder (optuna's JournalStorage over a JournalFileBackend): one machine,
  or several sharing a file system with working file locks; no server.
- `sqlite:///path`: one machine. `postgresql://user@host:port/db`: several machines.

Heartbeats (optuna 5.1, read from its source): only `RDBStorage` (the sqlite and postgresql URLs) inherits
`BaseHeartbeat`; `JournalStorage` does not, so `optuna.storages.fail_stale_trials` does nothing for it. On an
RDB storage every running trial records a heartbeat each `--heartbeat` seconds; a trial whose heartbeat is older
than twice that is failed by the next worker that starts a trial, and RetryHeartbeatStaleTrialCallback queues a
copy of it (the same parameters) that the next free worker runs. For the journal file, which has no heartbeat,
each trial records its worker's host and pid, and a worker starting a trial fails (and re-queues) the running
trials of dead processes on its own host (`reap_dead`): a worker killed with kill -9 is recovered the same way on
one machine; across machines use postgresql.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from pathlib import Path

from ..errors import UserError

log = logging.getLogger("finetunekit")

JOURNAL = "study.journal"
WORKER = "finetunekit_worker"  # the trial's user attribute: {"host": ..., "pid": ...}
MAX_RETRY = 3  # a trial whose workers keep dying is re-queued at most this many times


def check_url(url: str | None) -> None:
    """A one-line error for a --storage that is neither a journal file path nor a database URL we support."""
    if url is None or "://" not in url:
        return
    scheme = url.split("://", 1)[0]
    if scheme not in ("sqlite", "postgresql", "postgresql+psycopg2", "mysql", "mysql+pymysql"):
        raise UserError(f"--storage {url}: expected a journal file path, sqlite:///path or postgresql://..., "
                        f"got the scheme {scheme}://")


def open_storage(url: str | None, folder: Path, heartbeat: int):
    """The optuna storage for `--storage url` (None: the journal file in the study folder)."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if url is None or "://" not in url:
        path = Path(url) if url else folder / JOURNAL
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    with warnings.catch_warnings():  # heartbeat_interval is "experimental" since optuna 2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return RDBStorage(database_url(url), heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
                              engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None)
        except Exception as e:  # noqa: BLE001 - a wrong URL, a server that is down: one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"--storage {_hide_password(url)}: cannot open it ({first[:200]})") from None


def database_url(url: str) -> str:
    """SQLAlchemy 2.1 reads a plain postgresql:// URL with psycopg 3; where only psycopg2 (our `search` extra) is
    installed, the URL names it (postgresql+psycopg2://)."""
    if not url.startswith("postgresql://"):
        return url
    import importlib.util

    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url.split("://", 1)[1]
    return url


def _hide_password(url: str) -> str:
    scheme, rest = url.split("://", 1)
    if "@" in rest and ":" in rest.split("@", 1)[0]:
        user = rest.split("@", 1)[0].split(":", 1)[0]
        return f"{scheme}://{user}:***@{rest.split('@', 1)[1]}"
    return url


def has_heartbeat(storage) -> bool:
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(storage)


def mark_worker(trial) -> None:
    trial.set_user_attr(WORKER, {"host": socket.gethostname(), "pid": os.getpid()})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def reap_dead(study) -> list[int]:
    """Storages without heartbeats (the journal file): fail the running trials whose worker process on this host
    is gone, and queue each one again as RetryHeartbeatStaleTrialCallback does. Returns the failed trials' numbers."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    if has_heartbeat(study._storage):
        return []  # optuna's own fail_stale_trials does it
    host, reaped = socket.gethostname(), []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get(WORKER)
        if not worker or worker.get("host") != host or _alive(int(worker["pid"])):
            continue
        try:
            if not study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:  # another worker got there first
            continue
        log.warning("search: trial %d's worker (pid %s) is gone; trial failed and queued again", t.number,
                    worker["pid"])
        retry(study, study._storage.get_trial(t._trial_id))
        reaped.append(t.number)
    return reaped
