"""Several search workers on one study in a real PostgreSQL server (started by the test, as an unprivileged user
in a temporary data folder): a worker killed with kill -9 mid-trial leaves its trial failed, and the other
worker runs the queued retry to completion. Marker `postgres` (excluded from the default suite)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.postgres

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _binary(name: str) -> str | None:
    return shutil.which(name) or (str(PG_BIN / name) if (PG_BIN / name).is_file() else None)


@pytest.fixture(scope="module")
def postgres_url():
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    if not (initdb and pg_ctl and _binary("postgres")):
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl, postgres) not found")
    pytest.importorskip("psycopg2", reason="psycopg2 (the search extra) is not installed")
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="ftk-pg-"))
    if os.geteuid() == 0:  # postgres refuses to run as root: an unprivileged user owns the data folder
        runuser = shutil.which("runuser")
        user = next((u for u in ("postgres", "nobody") if _user_exists(u)), None)
        if runuser is None or user is None:
            pytest.skip("running as root without runuser or an unprivileged user for postgres")
        as_user = [runuser, "-u", user, "--"]
        shutil.chown(folder, user)
        folder.chmod(0o700)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = folder / "data"
    subprocess.run([*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "ftk", "--no-sync"], check=True,
                   capture_output=True, cwd=folder)
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-l", str(folder / "server.log"), "-w", "-t", "60", "-o",
                    f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off", "start"], check=True,
                   capture_output=True, cwd=folder)
    try:
        yield f"postgresql://ftk@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True, cwd=folder)
        shutil.rmtree(folder, ignore_errors=True)


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def _worker(url: str, out: Path, data: Path, space: Path, log: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "finetunekit.cli", "search", "--data", str(data), "--model", "timm:test_efficientnet",
            "--no-pretrained", "--image-size", "32", "--augment", "none", "--num-workers", "0", "--batch-size", "16",
            "--strategy", "full", "--epochs", "4", "--quiet", "--space", str(space), "--trials", "4", "--pruner", "none",
            "--storage", url, "--study-name", "shared", "--heartbeat", "1", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=out.parent)


def test_a_worker_killed_mid_trial_is_failed_and_its_trial_retried_by_the_other(postgres_url, cifar_subset, tmp_path):
    import optuna
    from optuna.trial import TrialState

    from finetunekit.search.storage import WORKER, database_url

    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {low: 1.0e-3, high: 1.0e-1, log: true}\n")
    a = _worker(postgres_url, tmp_path / "a", cifar_subset["train"], space, tmp_path / "a.log")
    time.sleep(2)  # b joins the study a created
    b = _worker(postgres_url, tmp_path / "b", cifar_subset["train"], space, tmp_path / "b.log")
    victim = None
    try:
        deadline = time.time() + 300
        while victim is None and time.time() < deadline and a.poll() is None:
            time.sleep(0.3)
            try:
                study = optuna.load_study(study_name="shared", storage=database_url(postgres_url))
            except KeyError:  # not created yet
                continue
            for t in study.get_trials(states=(TrialState.RUNNING,)):
                if t.user_attrs.get(WORKER, {}).get("pid") == a.pid and t.intermediate_values:
                    victim = t.number  # a has reported an epoch of this trial: it is mid-trial
        assert victim is not None, (tmp_path / "a.log").read_text()[-3000:]
        os.kill(a.pid, signal.SIGKILL)
        a.wait()
        assert b.wait(timeout=600) == 0, (tmp_path / "b.log").read_text()[-3000:]
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
    study = optuna.load_study(study_name="shared", storage=database_url(postgres_url))
    trials = study.get_trials()
    by_number = {t.number: t for t in trials}
    assert by_number[victim].state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim]
    assert len(retries) == 1
    retry = retries[0]
    assert retry.state == TrialState.COMPLETE and retry.params == by_number[victim].params
    assert retry.user_attrs[WORKER]["pid"] == b.pid and retry.number > victim
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert sum(t.state == TrialState.COMPLETE for t in trials) >= 4
    log = (tmp_path / "b.log").read_text()
    assert f"search: trial {retry.number} (a retry of trial {victim})" in log
    assert (tmp_path / "b" / "best.yaml").is_file()
