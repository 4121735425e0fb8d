"""Exact resume: a run killed at any point (SIGKILL, as kill -9) and resumed ends with the same weights
and the same per-step losses as a run that was never interrupted."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli

# 360 training images, batch 16 (drop_last) x accumulation 2: 22 batches = 11 updates per epoch, 2 epochs;
# a checkpoint every 3 updates and after each epoch
FAULTS = {
    "mid-epoch, inside an accumulation window": "batch@13",
    "second epoch, mid-window": "batch@31",
    "right after an update": "update@10",
    "right after an evaluation": "after-eval@1",
    "during a checkpoint write": "checkpoint-write@3",
}
QUICK = ("mid-epoch, inside an accumulation window",)  # the rest: -m slow (make test-all)


def _args(cifar_subset, out, *extra):
    return ("fit", "--data", str(cifar_subset["train"]), "--model", "timm:test_efficientnet", "--no-pretrained",
            "--image-size", "32", "--augment", "strong", "--mixup", "0.2", "--cutmix", "1.0", "--ema", "0.9",
            "--drop-path", "0.1", "--epochs", "2", "--batch-size", "16", "--grad-accum", "2", "--num-workers", "0",
            "--checkpoint-every", "3", "--out", str(out), "--quiet", *extra)


def _outcome(run):
    """What must not depend on interruptions: final weights, every step's loss, every epoch's metrics."""
    final = sorted((run / "checkpoints").glob("step-*"))[-1]
    history = [{k: v for k, v in row.items() if k not in ("train_samples_per_s", "epoch_seconds")}
               for row in csv.DictReader((run / "history.csv").open())]
    return (load_file(str(final / "model.safetensors")), load_file(str(run / "model" / "model.safetensors")),
            (run / "steps.csv").read_text(), history)


@pytest.fixture(scope="module")
def reference(cifar_subset, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "reference"
    r = run_cli(*_args(cifar_subset, out))
    assert r.returncode == 0, r.stderr
    return _outcome(out)


def _same(a, b):
    final_a, best_a, steps_a, hist_a = a
    final_b, best_b, steps_b, hist_b = b
    assert final_a.keys() == final_b.keys()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a), "final weights differ"
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a), "saved best model differs"
    assert steps_a == steps_b
    assert hist_a == hist_b


@pytest.mark.parametrize("where", [w if w in QUICK else pytest.param(w, marks=pytest.mark.slow) for w in FAULTS])
def test_killed_run_resumes_exactly(cifar_subset, tmp_path, reference, where):
    out = tmp_path / "run"
    killed = run_cli(*_args(cifar_subset, out), env={"FINETUNEKIT_FAULT": FAULTS[where]})
    assert killed.returncode == -9, killed.stderr
    resumed = run_cli(*_args(cifar_subset, out, "--resume", str(out)))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    _same(_outcome(out), reference)


def test_damaged_checkpoint_is_reported_and_resume_falls_back(cifar_subset, tmp_path, reference):
    out = tmp_path / "run"
    killed = run_cli(*_args(cifar_subset, out), env={"FINETUNEKIT_FAULT": "batch@31"})
    assert killed.returncode == -9
    newest = sorted((out / "checkpoints").glob("step-*"))[-1]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    resumed = run_cli(*_args(cifar_subset, out, "--resume", str(out)))
    assert resumed.returncode == 0, resumed.stderr
    assert f"checkpoint {newest}: model.safetensors does not match its SHA-256" in resumed.stderr
    assert "falling back to an older one" in resumed.stderr
    _same(_outcome(out), reference)  # an older checkpoint resumes just as exactly
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert len(kept) <= 3 and not any(n.startswith(".") for n in kept)  # the last 2 and the best


def test_drift_guard(cifar_subset, tmp_path):
    out = tmp_path / "run"
    assert run_cli(*_args(cifar_subset, out), env={"FINETUNEKIT_FAULT": "batch@13"}).returncode == -9
    r = run_cli(*_args(cifar_subset, out, "--resume", str(out), "--batch-size", "8"))
    assert r.returncode == 2
    assert "the run changed since its checkpoint: batch_size 16 -> 8" in r.stderr and "--resume-force" in r.stderr
    # other data: a manifest with one image fewer
    rows = cifar_subset["train"].read_text().splitlines()
    other = tmp_path / "other.csv"
    other.write_text("\n".join(rows[:-1]) + "\n")
    r = run_cli(*_args(cifar_subset, out, "--resume", str(out), "--data", str(other)))
    assert r.returncode == 2 and "the training data's content (SHA-256)" in r.stderr
    # forced: named, the mid-epoch position dropped, and the run finishes
    r = run_cli(*_args(cifar_subset, out, "--resume", str(out), "--batch-size", "8", "--resume-force"))
    assert r.returncode == 0, r.stderr
    assert "--resume-force: continuing although batch_size 16 -> 8" in r.stderr
    assert "dropped: the position inside epoch 1 (12 batches trained)" in r.stderr


@pytest.mark.slow
def test_resume_refusals_and_auto(cifar_subset, tmp_path):
    r = run_cli(*_args(cifar_subset, tmp_path / "nowhere", "--resume", str(tmp_path / "nowhere")))
    assert r.returncode == 2 and "not a finetunekit run directory" in r.stderr
    # --resume auto on an empty --out starts a new run
    out = tmp_path / "auto"
    r = run_cli(*_args(cifar_subset, out, "--resume", "auto", "--epochs", "1"))
    assert r.returncode == 0, r.stderr and "resuming" not in r.stderr
    r = run_cli(*_args(cifar_subset, out, "--resume", "auto", "--epochs", "1"))
    assert r.returncode == 0 and "resuming from" in r.stderr  # a finished run resumes at its end: nothing to do


def test_sigterm_writes_a_checkpoint_and_the_run_resumes_exactly(cifar_subset, tmp_path, reference):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "finetunekit.cli", *_args(cifar_subset, out)],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    while not (out / "steps.csv").exists() and time.time() < deadline:  # training has begun
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM after writing checkpoint" in err and "--resume" in err
    resumed = run_cli(*_args(cifar_subset, out, "--resume", str(out)))
    assert resumed.returncode == 0, resumed.stderr
    _same(_outcome(out), reference)


@pytest.mark.slow
def test_workers_do_not_change_the_result(cifar_subset, tmp_path):
    """Augmentation is drawn from per-sample seeds: 0 or 2 loader workers give bit-identical weights."""
    runs = []
    for workers in ("0", "2"):
        out = tmp_path / f"w{workers}"
        args = list(_args(cifar_subset, out, "--epochs", "1"))
        args[args.index("--num-workers") + 1] = workers
        r = run_cli(*args)
        assert r.returncode == 0, r.stderr
        runs.append(load_file(str(out / "model" / "model.safetensors")))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def _regression_table(cifar_subset, path, huge_every):
    """image-regression targets 0/1, and 1e30 (its squared error overflows to inf) every `huge_every` rows."""
    rows = list(csv.DictReader(cifar_subset["train"].open()))
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "value"])
        for i, r in enumerate(rows):
            w.writerow([r["path"], 1e30 if i % huge_every == 0 else float(r["label"] in ("cat", "dog"))])
    return path


def test_non_finite_updates_are_skipped_then_the_run_stops(cifar_subset, tmp_path):
    def fit(table, out):
        return run_cli("fit", "--task", "image-regression", "--data", str(table), "--model", "timm:test_efficientnet",
                       "--no-pretrained", "--image-size", "32", "--epochs", "1", "--batch-size", "16",
                       "--num-workers", "0", "--max-nonfinite", "3", "--out", str(out), "--quiet")

    # a few poisoned samples: the updates of their batches are skipped, the run goes on with finite weights
    out = tmp_path / "some"
    r = fit(_regression_table(cifar_subset, tmp_path / "some.csv", 97), out)
    assert r.returncode == 0, r.stderr
    assert "non-finite loss or gradient; update skipped" in r.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert 1 <= metrics["skipped_updates"] <= 5
    weights = load_file(str(out / "model" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    # every sample poisoned: 3 skipped updates in a row stop the run with the likely causes
    r = fit(_regression_table(cifar_subset, tmp_path / "all.csv", 1), tmp_path / "all")
    assert r.returncode == 1, r.stderr
    assert "3 updates in a row had a non-finite loss or gradient; likely causes: a learning rate too high" \
        in r.stderr and "bad labels" in r.stderr


from finetunekit.strategies import STRATEGIES  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_strategy_resumes_exactly_after_its_phase_change(cifar_subset, tmp_path, strategy):
    """Killed in epoch 2 (after freeze-unfreeze, lp-ft and gradual changed phase), with warmup, a cosine
    schedule and gradient accumulation: the resumed run equals the uninterrupted one."""
    def args(out, *extra):
        return ("fit", "--data", str(cifar_subset["train"]), "--model", "timm:test_efficientnet", "--no-pretrained",
                "--image-size", "32", "--epochs", "2", "--batch-size", "16", "--grad-accum", "2",
                "--num-workers", "0", "--strategy", strategy, "--warmup", "0.5", "--checkpoint-every", "4",
                "--out", str(out), "--quiet", *extra)

    assert run_cli(*args(tmp_path / "ref")).returncode == 0
    out = tmp_path / "run"
    assert run_cli(*args(out), env={"FINETUNEKIT_FAULT": "batch@35"}).returncode == -9
    r = run_cli(*args(out, "--resume", str(out)))
    assert r.returncode == 0, r.stderr
    assert "resuming epoch 2 at batch 11" in r.stderr  # checkpoint at update 16 = batch 32 = 10 into epoch 2
    _same(_outcome(out), _outcome(tmp_path / "ref"))


@pytest.mark.slow
def test_out_of_memory_mid_run_names_the_checkpoint_and_the_way_on(cifar_subset, tmp_path):
    out = tmp_path / "run"
    r = run_cli(*_args(cifar_subset, out), env={"FINETUNEKIT_FAULT": "batch@13:oom"})
    assert r.returncode == 1, r.stderr
    assert "out of memory at batch size 16; the last complete checkpoint is" in r.stderr
    assert "step-00000012" in r.stderr  # the checkpoint after update 6 survived the error
    suggested = r.stderr.split("`finetunekit fit ")[1].split("`")[0].split()
    assert suggested[-5:] == ["--batch-size", "8", "--grad-accum", "4", "--resume-force"]
    resumed = run_cli(*_args(cifar_subset, out, *suggested))
    assert resumed.returncode == 0, resumed.stderr
    assert "dropped: the position inside epoch 1 (12 batches trained)" in resumed.stderr


def test_a_full_disk_mid_run_keeps_the_previous_checkpoint(cifar_subset, tmp_path, reference):
    from finetunekit.checkpoint import problem

    out = tmp_path / "run"
    r = run_cli(*_args(cifar_subset, out), env={"FINETUNEKIT_FAULT": "checkpoint-write@3:enospc"})
    assert r.returncode == 1, r.stderr
    assert "No space left on device (injected)); the previous one," in r.stderr and "is intact" in r.stderr
    previous = out / "checkpoints" / "step-00000012"
    assert f"{previous}, is intact" in r.stderr and problem(previous) is None
    assert not list((out / "checkpoints").glob(".tmp-*"))  # the half-written one is gone
    resumed = run_cli(*_args(cifar_subset, out, "--resume", str(out)))
    assert resumed.returncode == 0, resumed.stderr
    _same(_outcome(out), reference)


def test_batch_size_auto_probes_and_keeps_the_effective_batch(cifar_subset, tmp_path):
    def fit(out, batch, env=None):
        return run_cli("fit", "--data", str(cifar_subset["train"]), "--model", "timm:test_efficientnet",
                       "--no-pretrained", "--image-size", "32", "--epochs", "1", "--batch-size", batch,
                       "--num-workers", "0", "--out", str(out), "--quiet", env=env)

    import yaml

    # fits at once: the same run as --batch-size 32, bit for bit (the probe leaves no trace)
    assert fit(tmp_path / "fixed", "32").returncode == 0
    r = fit(tmp_path / "auto", "auto")
    assert r.returncode == 0, r.stderr
    assert "--batch-size auto: 32 x --grad-accum 1 (effective batch 32)" in r.stderr
    a, b = (load_file(str(tmp_path / n / "model" / "model.safetensors")) for n in ("fixed", "auto"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # 32 runs out of memory (injected): 16 x 2, recorded in the run's recipe
    r = fit(tmp_path / "half", "auto", env={"FINETUNEKIT_FAULT": "probe@1:oom"})
    assert r.returncode == 0, r.stderr
    assert "--batch-size auto: 32 does not fit" in r.stderr and "16 x --grad-accum 2 (effective batch 32)" in r.stderr
    saved = yaml.safe_load((tmp_path / "half" / "recipe.yaml").read_text())["train"]
    assert (saved["batch_size"], saved["grad_accum"]) == (16, 2)


def test_resume_keeps_the_runs_quiet_unless_told_otherwise(cifar_subset, tmp_path):
    """--resume RUN without --quiet continues as quietly as the run was started; an explicit flag wins."""
    import finetunekit
    from finetunekit.config import build_recipe
    from finetunekit.resume import resume_recipe

    out = tmp_path / "run"
    finetunekit.fit({"data": {"path": str(cifar_subset["train"]), "image_size": 32, "augment": "none",
                              "num_workers": 0},
                     "model": {"name": "timm:test_efficientnet", "pretrained": False},
                     "train": {"epochs": 1, "batch_size": 16}, "out": str(out), "quiet": True})
    assert resume_recipe(build_recipe({}, {"resume": str(out)}))[0].quiet is True
    assert resume_recipe(build_recipe({}, {"resume": str(out), "quiet": False}))[0].quiet is False


def test_a_killed_peft_run_resumes_exactly(tmp_path):
    """--peft lora on a tiny BERT, freeze-unfreeze (the head, then the adapters), an EMA, gradient
    accumulation: killed in epoch 2 and resumed, it ends with the same weights, adapter folder and per-step
    losses as the uninterrupted run."""
    from conftest import save_tiny_bert
    from test_text import write_sentiment

    bert, data = save_tiny_bert(tmp_path / "bert"), write_sentiment(tmp_path / "train.csv", 96, 0)

    def args(out, *extra):
        return ("fit", "--task", "text-classification", "--data", str(data), "--model", f"hf:{bert}",
                "--peft", "lora", "--lora-r", "4", "--lora-dropout", "0.1", "--strategy", "freeze-unfreeze",
                "--ema", "0.9", "--epochs", "2", "--batch-size", "8", "--grad-accum", "2", "--checkpoint-every", "2",
                "--out", str(out), "--quiet", *extra)

    def outcome(run):
        final = sorted((run / "checkpoints").glob("step-*"))[-1]
        return (load_file(str(final / "model.safetensors")),
                load_file(str(run / "model" / "adapter_model.safetensors")), (run / "steps.csv").read_text())

    assert run_cli(*args(tmp_path / "ref")).returncode == 0
    out = tmp_path / "run"
    # 11 batches (6 updates) an epoch; killed before update 9, resumed from the checkpoint after update 8
    assert run_cli(*args(out), env={"FINETUNEKIT_FAULT": "batch@17"}).returncode == -9
    r = run_cli(*args(out, "--resume", str(out)))
    assert r.returncode == 0, r.stderr
    assert "resuming epoch 2 at batch 5" in r.stderr
    (final_a, adapter_a, steps_a), (final_b, adapter_b, steps_b) = outcome(out), outcome(tmp_path / "ref")
    assert final_a.keys() == final_b.keys() and any("lora_B" in k for k in final_a)
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a), "final weights differ"
    assert adapter_a.keys() == adapter_b.keys() and all(torch.equal(adapter_a[k], adapter_b[k]) for k in adapter_a)
    assert steps_a == steps_b
