"""Checkpoints: everything a run needs to continue exactly, written so that a crash cannot leave a broken one
that looks complete.

A checkpoint is a folder `checkpoints/step-<global batch>` of safetensors files (tensors) and one
`state.json` (numbers: position, best score, history, RNG states of Python and NumPy, the optimizer's
scalars); no pickle anywhere. It is written under a temporary name, every file fsynced, then a
`MANIFEST.json` with the SHA-256 of each file is written last, and the folder is renamed into place. A
folder without a manifest, or whose files do not match it, is incomplete: it is reported and skipped.
Retention keeps the newest `keep` complete checkpoints and the best one; older ones are removed only after
the new one is complete.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import faults
from .errors import TrainingStopped, UserError
from .filehash import sha256_file  # noqa: F401 - re-exported: build.py and others import it from here

log = logging.getLogger("finetunekit")

CHECKPOINTS = "checkpoints"
CORE_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")  # the rest are add-ons'
MANIFEST = "MANIFEST.json"
FORMAT = 1


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tensors(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # own contiguous CPU copies: safetensors refuses tensors that share memory (tied weights)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in d.items()}


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, with a failed write raised as the OSError it is (safetensors reports a full
    disk, a quota or a file-size limit as a SafetensorError "... (os error 28)")."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


# what a failed checkpoint write asks of the user before resuming
_REMEDY = {errno.ENOSPC: "make room", errno.EDQUOT: "make room (or raise the disk quota)",
           errno.EFBIG: "raise the file-size limit (ulimit -f)", errno.EACCES: "make it writable",
           errno.EROFS: "make it writable"}


def write(root: Path, name: str, tensors: dict[str, dict[str, torch.Tensor]], state: dict[str, Any]) -> Path:
    """Write checkpoint `root/name` atomically; returns its path."""
    text = json.dumps(state, allow_nan=True)  # before any file: a value JSON cannot hold leaves nothing behind
    root.mkdir(parents=True, exist_ok=True)
    tmp, final = root / f".tmp-{name}", root / name
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for filename, d in tensors.items():
        save_tensors(_tensors(d), tmp / filename)
    (tmp / "state.json").write_text(text, encoding="utf-8")
    faults.point("checkpoint-write")  # a crash here leaves a folder with no manifest: incomplete
    files = sorted(p.name for p in tmp.iterdir())
    for f in files:
        _fsync(tmp / f)
    manifest = {"format": FORMAT, "files": {f: sha256_file(tmp / f) for f in files}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    _fsync(tmp / MANIFEST)
    _fsync(tmp)
    if final.exists():  # the same step written again by a resumed run: replace it
        old = root / f".old-{name}"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync(root)
    return final


def problem(path: Path) -> str | None:
    """Why checkpoint folder `path` cannot be used, or None when it is complete and intact."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return "incomplete (no manifest: the write was interrupted)"
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, UnicodeDecodeError):
        return "unreadable manifest"
    for f, digest in files.items():
        if not (path / f).is_file():
            return f"{f} is missing"
        if sha256_file(path / f) != digest:
            return f"{f} does not match its SHA-256 in the manifest (truncated or altered)"
    return None


def prune(root: Path, keep: int, protect: set[str]) -> None:
    """Remove all but the newest `keep` complete checkpoints and those named in `protect` (the best)."""
    done = [p for p in sorted(root.glob("step-*")) if (p / MANIFEST).is_file()]
    for path in done[:-keep] if keep else done:
        if path.name not in protect:
            shutil.rmtree(path, ignore_errors=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def read(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    why = problem(path)
    if why is not None:
        raise UserError(f"checkpoint {path}: {why}")
    tensors = {p.name: load_file(str(p)) for p in path.glob("*.safetensors")}
    return tensors, json.loads((path / "state.json").read_text(encoding="utf-8"))


# ---- pieces of state -------------------------------------------------------------------------------------

def optimizer_parts(optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's state dict (or the optimizer) as tensors (safetensors) plus everything else (JSON). Tensors
    may sit in the per-parameter state (moments) and in the param groups (timm's Lamb keeps its step count there):
    group tensors are stored as `param_groups.<group>.<key>`, with their device, and put back where they were."""
    sd = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups, group_tensors = [], {}
    for i, group in enumerate(sd["param_groups"]):
        groups.append({k: v for k, v in group.items() if not torch.is_tensor(v)})
        for key, value in group.items():
            if torch.is_tensor(value):
                tensors[f"{_GROUP}.{i}.{key}"] = value
                group_tensors[f"{_GROUP}.{i}.{key}"] = str(value.device)
    return tensors, {"param_groups": groups, "scalars": scalars, "group_tensors": group_tensors}


_GROUP = "param_groups"  # tensor names of param-group entries; per-parameter ones start with a number


def optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        if idx != _GROUP:
            state.setdefault(int(idx), {})[key] = value
    for idx, entry in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    groups = [dict(g) for g in meta["param_groups"]]
    for name, device in meta.get("group_tensors", {}).items():
        _, i, key = name.split(".", 2)
        target = torch.device(device)  # a run moved to a machine without that GPU keeps it on the CPU
        groups[int(i)][key] = tensors[name].to(target if target.type == "cpu" or torch.cuda.is_available() else "cpu")
    return {"state": state, "param_groups": groups}


def rng_parts() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every random generator training draws from: torch (CPU and each GPU), NumPy and Python."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return tensors, {"numpy": [kind, keys.tolist(), pos, has_gauss, cached],
                     "python": [version, list(internal), gauss_next]}


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))


@dataclass
class Found:
    path: Path
    skipped: list[tuple[Path, str]]


def latest(run_dir: Path) -> Found | None:
    """The newest complete checkpoint of a run (and the newer damaged ones that were passed over)."""
    root = run_dir / CHECKPOINTS
    skipped = []
    for path in sorted(root.glob("step-*"), reverse=True) if root.is_dir() else []:
        why = problem(path)
        if why is None:
            return Found(path, skipped)
        skipped.append((path, why))
    return None


def content_hash(sources: dict[str, list[Path]]) -> tuple[str, dict[str, str], int]:
    """SHA-256 over the files' bytes and names (with their folder: a class folder is a label), split by
    split: the data a run trains on, wherever it was moved. Also: how many validation files are
    byte-identical to a training file (leakage). Returns (the whole data's hash, each split's, leaked)."""
    whole = hashlib.sha256()
    digests: dict[str, list[str]] = {}
    per_split = {}
    for split, paths in sources.items():
        digests[split] = [sha256_file(p) for p in paths]
        h = hashlib.sha256()
        for path, digest in zip(paths, digests[split]):
            h.update(f"{path.parent.name}/{path.name}\0{digest}\0".encode("utf-8", "surrogateescape"))
        per_split[split] = h.hexdigest()
        whole.update(f"{split}\0{per_split[split]}\0".encode())
    train = set(digests.get("train", ()))
    return whole.hexdigest(), per_split, sum(d in train for d in digests.get("val", ()))


def parse_period(value: str | None) -> tuple[int | None, float | None]:
    """'500' -> every 500 updates; '10m', '90s', '1h' -> every so many seconds; None -> epochs only."""
    if value is None or value in ("", "epoch"):
        return None, None
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if value[-1] in units:
            seconds = float(value[:-1]) * units[value[-1]]
            if seconds > 0:
                return None, seconds
        elif int(value) > 0:
            return int(value), None
    except ValueError:
        pass
    raise UserError(f"--checkpoint-every {value}: expected a number of updates (500), a time (10m, 90s, 1h) "
                    f"or 'epoch'")


class Checkpoints:
    """A run's checkpoints: when one is due, writing it with its steps.csv rows, retention, and
    SIGTERM/SIGINT turned into "checkpoint at the next update, then stop"."""

    def __init__(self, run_dir: Path, *, every: str | None, keep: int, fingerprint: dict[str, Any],
                 scaler=None, is_main: bool = True, sharding=None):
        self.root, self.steps_csv = run_dir / CHECKPOINTS, run_dir / "steps.csv"
        self.every_updates, self.every_seconds = parse_period(every)
        self.keep, self.fingerprint, self.scaler, self.is_main = keep, fingerprint, scaler, is_main
        self.sharding = sharding  # --fsdp (finetunekit.sharding): whole state dicts gathered by every process
        self.last_time = time.monotonic()
        self.best_name: str | None = None
        # add-ons' tensors (file name -> state dict) from the checkpoint a run resumes, e.g. the EMA's
        self.addon_tensors: dict[str, dict[str, torch.Tensor]] = {}
        self.stop_requested: str | None = None
        self._previous: dict[int, Any] = {}

    def due(self, updates: int) -> bool:
        due = bool(self.stop_requested
                   or (self.every_updates and updates % self.every_updates == 0)
                   or (self.every_seconds and time.monotonic() - self.last_time >= self.every_seconds))
        if self.sharding is not None:  # --fsdp: a checkpoint is a collective (every process gathers), so process
            # 0's clock and signals decide for all (one 1-element broadcast per update)
            nccl = torch.distributed.get_backend() == "nccl"
            flag = torch.tensor([float(due)], device=torch.cuda.current_device() if nccl else "cpu")
            torch.distributed.broadcast(flag, src=0)
            due = bool(flag.item())
        return due

    def save(self, state, model, optimizer, scheduler, addon_tensors: dict[str, dict[str, torch.Tensor]],
             steps: list[tuple[int, float]], best: bool = False) -> Path | None:
        if self.sharding is not None:  # a collective: every process gathers, process 0 receives the whole tensors
            model_state, optimizer = self.sharding.model_state(model), self.sharding.optimizer_state(model, optimizer)
        else:
            model_state = None
        if not self.is_main:
            return None
        try:
            return self._save(state, model.state_dict() if model_state is None else model_state, optimizer,
                              scheduler, addon_tensors, steps, best)
        except OSError as e:  # a full disk, a quota, a file-size limit, lost permissions: the previous one is intact
            for stale in self.root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            last = latest(self.root.parent)
            raise TrainingStopped(
                f"cannot write a checkpoint to {self.root} ({e.strerror or e}); the previous one, "
                f"{last.path if last else 'none'}, is intact; {_REMEDY.get(e.errno, 'fix that')} and continue "
                f"with `finetunekit fit --resume {self.root.parent}`") from None

    def _save(self, state, model_state, optimizer, scheduler, addon_tensors, steps, best) -> Path:
        new = not self.steps_csv.exists()
        with self.steps_csv.open("a", encoding="utf-8") as f:
            if new:
                f.write("step,loss\n")
            f.writelines(f"{step},{loss!r}\n" for step, loss in steps)
        opt_tensors, opt_meta = optimizer_parts(optimizer)
        rng_tensors, rng_meta = rng_parts()
        tensors = {"model.safetensors": model_state, "optimizer.safetensors": opt_tensors,
                   "rng.safetensors": rng_tensors}
        tensors.update(addon_tensors)  # e.g. ema.safetensors
        name = f"step-{state.step:08d}"
        if best:
            self.best_name = name
        meta = {"format": FORMAT, "train": state.to_dict(), "optimizer": opt_meta,
                "scheduler": scheduler.state_dict(), "rng": rng_meta,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "fingerprint": self.fingerprint, "best_checkpoint": self.best_name}
        path = write(self.root, name, tensors, meta)
        prune(self.root, self.keep, {self.best_name} if self.best_name else set())
        self.last_time = time.monotonic()
        log.debug("checkpoint %s", path)
        return path

    def stopped(self, path: Path | None) -> TrainingStopped:
        signum = signal.Signals[self.stop_requested]
        return TrainingStopped(f"stopped by {self.stop_requested} after writing checkpoint {path}; continue with "
                               f"`finetunekit fit --resume {self.root.parent}`", exit_code=128 + int(signum))

    def __enter__(self):
        def request(signum, frame):
            name = signal.Signals(signum).name
            if self.stop_requested:  # a second signal: stop now
                raise KeyboardInterrupt(name)
            self.stop_requested = name
            log.warning("%s: writing a checkpoint at the next update, then stopping (again to stop now)", name)

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, request)
            except ValueError:  # not the main thread: signals stay as they are
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def truncate_steps(path: Path, last_step: int) -> None:
    """Keep steps.csv rows up to `last_step` (a resumed run rewrites what came after its checkpoint)."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    keep = lines[:1] + [x for x in lines[1:] if _step_of(x) is not None and _step_of(x) <= last_step]
    path.write_text("".join(keep), encoding="utf-8")


def _step_of(row: str) -> int | None:
    """The step of a whole `step,loss` row; None for a row cut short by a failed write."""
    step, sep, loss = row.partition(",")
    return int(step) if sep and row.endswith("\n") and step.isdigit() and loss.strip() else None
