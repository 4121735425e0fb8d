"""`finetunekit search`: the space file checked before any work, trials as ordinary runs in the study folder, a
pruned trial closed cleanly, the best recipe loadable by fit, linear probes reading cached features, a dead
worker's trial failed and queued again, rank 0's decisions broadcast to the other ranks."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT, cli

TINY = ("--model", "timm:test_efficientnet", "--no-pretrained", "--image-size", "32", "--augment", "none",
        "--num-workers", "0", "--batch-size", "32", "--quiet")


@pytest.fixture(scope="module")
def tiny_train(cifar_subset, tmp_path_factory) -> Path:
    """200 real CIFAR-10 images (20 a class), as a manifest."""
    rows = list(csv.reader(cifar_subset["train"].open()))
    keep = [rows[0]] + [r for i, r in enumerate(rows[1:]) if i % 40 < 20]
    path = tmp_path_factory.mktemp("search") / "train.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(keep)
    return path


@pytest.mark.parametrize("space, error", [
    ("train.lrr: {low: 0.1, high: 0.2}", "train.lrr: not a recipe option (did you mean 'train.lr'?)"),
    ("train.lr: {low: 1.0e-4, high: 20}", "train.lr: expected a value <= 10, got 20"),
    ("train.strategy: [full, lp-fts]", "train.strategy: expected 'auto', 'full', 'linear-probe', 'freeze-unfreeze', "
                                       "'gradual', 'lp-ft', 'bitfit' or 'norm-head', got 'lp-fts' (did you mean 'lp-ft'?)"),
    ("train.lr: {low: 0, high: 0.1, log: true}", "train.lr: a log range needs low > 0, got 0"),
    ("train.epochs: {low: 1, high: 5, step: 0.5}", "train.epochs: an int range needs an int step, got 0.5"),
    ("train.weight_decay: 0.1", "train.weight_decay: expected a list of choices or a range {low: X, high: Y}, got 0.1"),
    ("out: [a, b]", "out: not searchable (the study sets it for each trial)"),
    ("train:\n  lr: {low: 0.1, hihg: 0.2}", "train.lr: unknown range field 'hihg' (expected low, high, log, step) "
                                           "(did you mean 'high'?)"),
])
def test_a_bad_space_is_one_line_naming_the_file_and_key_before_any_work(tiny_train, tmp_path, space, error):
    path = tmp_path / "space.yaml"
    path.write_text(space + "\n")
    code, out, err = cli("search", "--data", str(tiny_train), "--space", str(path), "--out", str(tmp_path / "study"))
    assert (code, out, err) == (2, "", f"finetunekit: error: {path}: {error}\n")
    assert not (tmp_path / "study").exists()  # nothing was created


def test_the_search_options_are_checked_before_any_work(tiny_train, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: [0.01, 0.1]\n")
    base = ("search", "--data", str(tiny_train), "--space", str(space), "--out", str(tmp_path / "study"))
    for extra, error in [(("--pruner", "medain"), "--pruner medain: expected one of median, halving, hyperband, none (did you "
                                                  "mean 'median'?)"),
                         (("--trials", "0"), "--trials: expected a value >= 1, got 0"),
                         (("--timeout", "ten"), "--timeout ten: expected a time > 0: seconds, or 30m, 2h"),
                         (("--storage", "redis://x"), "--storage redis://x: expected a journal file path, "
                                                      "sqlite:///path or postgresql://..., got the scheme redis://"),
                         (("--overwrite",), "--overwrite: a study folder is never replaced; run the same command to "
                                            "continue the study in --out, or choose another --out")]:
        assert cli(*base, *extra) == (2, "", f"finetunekit: error: {error}\n")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    code, _, err = cli(*base[:-1], str(tmp_path / "mine"))
    assert code == 2 and err == (f"finetunekit: error: --out {tmp_path / 'mine'}: holds files that finetunekit did "
                                 f"not write; choose another --out\n")
    assert not (tmp_path / "study").exists()


def test_each_pruner_is_optunas_with_the_runs_epochs():
    import optuna

    from finetunekit.search.check import PRUNERS
    from finetunekit.search.study import _pruner

    made = {name: _pruner(name, trials=16, epochs=6) for name in PRUNERS}
    assert {n: type(p).__name__ for n, p in made.items()} == {
        "median": "MedianPruner", "halving": "SuccessiveHalvingPruner", "hyperband": "HyperbandPruner",
        "none": "NopPruner"}
    assert made["median"]._n_startup_trials == 4
    assert (made["hyperband"]._min_resource, made["hyperband"]._max_resource,
            made["hyperband"]._reduction_factor) == (1, 6, 3)
    assert isinstance(made["hyperband"], optuna.pruners.BasePruner)


def test_a_journal_study_prunes_a_trial_and_writes_the_best_recipe(tiny_train, tmp_path):
    """Two trials of a linear probe on the real images: the second (lr 1e-6) is pruned after its first epoch by
    the median of the first (lr 0.05); both runs are whole runs; the probe's features are computed once."""
    import finetunekit
    from finetunekit.config import Recipe
    from finetunekit.rundir import is_run

    space = tmp_path / "space.yaml"
    space.write_text("train.lr: [1.0e-6, 0.05]\n")
    study = tmp_path / "study"
    args = ("search", "--data", str(tiny_train), *TINY, "--epochs", "3", "--metric", "loss", "--space", str(space),
            "--trials", "2", "--out", str(study))
    code, out, err = cli(*args)
    assert code == 0, err
    rows = list(csv.DictReader((study / "results.csv").open()))
    assert [(r["rank"], r["trial"], r["state"], r["train.lr"], r["epochs"]) for r in rows] == [
        ("1", "0", "complete", "0.05", "3"), ("", "1", "pruned", "1e-06", "1")]
    pruned = study / "trials" / "0001"
    history = list(csv.DictReader((pruned / "history.csv").open()))
    metrics = json.loads((pruned / "metrics.json").read_text())
    # the pruned run is a finished run: its one epoch's model saved, marked as pruned, loadable
    assert is_run(pruned) and (pruned / "model" / "model.safetensors").is_file() and len(history) == 1
    assert metrics["search"] == {"pruned_after_epoch": 1} and metrics["epochs_run"] == 1
    assert float(rows[1]["value"]) == pytest.approx(float(history[0]["val_loss"]))
    assert finetunekit.evaluate(pruned, tiny_train)["samples"] == 200
    complete = json.loads((study / "trials" / "0000" / "metrics.json").read_text())
    assert float(rows[0]["value"]) == pytest.approx(complete["val"]["loss"]) and "search" not in complete
    # the second trial trained the head only, on the features the first one cached
    assert "features (train and val, pooled): 200 x 256, read from the cache" in (pruned / "log.txt").read_text()
    assert "search: trial 1 pruned after epoch 1" in (study / "search.log").read_text()
    best = Recipe.load(study / "best.yaml")
    assert best.train.lr == 0.05 and best.out is None and best.train.metric == "loss" and best.train.epochs == 3
    assert json.loads((study / "importances.json").read_text()) == {
        "unavailable": "parameter importances need 2 or more complete trials (the study has 1)"}
    assert "| 1 | 0 | complete |" in out and f"best recipe: {study / 'best.yaml'}" in out
    # the same command again: the study is done, nothing runs; another recipe cannot join it
    assert cli(*args)[0] == 0 and sorted(p.name for p in (study / "trials").iterdir()) == ["0000", "0001"]
    other = list(args)
    other[other.index("--epochs") + 1] = "2"
    code, _, err = cli(*other)
    assert (code, err.splitlines()[-1]) == (2, (
        "finetunekit: error: --study-name study: the study was created with another recipe (train.epochs: 3 there, "
        "2 here); use the same options, or another --study-name or --out"))


def test_a_running_trial_of_a_dead_local_worker_is_failed_and_queued_again(tmp_path):
    """The journal file has no heartbeat (optuna 5.1): a trial whose worker on this host is gone is failed and
    queued again with its parameters by the next worker."""
    import optuna

    from finetunekit.search import storage

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = os.getpid()
    study = optuna.create_study(storage=storage.open_storage(None, tmp_path, 30), study_name="s")
    for pid in (dead.pid, live):
        t = study.ask()
        t.suggest_float("train.lr", 1e-4, 1e-1, log=True)
        t.set_user_attr(storage.WORKER, {"host": socket.gethostname(), "pid": pid})
    assert storage.reap_dead(study) == [0]
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "RUNNING", "WAITING"]
    assert trials[2].params == trials[0].params and trials[2].system_attrs["failed_trial"] == 0
    assert storage.reap_dead(study) == []


BROADCAST = textwrap.dedent("""
    import json, sys
    import optuna
    from finetunekit.search import ranks
    from finetunekit.search.trial_addon import TrialReport

    state = ranks.state()
    trial = None
    if state.is_main_process:
        study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
        done = study.ask()
        done.report(0.9, step=1)
        study.tell(done, 0.9)
        trial = study.ask()
    message = ranks.share((7, {"train.lr": 0.01}) if state.is_main_process else None)
    report = TrialReport(trial, "accuracy")
    # rank 0's epoch is worse than the median: pruned; the other ranks report nothing and follow it
    stop = report.after_epoch(1, {"accuracy": 0.5 if state.is_main_process else 0.99})
    print(json.dumps([state.process_index, state.num_processes, message, stop, report.pruned_at]))
    import torch.distributed as dist
    dist.barrier()
    dist.destroy_process_group()  # as cli.main does at exit: a process may not leave gloo's threads running
""")


def test_rank_0_samples_and_decides_and_the_other_ranks_receive_it(tmp_path):
    """Two real processes in a gloo process group (accelerate's PartialState, as `accelerate launch` sets it up):
    the trial's parameters and the pruning decision reach rank 1 from rank 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", BROADCAST], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    lines = [json.loads(out.strip().splitlines()[-1]) for out, _ in results]
    assert lines == [[0, 2, [7, {"train.lr": 0.01}], True, 1], [1, 2, [7, {"train.lr": 0.01}], True, 1]]


def test_which_storages_have_heartbeats(tmp_path):
    """optuna 5.1: RDBStorage (sqlite, postgresql) records heartbeats; the journal file does not (docs/search.md)."""
    from finetunekit.search import storage

    sqlite = storage.open_storage(f"sqlite:///{tmp_path / 's.db'}", tmp_path, 7)
    journal = storage.open_storage(None, tmp_path, 7)
    assert storage.has_heartbeat(sqlite) and sqlite.get_heartbeat_interval() == 7 and sqlite.grace_period == 14
    assert not storage.has_heartbeat(journal) and (tmp_path / storage.JOURNAL).is_file()
    import importlib.util

    if importlib.util.find_spec("psycopg") is None:  # SQLAlchemy would look for psycopg 3: psycopg2 is named
        assert storage.database_url("postgresql://u@h:1/d") == "postgresql+psycopg2://u@h:1/d"
