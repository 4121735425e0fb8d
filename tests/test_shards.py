"""Streaming from WebDataset tar shards: the same images as the class folders they were written from, dealt to
workers and processes without overlap, one epoch of training from each source, and one-line errors."""

from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import finetunekit
from finetunekit.data import ImageDataset, Split, build_transform, make_loader, resolve_splits
from finetunekit.data import shards as shards_mod
from finetunekit.data.shards import deal, make_shard_loader, resolve_shard_splits, share
from finetunekit.data.transforms import Preprocessing
from finetunekit.shardfiles import expand

from conftest import CIFAR, cli

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import make_shards  # noqa: E402 - the writer the docs use

CLASSES = ("airplane", "cat", "dog")
PRE = Preprocessing(input_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), crop_pct=1.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Real CIFAR-10 mini JPEGs as class folders (train: 40 a class, val: 16 a class) and the same files as shards
    (train: 4 shards of 30, val: 3 shards of 16)."""
    if not CIFAR.is_dir():
        pytest.skip(f"{CIFAR} not found")
    root = tmp_path_factory.mktemp("shards")
    for split, src, n in (("train", "train", 40), ("val", "test", 16)):
        for c in CLASSES:
            (root / "folders" / split / c).mkdir(parents=True)
            for p in sorted((CIFAR / src / c).glob("*.jpg"))[:n]:
                shutil.copy(p, root / "folders" / split / c / p.name)
    make_shards.write(root / "folders" / "train", root / "shards" / "train", prefix="train", per_shard=30, seed=0)
    make_shards.write(root / "folders" / "val", root / "shards" / "val", prefix="val", per_shard=16, seed=0)
    return root


def _pairs(loader) -> Counter:
    """The multiset of (label, image tensor bytes) a loader yields in one pass."""
    out = Counter()
    for x, y in loader:
        out.update((int(label), image.numpy().tobytes()) for image, label in zip(x, y))
    return out


def test_brace_patterns_expand_in_order():
    assert expand("s/train-{000008..000011}.tar") == [f"s/train-0000{i:02d}.tar" for i in (8, 9, 10, 11)]
    assert expand("{a,b}-{0..1}.tar") == ["a-0.tar", "a-1.tar", "b-0.tar", "b-1.tar"]


def test_shards_hold_the_same_classes_counts_and_validation_images_as_the_folders(data):
    s = resolve_shard_splits(data / "shards" / "train", data / "shards" / "val", None)
    folders = resolve_splits(data / "folders" / "train", data / "folders" / "val", None, 0.2, 0, 0.0)
    assert s.classes == folders.classes == list(CLASSES)
    assert (s.train.total, s.val.total, s.train.counts, s.val.counts) == (120, 48, [30, 30, 30, 30], [16, 16, 16])
    assert Counter(s.train.labels) == Counter(folders.train.labels) == Counter({0: 40, 1: 40, 2: 40})
    tf = build_transform(PRE, "none")
    streamed = _pairs(make_shard_loader(s.val, s.classes, tf, 10, train=False, workers=2, seed=0))
    files = _pairs(make_loader(ImageDataset(folders.val, tf), 10, train=False, workers=0, seed=0))
    assert streamed == files and sum(files.values()) == 48  # every validation image once, the same pixels


@pytest.mark.parametrize("world, workers", [(1, 1), (1, 2), (2, 2), (3, 1), (4, 2)])
def test_slots_read_disjoint_samples_and_training_slots_the_same_number(data, monkeypatch, world, workers):
    """Every (process, worker) slot of a deal: training yields the same whole batches in each slot and no
    sample twice; validation (read by process 0 alone, whose batches accelerate shares out) yields every sample
    exactly once over its workers."""
    s = resolve_shard_splits(data / "shards" / "train", data / "shards" / "val", None)
    tf = build_transform(PRE, "none")
    for split, train in ((s.train, True), (s.val, False)):
        ds = make_shard_loader(split, s.classes, tf, 8, train=train, workers=workers, seed=1).dataset
        ids, per_slot = [], []
        for rank in range(world if train else 1):
            monkeypatch.setattr(shards_mod, "rank_and_world", lambda r=rank: (r, world))
            for w in range(workers):
                info = type("Info", (), {"id": w, "num_workers": workers})
                monkeypatch.setattr(shards_mod, "get_worker_info", lambda i=info: i)
                got = [x.numpy().tobytes() for x, _ in ds]
                per_slot.append(len(got))
                ids += got
            assert len(ds) == (ds.per_slot() * workers if train else split.total)
        assert len(set(ids)) == len(ids)  # no image twice (every CIFAR image here is distinct)
        if train:
            assert len(set(per_slot)) == 1 and per_slot[0] % 8 == 0 and per_slot[0] == ds.per_slot()
        else:
            assert len(ids) == split.total
    slots = world * workers
    assert share([30, 30, 30, 30], slots) == {1: 120, 2: 60, 3: 30, 4: 30, 8: 15}[slots]


def test_the_deal_and_shuffle_follow_seed_and_epoch(data):
    assert deal([3, 1, 0, 2], 1, 2) == ([1, 2], 1, 0) and deal([1, 0], 1, 4) == ([1, 0], 4, 1)
    s = resolve_shard_splits(data / "shards" / "train", data / "shards" / "val", None)
    tf = build_transform(PRE, "none")
    ds = make_shard_loader(s.train, s.classes, tf, 8, train=True, workers=0, seed=3).dataset
    first = [y for _, y in ds]
    assert first == [y for _, y in ds]  # the same epoch again: the same order
    ds.set_epoch(1)
    assert sorted(first) != first and Counter(first) != Counter() and [y for _, y in ds] != first


def test_one_epoch_from_shards_and_from_folders(data, tmp_path):
    """The same images, one epoch each: the same classes and sample counts; the shard run's model scored on the
    validation folder gives exactly the metric it logged on the validation shards."""
    common = {"model": {"name": "timm:test_efficientnet", "pretrained": False},
              "train": {"epochs": 1, "batch_size": 8, "seed": 0, "strategy": "full", "lr": 3e-3}, "quiet": True}
    data_opts = {"image_size": 32, "num_workers": 0}
    streamed = finetunekit.fit({**common, "out": str(tmp_path / "shards"), "data": {
        **data_opts, "path": str(data / "shards" / "train" / "train-{000000..000003}.tar"),
        "val": str(data / "shards" / "val")}})
    folder = finetunekit.fit({**common, "out": str(tmp_path / "folder"), "data": {
        **data_opts, "path": str(data / "folders" / "train"), "val": str(data / "folders" / "val")}})
    split = json.loads((streamed.run_dir / "split.json").read_text())
    assert split["classes"] == json.loads((folder.run_dir / "split.json").read_text())["classes"] == list(CLASSES)
    assert split["train"]["count"] == 120 and split["val"]["count"] == 48 and len(split["train"]["shards"]) == 4
    assert streamed.metrics["classes"] == folder.metrics["classes"]
    log = (streamed.run_dir / "log.txt").read_text()
    assert "streamed from 4 + 3 shard(s); 120 training samples an epoch" in log
    assert "decoded images: not cached (shard data is streamed)" in log
    scored = finetunekit.evaluate(streamed.run_dir, data / "folders" / "val")
    assert scored["accuracy"] == streamed.metrics["val"]["accuracy"]
    assert scored["loss"] == pytest.approx(streamed.metrics["val"]["loss"], abs=1e-5)
    for run in (streamed, folder):  # both trained: 15 batches of 8, finite losses
        assert 0 < run.metrics["val"]["loss"] < 5 and run.metrics["epochs_run"] == 1


def test_a_bad_shard_path_is_one_line_and_exit_2(data, tmp_path):
    code, _, err = cli("fit", "--data", str(data / "shards" / "train" / "train-{000000..000009}.tar"), "--val",
                       str(data / "shards" / "val"), "--out", str(tmp_path / "run"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "6 of 10 shard files missing, first" in err and "train-000004.tar" in err
    (tmp_path / "bad.tar").write_bytes(b"not a tar file" * 100)
    code, _, err = cli("fit", "--data", str(tmp_path / "bad.tar"), "--val", str(data / "shards" / "val"), "--out",
                       str(tmp_path / "run2"))
    assert code == 2 and "bad.tar: not a readable tar file" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("fit", "--data", str(data / "shards" / "train"), "--out", str(tmp_path / "run3"))
    assert code == 2 and "needs its own validation shards" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "run2").exists()


@pytest.mark.parametrize("fmt", ["USTAR_FORMAT", "GNU_FORMAT", "PAX_FORMAT"])
def test_the_tar_reader_reads_what_tarfile_reads(fmt):
    """Long names (ustar prefix, GNU long name, pax path), non-ASCII names, sizes over a block, a folder entry."""
    import io
    import tarfile

    from finetunekit.shardfiles import NotATar, tar_members

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=getattr(tarfile, fmt)) as t:
        for i, name in enumerate(["a/" * 60 + "x.jpg", "short.cls", "d" * 90 + "/" + "e" * 40 + ".txt", "ü-ñ.json"]):
            data = bytes([i]) * (i * 700 + 3)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        folder = tarfile.TarInfo("folder")
        folder.type = tarfile.DIRTYPE
        t.addfile(folder)
    raw = out.getvalue()
    with tarfile.open(fileobj=io.BytesIO(raw)) as t:
        want = [(m.name, t.extractfile(m).read()) for m in t if m.isfile()]
    assert list(tar_members(io.BytesIO(raw), lambda name: True)) == want and len(want) == 4
    assert [d for _, d in tar_members(io.BytesIO(raw), lambda name: name.endswith(".cls"))] == \
        [None, b"\x01" * 703, None, None]
    with pytest.raises(NotATar):
        list(tar_members(io.BytesIO(b"not a tar file" * 100), lambda name: True))


def test_batch_size_auto_probes_with_the_first_samples_of_the_stream(data, tmp_path):
    run = finetunekit.fit({"model": {"name": "timm:test_efficientnet", "pretrained": False},
                           "train": {"epochs": 1, "batch_size": "auto", "seed": 0, "strategy": "full"}, "quiet": True,
                           "out": str(tmp_path / "auto"),
                           "data": {"image_size": 32, "num_workers": 0, "path": str(data / "shards"),
                                    "val": str(data / "shards" / "val")}})
    recipe = (run.run_dir / "recipe.yaml").read_text()
    assert "batch_size: 32" in recipe and run.metrics["epochs_run"] == 1  # the first size tried fits on the CPU


def _sigterm_at(monkeypatch, where: str, n: int = 1):
    """SIGTERM the n-th time the run reaches the fault point `where`: it checkpoints at the next update and stops."""
    import os
    import signal

    from finetunekit import faults

    real, seen = faults.point, []

    def point(name):
        if name == where:
            seen.append(name)
            if len(seen) == n:
                monkeypatch.setattr(faults, "point", real)
                os.kill(os.getpid(), signal.SIGTERM)
        real(name)

    monkeypatch.setattr(faults, "point", point)


def _shard_recipe(data, out, **train):
    return {"model": {"name": "timm:test_efficientnet", "pretrained": False}, "quiet": True, "out": str(out),
            "train": {"epochs": 2, "batch_size": 8, "seed": 0, "strategy": "full", **train},
            "data": {"image_size": 32, "num_workers": 0, "augment": "light", "path": str(data / "shards")}}


def test_a_stream_resumes_exactly_from_an_epoch_end_and_restarts_a_cut_epoch(data, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from finetunekit.errors import TrainingStopped

    def final(run):
        return load_file(str(sorted((run / "checkpoints").glob("step-*"))[-1] / "model.safetensors"))

    finetunekit.fit(_shard_recipe(data, tmp_path / "ref"))
    _sigterm_at(monkeypatch, "after-eval")
    with pytest.raises(TrainingStopped, match="stopped by SIGTERM"):
        finetunekit.fit(_shard_recipe(data, tmp_path / "epoch"))
    finetunekit.fit({"resume": str(tmp_path / "epoch"), "quiet": True})
    ref, resumed = final(tmp_path / "ref"), final(tmp_path / "epoch")
    assert all(torch.equal(ref[k], resumed[k]) for k in ref), "final weights differ"

    _sigterm_at(monkeypatch, "batch", 20)  # epoch 2, batch 5
    with pytest.raises(TrainingStopped, match="stopped by SIGTERM"):
        finetunekit.fit(_shard_recipe(data, tmp_path / "cut", checkpoint_every="epoch"))
    run = finetunekit.fit({"resume": str(tmp_path / "cut"), "quiet": True})
    log = (tmp_path / "cut" / "log.txt").read_text()
    assert "is 5 batches into epoch 2; shard data is a stream, so the epoch starts again from its first batch" in log
    assert run.metrics["epochs_run"] == 2
