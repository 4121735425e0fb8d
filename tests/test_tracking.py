"""--log-with: MLflow (a real SQLite store), W&B (offline run files) and TensorBoard together in one run, each
holding the recipe as dotted parameters and history.csv's rows as per-epoch metrics."""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import pytest
import yaml

from finetunekit import UserError
from finetunekit.config import flatten

from conftest import CIFAR, run_cli


def _wandb_records(path: Path) -> list:
    """The records of a W&B transaction log (run-*.wandb): a 7-byte W&B header, then LevelDB's log format (32 KiB
    blocks of records with a 7-byte header: checksum, length, type FULL 1 / FIRST 2 / MIDDLE 3 / LAST 4), each a
    wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, parts, out = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            out.append(record)
    return out


@pytest.fixture
def manifest(tmp_path) -> Path:
    if not CIFAR.is_dir():
        pytest.skip(f"{CIFAR} not found")
    path = tmp_path / "train.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for c in ("airplane", "automobile", "bird"):
            w.writerows((str(p), c) for p in sorted((CIFAR / "train" / c).glob("*.jpg"))[:20])
    return path


def test_mlflow_wandb_and_tensorboard_hold_the_recipe_and_every_epoch(manifest, tmp_path):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from mlflow import MlflowClient

    out, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "ftk-test", "WANDB_MODE": "offline",
           "WANDB_DIR": str(tmp_path), "WANDB_PROJECT": "ftk-test", "WANDB_SILENT": "true"}
    r = run_cli("fit", "--data", str(manifest), "--model", "timm:test_efficientnet", "--no-pretrained",
                "--image-size", "32", "--epochs", "2", "--batch-size", "16", "--strategy", "linear-probe",
                "--out", str(out), "--log-with", "tensorboard,mlflow,wandb", env=env)
    assert r.returncode == 0, r.stderr
    # MLflow's own INFO lines (its database set-up: "INFO mlflow.store.db.utils: Creating initial MLflow database
    # tables...") only with --verbose
    assert "mlflow.store" not in r.stderr and " INFO " not in r.stderr
    with (out / "history.csv").open() as f:
        history = list(csv.DictReader(f))
    assert [int(h["epoch"]) for h in history] == [1, 2]
    params = flatten(yaml.safe_load((out / "recipe.yaml").read_text()))
    assert params["log_with"] == "tensorboard,mlflow,wandb" and params["train.epochs"] == 2

    # MLflow: one finished run named after the run directory; params = the resolved recipe; metrics per epoch
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ftk-test").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.tags["finetunekit.run_dir"] == str(out.resolve())
    assert run.data.params == {k: str(v) for k, v in params.items()}  # MLflow keeps str(value)
    for key in history[0]:
        if key == "epoch":
            continue
        logged = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        assert [(m.step, m.value) for m in logged] == [(int(h["epoch"]), float(h[key])) for h in history], key

    # W&B offline: the run's transaction log holds the same config and one history record per epoch
    files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    records = _wandb_records(files[0])
    run_record = next(x.run for x in records if x.WhichOneof("record_type") == "run")
    assert (run_record.project, run_record.display_name) == ("ftk-test", "run")
    config = {u.key or "/".join(u.nested_key): json.loads(u.value_json) for x in records
              if x.WhichOneof("record_type") == "config"
              for u in x.config.update}
    assert {k: config[k] for k in params} == params
    rows = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in x.history.item} for x in records
            if x.WhichOneof("record_type") == "history"]
    assert [row["_step"] for row in rows] == [1, 2]
    for row, h in zip(rows, history):
        assert {k: row[k] for k in h if k != "epoch"} == {k: float(v) for k, v in h.items() if k != "epoch"}

    # TensorBoard, the default, still writes its events in the run directory
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_a_tracker_whose_package_is_missing_names_the_extra(monkeypatch):
    from finetunekit import tracking

    monkeypatch.setitem(tracking.PACKAGES, "mlflow", ("finetunekit_no_such_module", "mlflow"))
    with pytest.raises(UserError) as e:
        tracking.check(["tensorboard", "mlflow"])
    assert str(e.value) == ("--log-with mlflow: the finetunekit_no_such_module package is not installed "
                            "(pip install 'finetunekit[mlflow]')")
