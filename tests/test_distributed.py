"""Training in two processes on the CPU (gloo), launched as users launch it: torchrun, or `fit --processes 2`.

Marker `distributed` (excluded by default; `pytest -m distributed`) on every test that starts several processes;
the few checks at the end run in one process, in the default suite.
Each process gets OMP_NUM_THREADS=1. The model is timm's tiny test ViT (LayerNorm, no BatchNorm, no dropout):
what remains between one process with the global batch and two with half of it each is the order of float
reductions (docs/distributed.md has the measured differences).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import CIFAR, ROOT, SHARED_DATA, run_cli, save_tiny_bert, write_manifest

SST2 = SHARED_DATA / "sst2"
RACCOON = SHARED_DATA / "raccoon"
# one process with batch 16 against two with 8 each: the same samples in every update (data/order.py's batches
# 2k and 2k+1 are batch k of the single run), so every difference is float reduction order. With momentum SGD the
# largest measured is 2.2e-8 (noise floor, 1 vs 2 threads in one process: 3.7e-9); AdamW divides near-zero
# gradients by their own size and turns the same noise into up to 1.3e-4 (docs/distributed.md). So SGD, tightly.
PARITY = 1e-6
SGD = ("--optimizer", "sgd", "--lr", "1e-2")


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), **(extra or {})}


def torchrun(*args: str, processes: int = 2, env: dict[str, str] | None = None, launcher: tuple[str, ...] = (),
             timeout: float = 600) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node N -m finetunekit.cli ARGS`."""
    launch = launcher or ("--standalone", "--nproc_per_node", str(processes))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", *launch, "-m", "finetunekit.cli", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=_env(env))


def one(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run_cli(*args, env={"OMP_NUM_THREADS": "1", **(env or {})})


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """64 training images (4 updates of 16 per epoch) and 21 validation images (odd: two processes get 11 + 10,
    the distributed sampler pads one)."""
    if not CIFAR.is_dir():
        pytest.skip(f"{CIFAR} not found")
    d = tmp_path_factory.mktemp("ddp-data")
    out = {}
    for name, split, per_class, rows in (("train", "train", 7, 64), ("val", "test", 3, 21)):
        full = write_manifest(d / f"{name}-all.csv", CIFAR / split, per_class)
        lines = full.read_text().splitlines()
        (d / f"{name}.csv").write_text("\n".join(lines[:rows + 1]) + "\n")
        out[name] = d / f"{name}.csv"
    return out


def _fit_args(images, out, batch: int, *extra: str) -> tuple[str, ...]:
    return ("fit", "--data", str(images["train"]), "--val", str(images["val"]), "--model", "timm:test_vit",
            "--no-pretrained", "--image-size", "32", "--epochs", "2", "--batch-size", str(batch), "--lr", "1e-3",
            "--num-workers", "0", "--cache-features", "off", "--cpu", "--out", str(out), *extra)


def _final(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(sorted((run / "checkpoints").glob("step-*"))[-1] / "model.safetensors"))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


STRATEGIES = {"full": (), "freeze-unfreeze": (), "lp-ft": ("--head-epochs", "1"),
              "gradual": ("--epochs", "3", "--unfreeze-every", "1")}


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_two_processes_match_one_with_the_same_global_batch(images, tmp_path, strategy):
    """(a) both processes hold the same weights after training; (b) they match one process with the global
    batch within PARITY; (c) every phase change of the strategy works under DDP (find_unused_parameters=False)."""
    extra = ("--strategy", strategy, *STRATEGIES[strategy], *SGD)
    two = torchrun(*_fit_args(images, tmp_path / "two", 8, *extra))
    assert two.returncode == 0, two.stderr[-3000:]
    single = one(*_fit_args(images, tmp_path / "one", 16, *extra))
    assert single.returncode == 0, single.stderr[-3000:]
    m = _metrics(tmp_path / "two")
    assert m["processes"] == {"count": 2, "max_param_difference": 0.0}  # (a): exactly in step
    assert "processes: 2 (MULTI_CPU, gloo" in two.stderr and "global batch 16 (batch 8 per process)" in two.stderr
    diff = _max_diff(_final(tmp_path / "two"), _final(tmp_path / "one"))
    print(f"{strategy}: max |param(2 processes) - param(1 process)| = {diff:.3g}")
    assert diff < PARITY
    hist2 = list(csv.DictReader((tmp_path / "two" / "history.csv").open()))
    hist1 = list(csv.DictReader((tmp_path / "one" / "history.csv").open()))
    assert len(hist2) == len(hist1)
    for r2, r1 in zip(hist2, hist1):  # the training loss is every process's, not process 0's half
        assert float(r2["train_loss"]) == pytest.approx(float(r1["train_loss"]), abs=1e-4)
        assert float(r2["val_loss"]) == pytest.approx(float(r1["val_loss"]), abs=1e-4)
    if strategy != "full":  # the phase change happened, and unfroze the backbone on both sides
        assert "training all parameters" in two.stderr or "down to" in two.stderr


@pytest.mark.distributed
def test_validation_and_evaluate_count_each_sample_once(images, tmp_path):
    """(d) 21 validation samples over two processes: gather_for_metrics drops the sampler's padding, so the
    metrics equal one process's exactly (the same saved model, scored both ways)."""
    run = tmp_path / "run"
    r = torchrun(*_fit_args(images, run, 8, "--epochs", "1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert _metrics(run)["val"]["samples"] == 21
    two = torchrun("evaluate", str(run), "--data", str(images["val"]), "--cpu", "--batch-size", "4", "--output",
                   str(tmp_path / "two.json"))
    assert two.returncode == 0, two.stderr[-3000:]
    single = one("evaluate", str(run), "--data", str(images["val"]), "--cpu", "--batch-size", "4", "--output",
                 str(tmp_path / "one.json"))
    assert single.returncode == 0, single.stderr[-3000:]
    m2, m1 = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two", "one"))
    assert m2["samples"] == m1["samples"] == 21
    assert m2["accuracy"] == m1["accuracy"] and m2["macro_f1"] == pytest.approx(m1["macro_f1"], abs=1e-9)
    assert m2["loss"] == pytest.approx(m1["loss"], abs=1e-6)
    assert two.stdout.count("samples 21") == 1  # printed by process 0 alone


@pytest.mark.distributed
def test_one_killed_process_then_resume_reproduces_the_uninterrupted_run(images, tmp_path):
    """(e) kill -9 of process 1 mid-epoch 2, `--resume` with two processes: the final weights are exactly the
    uninterrupted two-process run's."""
    args = lambda out, *more: _fit_args(images, out, 8, "--strategy", "freeze-unfreeze", "--checkpoint-every", "2",
                                        "--augment", "strong", *more)
    reference = torchrun(*args(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    out = tmp_path / "run"
    killed = torchrun(*args(out), env={"FINETUNEKIT_FAULT": "batch@7", "FINETUNEKIT_FAULT_RANK": "1"})
    assert killed.returncode != 0
    assert killed.stderr.count("Traceback") == 1  # torchrun's own report (ChildFailedError); none from process 0
    assert (out / "checkpoints").is_dir()
    resumed = torchrun(*args(out, "--resume", str(out)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    assert _max_diff(_final(out), _final(tmp_path / "reference")) == 0.0
    assert (out / "model" / "model.safetensors").read_bytes() == \
        (tmp_path / "reference" / "model" / "model.safetensors").read_bytes()


@pytest.mark.distributed
def test_process_zero_alone_writes_the_run_and_logs_each_line_once(images, tmp_path):
    """(f) a new --out, then --overwrite of that run (the replaced run moved aside once, not by each process):
    one set of files, every log line once on stderr and in log.txt."""
    out = tmp_path / "run"
    for extra in ((), ("--overwrite",)):
        r = torchrun(*_fit_args(images, out, 8, "--epochs", "1", *extra))
        assert r.returncode == 0, r.stderr[-3000:]
        for text in (r.stderr, (out / "log.txt").read_text()):
            assert text.count("processes: 2 (MULTI_CPU") == 1
            assert text.count("epoch 1/1  train loss") == 1
            assert text.count("done in") == 1
    assert sorted(p.name for p in out.iterdir()) == [".finetunekit-run.json", "checkpoints", "history.csv",
                                                     "log.txt", "metrics.json", "model", "progress.json",
                                                     "recipe.yaml", "split.json", "steps.csv", "tensorboard",
                                                     "val_predictions.csv"]


@pytest.mark.distributed
def test_processes_option_starts_them_and_errors_stay_one_line(images, tmp_path):
    """`fit --processes 2` really starts two processes; a bad option stops before any starts (exit 2, one
    line); a failure of process 1 alone reaches process 0 as a line, not a gloo stack trace."""
    r = run_cli(*_fit_args(images, tmp_path / "run", 8, "--epochs", "1", "--processes", "2"),
                env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert _metrics(tmp_path / "run")["processes"]["count"] == 2
    bad = run_cli(*_fit_args(images, tmp_path / "bad", 8, "--processes", "2", "--sync-bn"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert "--sync-bn: torch's SyncBatchNorm runs on GPUs only" in bad.stderr
    oom = run_cli(*_fit_args(images, tmp_path / "oom", 8, "--processes", "2"),
                  env={"FINETUNEKIT_FAULT": "batch@2:oom", "FINETUNEKIT_FAULT_RANK": "1", "OMP_NUM_THREADS": "1"})
    assert oom.returncode == 1, oom.stderr[-3000:]
    assert "Traceback" not in oom.stderr, oom.stderr[-3000:]
    assert "finetunekit: error: out of memory at batch size 8" in oom.stderr
    assert "fit --processes 2: process 1 stopped (exit code 1)" in oom.stderr


@pytest.mark.distributed
def test_a_search_in_two_processes_trains_each_trial_in_both(images, tmp_path):
    """`search --processes 2`: rank 0 samples each trial and decides its pruning, rank 1 receives them; every
    trial is a 2-process run whose processes end in step, and the process group outlives each trial's run."""
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}\n")
    args = _fit_args(images, tmp_path / "study", 8, "--epochs", "2", *SGD, "--processes", "2")[1:]
    r = run_cli("search", "--space", str(space), "--trials", "3", *args, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "study" / "results.csv").open()))
    assert len(rows) == 3 and {row["state"] for row in rows} <= {"complete", "pruned"}
    for trial in sorted((tmp_path / "study" / "trials").iterdir()):
        assert _metrics(trial)["processes"] == {"count": 2, "max_param_difference": 0.0}
    assert r.stdout.count("| rank | trial |") == 1  # the table printed by process 0 alone


@pytest.mark.distributed
def test_shards_stream_in_two_processes(images, tmp_path):
    """WebDataset shards in two processes: the training stream dealt to both, validation read by process 0 and
    shared out, each validation sample counted once, the processes in step."""
    sys.path.insert(0, str(ROOT / "tools"))
    import make_shards

    folders = tmp_path / "folders"
    for split, src, n in (("train", "train", 20), ("val", "test", 7)):
        for c in ("airplane", "cat", "dog"):
            (folders / split / c).mkdir(parents=True)
            for p in sorted((CIFAR / src / c).glob("*.jpg"))[:n]:
                (folders / split / c / p.name).write_bytes(p.read_bytes())
    for split, per in (("train", 15), ("val", 8)):
        make_shards.write(folders / split, tmp_path / "shards" / split, prefix=split, per_shard=per, seed=0)
    out = tmp_path / "run"
    r = torchrun("fit", "--data", str(tmp_path / "shards" / "train"), "--val", str(tmp_path / "shards" / "val"),
                 "--model", "timm:test_vit", "--no-pretrained", "--image-size", "32", "--epochs", "2",
                 "--batch-size", "4", "--num-workers", "0", "--cpu", "--out", str(out), *SGD)
    assert r.returncode == 0, r.stderr[-3000:]
    m = _metrics(out)
    assert m["processes"] == {"count": 2, "max_param_difference": 0.0}
    assert m["val"]["samples"] == 21


@pytest.mark.distributed
@pytest.mark.skipif(not RACCOON.is_dir(), reason="../shared/data/raccoon not found")
def test_detection_in_two_processes(tmp_path):
    """A pretrained Faster R-CNN in two processes: each image's detections differ in size, so validation gathers
    them as objects (all_gather of tensors hung here); 3 validation images over 2 processes are each counted once,
    and `evaluate` in two processes equals one process's exactly."""
    data = tmp_path / "raccoon11"
    for sub, ext in (("images", "jpg"), ("annotations", "xml")):
        (data / sub).mkdir(parents=True)
        for i in range(1, 12):
            (data / sub / f"raccoon-{i}.{ext}").write_bytes((RACCOON / sub / f"raccoon-{i}.{ext}").read_bytes())
    run = tmp_path / "run"
    r = torchrun("fit", "--task", "detection", "--data", str(data), "--val-fraction", "0.3", "--min-size", "64",
                 "--max-size", "96", "--epochs", "1", "--batch-size", "1", "--num-workers", "0", "--cpu",
                 "--out", str(run))
    assert r.returncode == 0, r.stderr[-3000:]
    m = _metrics(run)
    assert m["processes"] == {"count": 2, "max_param_difference": 0.0} and m["val"]["samples"] == 3
    outs = {}
    for name, launch in (("two", torchrun), ("one", one)):
        e = launch("evaluate", str(run), "--data", str(data), "--cpu", "--batch-size", "1", "--output",
                   str(tmp_path / f"{name}.json"))
        assert e.returncode == 0, e.stderr[-3000:]
        outs[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert outs["two"]["samples"] == outs["one"]["samples"] == 11
    for k in ("map50", "map", "mar"):
        assert outs["two"][k] == pytest.approx(outs["one"][k], abs=1e-9)
    assert outs["two"]["loss"] == pytest.approx(outs["one"]["loss"], abs=1e-6)


@pytest.mark.distributed
def test_two_nodes_on_localhost(images, tmp_path):
    """Multi-node through torchrun's rendezvous: two invocations, --nnodes 2 --node_rank 0/1, one process each."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = _fit_args(images, tmp_path / "run", 8, "--epochs", "1")
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(n),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                               "-m", "finetunekit.cli", *args], cwd=ROOT, env=_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for n in (0, 1)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in nodes]
    assert [code for code, _ in results] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    assert _metrics(tmp_path / "run")["processes"] == {"count": 2, "max_param_difference": 0.0}
    assert "processes: 2" in results[0][1] and "processes: 2" not in results[1][1]  # node 1 logs nothing


@pytest.mark.distributed
@pytest.mark.skipif(not SST2.is_dir(), reason="../shared/data/sst2 not found")
def test_text_two_processes_match_one(tmp_path):
    """A tiny BERT (from a config, the real MiniLM tokenizer) on 64 SST-2 rows: in step, and within PARITY of
    one process (--no-group-by-length: grouping by length composes each process's batch by itself)."""
    bert = save_tiny_bert(tmp_path / "bert")
    rows = (SST2 / "train.tsv").read_text().splitlines()
    (tmp_path / "train.tsv").write_text("\n".join(rows[:65]) + "\n")
    (tmp_path / "val.tsv").write_text("\n".join(rows[:1] + rows[100:121]) + "\n")

    def args(out, batch):
        return ("fit", "--task", "text-classification", "--data", str(tmp_path / "train.tsv"), "--val",
                str(tmp_path / "val.tsv"), "--model", f"hf:{bert}", "--epochs", "2", "--batch-size", str(batch),
                *SGD, "--strategy", "freeze-unfreeze", "--no-group-by-length", "--num-workers", "0", "--cpu",
                "--out", str(out))
    two = torchrun(*args(tmp_path / "two", 8))
    assert two.returncode == 0, two.stderr[-3000:]
    single = one(*args(tmp_path / "one", 16))
    assert single.returncode == 0, single.stderr[-3000:]
    assert _metrics(tmp_path / "two")["processes"] == {"count": 2, "max_param_difference": 0.0}
    diff = _max_diff(_final(tmp_path / "two"), _final(tmp_path / "one"))
    print(f"text: max |param(2 processes) - param(1 process)| = {diff:.3g}")
    assert diff < PARITY


# ---- one process, default suite ----

def test_sync_bn_is_refused_on_the_cpu_and_processes_must_match_the_launcher(images, tmp_path, monkeypatch):
    from conftest import cli

    code, _, err = cli(*_fit_args(images, tmp_path / "a", 8, "--sync-bn"))
    assert code == 2 and err.strip().count("\n") == 0
    assert "--sync-bn: torch's SyncBatchNorm runs on GPUs only (it has no CPU kernel)" in err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = cli(*_fit_args(images, tmp_path / "b", 8, "--processes", "3"))
    assert code == 2 and "--processes 3: this process was launched with 2 processes (WORLD_SIZE)" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_sync_bn_converts_batchnorm_and_keeps_the_optimizers_parameters():
    from finetunekit.addons import ADDONS
    from finetunekit.models import create_backbone

    module = create_backbone("timm:test_efficientnet", 3, pretrained=False).module
    before = [id(p) for p in module.parameters()]
    norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules())
    assert ADDONS["sync-bn"](1).wrap_model(module) is module  # one process: nothing to synchronize
    converted = ADDONS["sync-bn"](2).wrap_model(module)
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules()) == norms > 0
    assert [id(p) for p in converted.parameters()] == before


def test_text_evaluation_batches_are_a_sized_sampler():
    """accelerate shards a sampler with `batch_size` into even batches (and gather_for_metrics drops the
    padding); a plain list of batches it shards unevenly, and gloo's all-gather fails on the uneven sizes."""
    from finetunekit.data.text import SortedBatches

    batches = SortedBatches([5, 1, 3, 2, 4], 2)
    assert (batches.batch_size, batches.drop_last, len(batches)) == (2, False, 3)
    assert list(batches) == [[1, 3], [2, 4], [0]]


def test_compile_with_a_staged_strategy_in_several_processes_is_refused():
    from finetunekit.distributed import check_compile
    from finetunekit.errors import UserError

    class Accelerator:
        num_processes = 2

    with pytest.raises(UserError, match="--compile: not with --strategy gradual in 2 processes yet"):
        check_compile(Accelerator(), "gradual", True)
    check_compile(Accelerator(), "full", True)  # one wrapper for the whole run: fine
    Accelerator.num_processes = 1
    check_compile(Accelerator(), "gradual", True)



@pytest.mark.distributed
def test_domain_adaptation_in_two_processes_stays_in_step_through_lp_ft(images, tmp_path):
    """--domain-adapt under DDP: the target rows ride in the wrapped model's forward on each process (its own
    target stream), the head-only epoch reads none, the phase change rebuilds DDP, and both processes end with
    the same weights; the alignment loss of the one adapting epoch is the mean over both processes' batches (as logged)."""
    import shutil

    target = tmp_path / "target"
    target.mkdir()
    for p in sorted((CIFAR / "test" / "cat").glob("*.jpg"))[:24]:
        shutil.copy(p, target / p.name)
    two = torchrun(*_fit_args(images, tmp_path / "two", 8, "--strategy", "lp-ft", "--head-epochs", "1", *SGD,
                              "--domain-adapt", "coral", "--da-weight", "10", "--target-data", str(target)))
    assert two.returncode == 0, two.stderr[-3000:]
    m = _metrics(tmp_path / "two")
    assert m["processes"] == {"count": 2, "max_param_difference": 0.0}
    entry = m["domain_adapt"]
    assert entry["method"] == "coral" and entry["target_images"] == 24 and len(entry["loss_by_epoch"]) == 1
    process_0 = [float(line.split("mean coral loss ")[1].split()[0]) for line in two.stderr.splitlines()
                 if "domain adaptation: epoch 2, mean coral loss" in line]
    assert len(process_0) == 1 and entry["loss_by_epoch"][0] == pytest.approx(process_0[0], rel=1e-3)
    assert entry["loss_by_epoch"][0] > 0
    assert two.stderr.count("domain adaptation: coral on from epoch 2") == 1


@pytest.mark.distributed
def test_seq2seq_in_two_processes_generates_each_pair_once(tmp_path):
    """--task seq2seq under DDP: both processes end with the same weights, and the generated texts of validation
    (the per-epoch subset and the whole set at the end) are gathered once each, matching the pairs' count."""
    from seq2seq_helper import reverse, save_tiny_t5, sst2_sentences, write_pairs

    s = sst2_sentences(max_words=8, limit=120)
    t5 = save_tiny_t5(tmp_path / "t5", s + [reverse(x) for x in s])
    train, val = write_pairs(tmp_path / "train.csv", s[:96]), write_pairs(tmp_path / "val.csv", s[96:119])  # 23: odd
    two = torchrun("fit", "--task", "seq2seq", "--data", str(train), "--val", str(val), "--model", f"hf:{t5}",
                   "--epochs", "2", "--batch-size", "8", "--num-beams", "1", "--max-new-tokens", "10",
                   "--eval-generate-max", "12", "--num-workers", "0", "--cpu", "--log-with", "none",
                   "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    m = _metrics(tmp_path / "two")
    assert m["processes"] == {"count": 2, "max_param_difference": 0.0}
    assert m["val"]["generated"] == 23
    rows = list(csv.DictReader((tmp_path / "two" / "val_predictions.csv").open()))
    assert len(rows) == 23 and sorted(r["reference"] for r in rows) == sorted(reverse(x) for x in s[96:119])
