"""Reliability defects of issue 12: every optimizer and schedule resumes exactly, failed checkpoint writes
(file-size limit, quota) stop cleanly, read-only caches, unreadable class folders, YAML alias bombs, loader
workers that outlive a killed trainer, and the data package's import order."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from safetensors.torch import load_file

import finetunekit
from finetunekit import faults
from finetunekit.errors import TrainingStopped

from conftest import CIFAR, torch_threads, write_manifest
from test_text import tiny_bert, write_sentiment  # noqa: F401 - a fixture and a data writer


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The in-process runs here are tiny: one intra-op thread is as fast, and spares them OpenMP's spinning
    when the cores are shared (30x slower at times). The other modules get torch's setting back."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def tiny_images(tmp_path_factory):
    """24 real CIFAR images of 2 classes (a manifest): 18 train, 6 held out."""
    if not CIFAR.is_dir():
        pytest.skip(f"{CIFAR} not found")
    return write_manifest(tmp_path_factory.mktemp("tiny") / "train.csv", CIFAR / "train", 12, ["cat", "dog"])


def _recipe(data, out, **train):
    return {"data": {"path": str(data), "image_size": 32, "num_workers": 0, "val_fraction": 0.25,
                     "cache_images": "off"},
            "model": {"name": "timm:test_efficientnet", "pretrained": False},
            "train": {"epochs": 2, "batch_size": 4, "checkpoint_every": "epoch", "strategy": "full", **train},
            "out": str(out), "quiet": True}


def _stop_after_first_epoch(monkeypatch):
    """SIGTERM once the first epoch is evaluated: the run writes its epoch checkpoint and stops, as
    `kill -TERM` would make it."""
    real = faults.point

    def point(name):
        if name == "after-eval":
            monkeypatch.setattr(faults, "point", real)
            os.kill(os.getpid(), signal.SIGTERM)
        real(name)

    monkeypatch.setattr(faults, "point", point)


def _final_weights(run):
    return load_file(str(sorted((run / "checkpoints").glob("step-*"))[-1] / "model.safetensors"))


CASES = [{"optimizer": o} for o in ("adamw", "adam", "sgd", "nesterov", "rmsprop", "lamb", "lars")] + \
        [{"scheduler": s} for s in ("linear", "step", "onecycle", "cosine-restarts", "plateau", "constant")]


@pytest.mark.parametrize("train", CASES, ids=lambda c: next(iter(c.values())))
def test_every_optimizer_and_schedule_resumes_exactly(tiny_images, tmp_path, monkeypatch, train):
    """Stopped after epoch 1 and resumed: the final weights equal an uninterrupted run's, bit for bit
    (cosine is the default schedule of the optimizer cases, adamw the optimizer of the schedule cases)."""
    finetunekit.fit(_recipe(tiny_images, tmp_path / "ref", **train))
    out = tmp_path / "run"
    _stop_after_first_epoch(monkeypatch)
    with pytest.raises(TrainingStopped, match="stopped by SIGTERM after writing checkpoint"):
        finetunekit.fit(_recipe(tiny_images, out, **train))
    finetunekit.fit({"resume": str(out), "quiet": True})
    assert "resuming from" in (out / "log.txt").read_text()
    ref, resumed = _final_weights(tmp_path / "ref"), _final_weights(out)
    assert ref.keys() == resumed.keys()
    assert all(torch.equal(ref[k], resumed[k]) for k in ref), "final weights differ"


def test_text_runs_with_lamb_resume_exactly(tiny_bert, tmp_path, monkeypatch):
    """The same for a text model (a tiny BERT): Lamb's step count lives in its param groups."""
    data = write_sentiment(tmp_path / "train.csv", 48, 0)

    def recipe(out):
        return {"task": "text-classification", "data": {"path": str(data)}, "model": {"name": f"hf:{tiny_bert}"},
                "train": {"epochs": 2, "batch_size": 8, "optimizer": "lamb", "checkpoint_every": "epoch"},
                "out": str(out), "quiet": True}

    finetunekit.fit(recipe(tmp_path / "ref"))
    _stop_after_first_epoch(monkeypatch)
    with pytest.raises(TrainingStopped, match="stopped by SIGTERM"):
        finetunekit.fit(recipe(tmp_path / "run"))
    finetunekit.fit({"resume": str(tmp_path / "run"), "quiet": True})
    ref, resumed = _final_weights(tmp_path / "ref"), _final_weights(tmp_path / "run")
    assert all(torch.equal(ref[k], resumed[k]) for k in ref), "final weights differ"


def _limit_file_size(limit: int):
    """For a child process: files may grow to `limit` bytes (ulimit -f), and SIGXFSZ is ignored (as Python
    does anyway), so a write past it fails with EFBIG instead of killing the process."""
    import resource

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return apply


def test_a_file_size_limit_mid_run_stops_naming_the_intact_checkpoint(tiny_images, tmp_path):
    """freeze-unfreeze: epoch 1's checkpoints hold AdamW moments for the head only; once everything trains,
    optimizer.safetensors (808 KB) outgrows a 600 KB limit that the weights (417 KB) fit in."""
    import subprocess
    import sys

    from finetunekit.checkpoint import problem

    out = tmp_path / "run"
    args = ["fit", "--data", str(tiny_images), "--model", "timm:test_efficientnet", "--no-pretrained",
            "--image-size", "32", "--num-workers", "0", "--val-fraction", "0.25", "--cache-images", "off",
            "--epochs", "2", "--batch-size", "4", "--checkpoint-every", "2", "--strategy", "freeze-unfreeze",
            "--quiet"]
    r = subprocess.run([sys.executable, "-m", "finetunekit.cli", *args, "--out", str(out)], capture_output=True,
                       text=True, timeout=300, preexec_fn=_limit_file_size(600_000),
                       env={**os.environ, "OMP_NUM_THREADS": "1"})  # as here (one_thread): the same sums
    previous = out / "checkpoints" / "step-00000004"  # after epoch 1 (4 updates)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert (f"cannot write a checkpoint to {out / 'checkpoints'} (File too large); the previous one, {previous}, "
            f"is intact; raise the file-size limit (ulimit -f) and continue with `finetunekit fit --resume {out}`"
            in r.stderr)
    assert problem(previous) is None and not list((out / "checkpoints").glob(".tmp-*"))
    # without the limit, the run continues from there and ends as an uninterrupted one
    finetunekit.fit({"resume": str(out), "quiet": True})
    assert f"resuming from {previous}" in (out / "log.txt").read_text()
    finetunekit.fit(_recipe(tiny_images, tmp_path / "ref", strategy="freeze-unfreeze", checkpoint_every="2"))
    ref, resumed = _final_weights(tmp_path / "ref"), _final_weights(out)
    assert all(torch.equal(ref[k], resumed[k]) for k in ref)
    assert (out / "steps.csv").read_text() == (tmp_path / "ref" / "steps.csv").read_text()


def test_a_disk_quota_mid_run_stops_naming_the_intact_checkpoint(tiny_images, tmp_path, monkeypatch):
    """EDQUOT cannot be had without a quota-enabled filesystem: it is raised where a checkpoint's files are
    written (the fault point inside the write), as the kernel would raise it."""
    import errno

    from finetunekit.checkpoint import problem

    real = faults.point
    calls = []

    def point(name):
        if name == "checkpoint-write":
            calls.append(name)
            if len(calls) == 2:
                raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        real(name)

    monkeypatch.setattr(faults, "point", point)
    out = tmp_path / "run"
    with pytest.raises(TrainingStopped) as stopped:
        finetunekit.fit(_recipe(tiny_images, out, checkpoint_every="2"))
    previous = out / "checkpoints" / "step-00000002"
    assert str(stopped.value) == (
        f"cannot write a checkpoint to {out / 'checkpoints'} (Disk quota exceeded); the previous one, {previous}, "
        f"is intact; make room (or raise the disk quota) and continue with `finetunekit fit --resume {out}`")
    assert problem(previous) is None and not list((out / "checkpoints").glob(".tmp-*"))


def test_a_model_folder_that_cannot_be_written_stops_naming_the_checkpoint(tiny_images, tmp_path, monkeypatch):
    """The best model's folder hits a file-size limit (EFBIG, as safetensors' write raises it through
    checkpoint.save_tensors): one line naming the folder and the intact checkpoint, no traceback."""
    import errno

    from finetunekit.models import folder

    def full(*args, **kwargs):
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))

    monkeypatch.setattr(folder, "save_tensors", full)
    out = tmp_path / "run"
    with pytest.raises(TrainingStopped) as stopped:
        finetunekit.fit(_recipe(tiny_images, out, checkpoint_every="2"))
    assert str(stopped.value) == (
        f"cannot write the model folder {out / 'model'} (File too large); the last complete checkpoint is "
        f"{out / 'checkpoints' / 'step-00000004'}; make room and continue with `finetunekit fit --resume {out}`")
    assert "\n" not in str(stopped.value)


def test_a_steps_row_cut_short_by_a_failed_write_is_dropped_on_resume(tmp_path):
    from finetunekit.checkpoint import truncate_steps

    steps = tmp_path / "steps.csv"
    steps.write_text("step,loss\n1,0.5\n2,0.25\n3,0.125\n1")  # "1" is what a full disk left of "13,0.7\n"
    truncate_steps(steps, 2)
    assert steps.read_text() == "step,loss\n1,0.5\n2,0.25\n"


# ---- caches that cannot be written ----

def _cache_recipes(data, out):
    """A linear probe (cached features) and a full fine-tune with the decoded-image cache on."""
    probe = _recipe(data, f"{out}-probe", strategy="linear-probe", epochs=1)
    probe["data"].update(augment="none", cache_features="auto")
    decoded = _recipe(data, f"{out}-decoded", epochs=1)
    decoded["data"]["cache_images"] = "on"
    return probe, decoded


def _warnings(run):
    return [x for x in (run / "log.txt").read_text().splitlines() if "could not write the cache" in x]


def test_a_cache_path_under_a_file_falls_back_to_no_cache(tiny_images, tmp_path, monkeypatch):
    """A cache folder that cannot be made (NotADirectoryError: a file sits where a folder is needed): both
    caches are skipped with one warning line, and the runs train as they would uncached."""
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("FINETUNEKIT_CACHE", str(tmp_path / "file" / "cache"))
    probe, decoded = _cache_recipes(tiny_images, tmp_path / "run")
    cache = tmp_path / "file" / "cache"
    for recipe, line in ((probe, f"features: could not write the cache at {cache / 'features'} (Not a directory); "
                                 f"they serve this run only"),
                         (decoded, f"decoded images: could not write the cache at {cache / 'images'} (Not a "
                                   f"directory); reading the files instead")):
        run = finetunekit.fit(recipe).run_dir
        assert [x.split(" WARNING ")[1] for x in _warnings(run)] == [f"warning: {line}"]
    uncached = _recipe(tiny_images, tmp_path / "uncached", epochs=1)
    a, b = (load_file(str(r / "model" / "model.safetensors")) for r in (tmp_path / "run-decoded",
                                                                         finetunekit.fit(uncached).run_dir))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _without_dac_override():
    """For a child process run as root: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from its capability
    bounding set (prctl PR_CAPBSET_DROP), so that after exec permission bits bind root as they bind anyone
    (root reads and writes through them otherwise, which makes chmod useless in a test)."""
    import ctypes

    def drop():
        if os.geteuid() == 0:
            libc = ctypes.CDLL(None, use_errno=True)
            for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
                libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP; failing, the child's probe says so
    return drop


def _run_bound_by_permissions(script: str, probe: os.PathLike, env: dict[str, str]):
    """Run Python `script` in a child bound by permission bits; skip when `probe` (a folder it should not be
    able to write) is writable there all the same."""
    import subprocess
    import sys

    check = f"import os, sys\ntry:\n    open(os.path.join({str(probe)!r}, 'probe'), 'w')\n    sys.exit(3)\n" \
            f"except PermissionError:\n    pass\n"
    r = subprocess.run([sys.executable, "-c", check + script], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", **env}, preexec_fn=_without_dac_override())
    if r.returncode == 3:
        pytest.skip("cannot make permission bits bind this process (root with CAP_DAC_OVERRIDE kept)")
    return r


def test_read_only_caches_fall_back_to_no_cache(tiny_images, tmp_path):
    """A read-only $FINETUNEKIT_CACHE (feature cache) and a read-only default cache (~/.cache, decoded
    images), chmod 0555, in a child process that permission bits bind (as root: without CAP_DAC_OVERRIDE):
    each run warns once and trains uncached."""
    ro_cache, ro_home = tmp_path / "cache", tmp_path / "home"
    ro_cache.mkdir(mode=0o555)
    ro_home.mkdir(mode=0o555)
    probe, decoded = _cache_recipes(tiny_images, tmp_path / "run")
    script = (f"import os, finetunekit\nfinetunekit.fit({probe!r})\n"
              f"os.environ['FINETUNEKIT_CACHE'] = ''\nos.environ.pop('XDG_CACHE_HOME', None)\n"
              f"os.environ['HOME'] = {str(ro_home)!r}\nfinetunekit.fit({decoded!r})\n")
    r = _run_bound_by_permissions(script, ro_cache, {"FINETUNEKIT_CACHE": str(ro_cache)})
    assert r.returncode == 0, r.stderr
    assert [x.split(" WARNING ")[1] for x in _warnings(tmp_path / "run-probe")] == [
        f"warning: features: could not write the cache at {ro_cache / 'features'} (Permission denied); "
        f"they serve this run only"]
    assert [x.split(" WARNING ")[1] for x in _warnings(tmp_path / "run-decoded")] == [
        f"warning: decoded images: could not write the cache at {ro_home / '.cache' / 'finetunekit' / 'images'} "
        f"(Permission denied); reading the files instead"]
    assert os.listdir(ro_cache) == [] and os.listdir(ro_home) == []


# ---- recipes ----

BOMB = 'description: [&a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"],\n' + "".join(
    f"  &{c} [{','.join([f'*{p}'] * 9)}]{']' if c == 'i' else ','}\n" for p, c in zip("abcdefgh", "bcdefghi"))


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    """Billion laughs: 354 bytes, nine levels of nine aliases, in a valid key (before: the error message
    rendered 9^9 values, 3.4 GB and growing after 60 s)."""
    import resource
    import subprocess
    import sys
    import time

    def cap_memory():  # before the fix this test must fail, not take the machine's memory with it
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, resource.RLIM_INFINITY))

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    assert len(BOMB) == 354
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "finetunekit.cli", "fit", "--config", str(bomb)], capture_output=True,
                       text=True, timeout=20, preexec_fn=cap_memory)
    assert time.monotonic() - started < 10
    assert r.returncode == 2
    assert r.stderr == (f"finetunekit: error: {bomb}, line 2: YAML aliases (*a) are not allowed in a recipe; "
                        f"write the value out\n")


def test_long_values_are_cut_short_in_error_messages():
    from finetunekit.config import build_recipe

    with pytest.raises(finetunekit.UserError) as e:
        build_recipe({"train": {"optimizer": "adamw" * 2000}}, {}, source="r.yaml")
    assert str(e.value) == ("r.yaml: train.optimizer: expected 'adamw', 'adam', 'sgd', 'nesterov', 'rmsprop', "
                            "'lamb' or 'lars', got 'adamwadamwadamwadamwadamwadamwadamwad...amwadamwadamwadamwadamw"
                            "adamwadamwadamw'")
    with pytest.raises(finetunekit.UserError) as e:
        build_recipe({"train": {"lr": [[1.0] * 1000] * 1000}}, {}, source="r.yaml")
    assert str(e.value) == "r.yaml: train.lr: expected a valid number, got [[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, " \
                           "1.0, ...], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0..."
    with pytest.raises(finetunekit.UserError) as e:
        build_recipe({"train": list(range(10**6))}, {}, source="r.yaml")
    assert str(e.value) == "r.yaml: 'train' must be a mapping of options, got [0, 1, 2, 3, 4, 5, 6, 7, ...]"



# ---- the data package ----

CYCLE = ("splits", "sources", "tables")  # the modules of the former import cycle; the others: -m slow
DATA_MODULES = [m if m in CYCLE else pytest.param(m, marks=pytest.mark.slow)
                for m in ("splits", "sources", "tables", "images", "order", "text", "transforms", "decoded")]


@pytest.mark.parametrize("module", DATA_MODULES)
def test_each_data_module_imports_alone(module):
    """First in a fresh interpreter (its package, finetunekit.data, comes first anyway)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", f"import finetunekit.data.{module}"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr


def test_no_import_cycle_between_the_readers():
    """data.sources imports data.tables, and both import data.splits, all at the top of the module: none of
    them imports another inside a function (the way a cycle is dodged), and nothing imports back."""
    import ast

    from conftest import ROOT

    allowed = {("sources", "tables"), ("sources", "splits"), ("tables", "splits")}
    for name in CYCLE:
        tree = ast.parse((ROOT / "finetunekit" / "data" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module in CYCLE:
                assert node in tree.body, f"data.{name} imports data.{node.module} inside a function"
                assert (name, node.module) in allowed, f"data.{name} imports data.{node.module}"


# ---- unreadable class folders ----

def _class_tree(root, classes=("cat", "dog")):
    import shutil

    for c in classes:
        (root / c).mkdir(parents=True)
        for image in sorted((CIFAR / "train" / c).iterdir())[:3]:
            shutil.copy(image, root / c / image.name)
    return root


def test_a_class_folder_without_read_permission_is_reported_as_unreadable(tmp_path):
    """chmod 000 on a class folder, and on a folder inside one, read in a child process that permission bits
    bind (as root: without CAP_DAC_OVERRIDE; root lists any folder otherwise). Before, both read as
    "empty" (Path.rglob passes over folders it cannot list)."""
    top, nested = _class_tree(tmp_path / "top"), _class_tree(tmp_path / "nested")
    (nested / "dog" / "more").mkdir()
    for locked in (top / "dog", nested / "dog" / "more"):
        locked.chmod(0)
    script = ("import json\nfrom pathlib import Path\nfrom finetunekit.errors import UserError\n"
              "from finetunekit.data.sources import read_labeled_files\nout = []\n"
              f"for root in ({str(top)!r}, {str(nested)!r}):\n"
              "    try:\n        read_labeled_files(Path(root), '--data')\n    except UserError as e:\n"
              "        out.append(str(e))\nprint(json.dumps(out))\n")
    try:
        r = _run_bound_by_permissions(script, top / "dog", {})
    finally:
        for locked in (top / "dog", nested / "dog" / "more"):
            locked.chmod(0o755)
    assert r.returncode == 0, r.stderr
    import json

    assert json.loads(r.stdout) == [f"--data {top / 'dog'}: cannot read (permission denied)",
                                    f"--data {nested / 'dog' / 'more'}: cannot read (permission denied)"]


def test_class_folder_listing_is_unchanged(tmp_path):
    """Files under sub-folders and symlinks to files count; hidden names, symlinked folders and broken links
    do not: as Path.rglob listed them before."""
    from finetunekit.data.sources import _files_under

    root = _class_tree(tmp_path / "c", ("cat",)) / "cat"
    (root / "a-b").mkdir()
    (root / "a" / "b").mkdir(parents=True)
    (root / ".hidden").mkdir()
    for p in (root / "a-b" / "x.png", root / "a" / "b" / "y.png", root / ".hidden" / "z.png", root / ".dot.png"):
        p.write_bytes(b"x")
    (root / "link.png").symlink_to(next(root.glob("*.jpg")))
    (root / "dirlink").symlink_to(root / "a")
    (root / "broken.png").symlink_to(root / "nowhere")
    before = sorted(p for p in root.rglob("*") if p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(root).parts))
    assert sorted(_files_under(root)) == before and len(before) == 6


# ---- loader workers ----

def _children(pid: int) -> dict[int, str]:
    """pid -> start time (field 22 of /proc/<pid>/stat, to tell a reused pid) of the processes whose parent
    is `pid`."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out[int(entry)] = fields[19]
    return out


def _alive(pid: int, started: str) -> bool:
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z" and fields[19] == started  # a zombie has exited (its new parent may not reap it)


@pytest.mark.skipif(not os.path.isdir("/proc/self") or not os.uname().sysname == "Linux", reason="Linux /proc")
def test_loader_workers_die_with_a_killed_trainer(tiny_images, tmp_path):
    """kill -9 of the trainer while it trains: its loader workers (2 per loader) are gone within a second
    (before: they lived on until torch's check of their parent, every 5 s)."""
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "finetunekit.cli", "fit", "--data", str(tiny_images),
                             "--model", "timm:test_efficientnet", "--no-pretrained", "--image-size", "32",
                             "--epochs", "1000", "--strategy", "full", "--batch-size", "4", "--num-workers", "2", "--cache-images", "off",
                             "--out", str(tmp_path / "run"), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while len(workers := _children(proc.pid)) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert len(workers) >= 2, proc.stderr.read() if proc.poll() is not None else "no workers"
        time.sleep(0.5)  # well into training (the workers persist from epoch to epoch)
        workers = _children(proc.pid)  # the training loader's 2, and the validation loader's once it ran
        assert proc.poll() is None and len(workers) >= 2
        proc.kill()
        proc.wait()
        time.sleep(1.0)
        assert [pid for pid, started in workers.items() if _alive(pid, started)] == []
    finally:
        proc.kill()
        for pid, started in workers.items():  # what the fix should have done, lest a failure leave them
            if _alive(pid, started):
                os.kill(pid, signal.SIGKILL)
