"""The run directory never costs the user a file: the run marker, --overwrite, and failures before training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import finetunekit
from finetunekit import faults
from finetunekit.rundir import MARKER, is_run

from conftest import run_cli


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file and folder under root, with the bytes of each file."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _recipe(data: Path, out: Path, **extra) -> dict:
    return {"data": {"path": str(data), "image_size": 32, "augment": "none", "num_workers": 0},
            "model": {"name": "timm:test_efficientnet", "pretrained": False},
            "train": {"epochs": 1, "batch_size": 16}, "out": str(out), "quiet": True, **extra}


@pytest.fixture(scope="module")
def old_run(cifar_subset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("old") / "run"
    finetunekit.fit(_recipe(cifar_subset["train"], out))
    return out


def _copy_run(old_run: Path, tmp_path: Path) -> Path:
    import shutil

    out = tmp_path / "run"
    shutil.copytree(old_run, out)
    return out


def test_a_user_folder_with_its_own_recipe_is_not_a_run_and_overwrite_deletes_nothing(cifar_subset, tmp_path):
    """The report: exp1/ with data/, notes.md and the user's recipe.yaml; `fit --config exp1/recipe.yaml
    --out exp1 --overwrite` deleted all of it, data included."""
    exp = tmp_path / "exp1"
    (exp / "data").mkdir(parents=True)
    (exp / "data" / "train.csv").write_text(Path(cifar_subset["train"]).read_text())
    (exp / "notes.md").write_text("my notes\n")
    (exp / "recipe.yaml").write_text(f"data:\n  path: {exp / 'data' / 'train.csv'}\n  image_size: 32\n"
                                     f"model:\n  name: timm:test_efficientnet\n  pretrained: false\n"
                                     f"train:\n  epochs: 1\n")
    before = _snapshot(exp)
    assert not is_run(exp)
    r = run_cli("fit", "--config", str(exp / "recipe.yaml"), "--out", str(exp), "--overwrite", "--quiet")
    assert r.returncode == 2, r.stderr
    assert f"--out {exp}: holds --data {exp / 'data' / 'train.csv'}" in r.stderr
    assert _snapshot(exp) == before
    # the recipe alone inside --out is refused too, and so is a folder of other files
    (exp / "data" / "train.csv").unlink()
    with pytest.raises(finetunekit.UserError, match="holds --config"):
        finetunekit.fit(str(exp / "recipe.yaml"), out=str(exp), overwrite=True, data={"path": cifar_subset["train"]})
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.md").write_text("x")
    with pytest.raises(finetunekit.UserError, match="holds files that finetunekit did not write"):
        finetunekit.fit(_recipe(cifar_subset["train"], other, overwrite=True))
    assert (other / "notes.md").read_text() == "x"


def test_overwrite_with_bad_data_leaves_the_old_run_exactly_as_it_was(old_run, tmp_path):
    out = _copy_run(old_run, tmp_path)
    before = _snapshot(out)
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\n")  # no rows
    with pytest.raises(finetunekit.UserError):
        finetunekit.fit(_recipe(bad, out, overwrite=True))
    assert _snapshot(out) == before


def test_overwrite_with_a_model_that_cannot_load_leaves_the_old_run(old_run, cifar_subset, tmp_path):
    out = _copy_run(old_run, tmp_path)
    before = _snapshot(out)
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"not safetensors")
    recipe = _recipe(cifar_subset["train"], out, overwrite=True)
    recipe["model"]["weights"] = str(weights)
    with pytest.raises(finetunekit.UserError):
        finetunekit.fit(recipe)
    assert _snapshot(out) == before


def test_a_run_that_fails_before_its_first_checkpoint_puts_the_folder_back(old_run, cifar_subset, tmp_path,
                                                                           monkeypatch):
    out = _copy_run(old_run, tmp_path)
    before = _snapshot(out)
    monkeypatch.setattr(faults, "_TARGET", ("batch", 1, "oom"))  # fails inside the first training batch
    with pytest.raises(finetunekit.UserError, match="out of memory"):
        finetunekit.fit(_recipe(cifar_subset["train"], out, overwrite=True))
    assert _snapshot(out) == before
    # a new folder: nothing is left, so a plain retry needs no --overwrite
    fresh = tmp_path / "a" / "b" / "fresh"
    monkeypatch.setattr(faults, "_counts", {})
    with pytest.raises(finetunekit.UserError, match="out of memory"):
        finetunekit.fit(_recipe(cifar_subset["train"], fresh))
    assert not (tmp_path / "a").exists()
    monkeypatch.setattr(faults, "_TARGET", None)
    finetunekit.fit(_recipe(cifar_subset["train"], fresh))
    assert is_run(fresh)


def test_overwrite_replaces_only_what_finetunekit_wrote(old_run, cifar_subset, tmp_path):
    out = _copy_run(old_run, tmp_path)
    (out / "predictions.csv").write_text("mine\n")
    (out / "notes").mkdir()
    (out / "notes" / "a.md").write_text("notes\n")
    old_id = json.loads((out / MARKER).read_text())["run_id"]
    old_weights = (out / "model" / "model.safetensors").read_bytes()
    finetunekit.fit(_recipe(cifar_subset["train"], out, overwrite=True, train={"epochs": 1, "batch_size": 8}))
    assert json.loads((out / MARKER).read_text())["run_id"] != old_id
    assert (out / "model" / "model.safetensors").read_bytes() != old_weights
    assert (out / "predictions.csv").read_text() == "mine\n" and (out / "notes" / "a.md").read_text() == "notes\n"
    assert not list(out.glob(".replaced-*"))  # the old run is gone once the new one finished
    assert "kept 2 files finetunekit did not write: notes, predictions.csv" in (out / "log.txt").read_text()


def test_a_run_from_before_the_marker_is_still_a_run(old_run, tmp_path):
    out = _copy_run(old_run, tmp_path)
    (out / MARKER).unlink()
    assert is_run(out)  # recipe.yaml + split.json + model/: the files only a run writes together
    (out / "split.json").unlink()
    assert not is_run(out)
