"""--domain-adapt coral|mmd --target-data DIR: the two losses by hand, the target stream, a tiny fit that the loss
changes, and the one-line errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image, ImageOps

import finetunekit
from finetunekit.addons.domain_adapt import MMD_MULTIPLIERS, TargetBatches, coral, mmd
from finetunekit.config import build_recipe
from finetunekit.errors import UserError
from finetunekit.preflight import preflight

from safetensors.torch import load_file

from conftest import CIFAR, cli, run_cli

SQUARE = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])  # covariance diag(4/3, 4/3)


# --- the losses -------------------------------------------------------------------------------------------------

def test_coral_by_hand():
    # a smaller square: covariance diag(1/3, 1/3); the difference diag(1, 1): ||.||_F^2 = 2, / (4 d^2) = 16
    assert coral(SQUARE, SQUARE / 2).item() == 0.125
    # points on the diagonal 0..3: covariance 5/3 everywhere; the difference [[1/3, 5/3], [5/3, 1/3]]:
    # (1 + 25 + 25 + 1) / 9 / 16 = 13/36
    line = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    assert coral(SQUARE, line).item() == pytest.approx(13 / 36, rel=1e-6)
    # a shift of the mean alone is invisible to CORAL (it compares covariances only)
    assert coral(SQUARE, SQUARE + 5).item() == 0.0


def test_mmd_by_hand():
    # 1-D: source {0, 1}, target {1, 2}; squared distances between the 4 points: 0 (x2 pairs), 1 (x4), 4 (x2 pairs)
    # counted both ways: the median of the 12 off-diagonal entries is 1, so the kernel is sum_m exp(-d / m).
    # K(0) = 5, K(1) = k1, K(4) = k4: ss = tt = (10 + 2 k1) / 4, st = (5 + 2 k1 + k4) / 4: MMD^2 = 2.5 - k4 / 2
    k4 = sum(math.exp(-4 / m) for m in MMD_MULTIPLIERS)
    value = mmd(torch.tensor([[0.0], [1.0]]), torch.tensor([[1.0], [2.0]])).item()
    assert value == pytest.approx(2.5 - k4 / 2, rel=1e-6)
    assert value == pytest.approx(2.239067, abs=1e-6)


def test_both_are_zero_for_identical_batches_and_positive_otherwise():
    torch.manual_seed(0)
    x = torch.randn(8, 5)
    assert coral(x, x).item() == 0.0 and mmd(x, x).item() == 0.0
    shuffled = x[torch.randperm(8)]  # the same sample in another order: the same distribution
    assert coral(x, shuffled).item() == pytest.approx(0.0, abs=1e-7)
    assert mmd(x, shuffled).item() == pytest.approx(0.0, abs=1e-6)
    y = torch.randn(8, 5) * 2 + 1
    assert coral(x, y).item() > 0.01 and mmd(x, y).item() > 0.1
    # the gradient reaches both sides' features
    a, b = x.clone().requires_grad_(), y.clone().requires_grad_()
    (coral(a, b) + mmd(a, b)).backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_the_target_stream_is_a_function_of_seed_epoch_and_position():
    def batches(epoch, first, count, seed=7):
        s = TargetBatches(5, 3, seed)
        s.start(epoch, first)
        it = iter(s)
        return [next(it) for _ in range(count)]

    run = batches(2, 0, 6)
    indices = [i for b in run for i, _ in b]
    assert sorted(indices[:5]) == sorted(indices[5:10]) == list(range(5))  # whole passes, each shuffled anew
    assert indices[:5] != indices[5:10] or indices[5:10] != indices[10:15]
    assert batches(2, 4, 2) == run[4:6]  # a resumed epoch continues the stream where it stopped
    assert batches(3, 0, 2) != run[:2] and batches(2, 0, 2, seed=8) != run[:2]


# --- runs -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shifted(tmp_path_factory):
    """A source manifest of 10 CIFAR training images a class, and a target folder of 30 inverted test images in
    class sub-folders (their names are ignored)."""
    if not CIFAR.is_dir():
        pytest.skip(f"{CIFAR} not found")
    root = tmp_path_factory.mktemp("shift")
    lines = ["path,label"]
    for c in sorted(d.name for d in (CIFAR / "train").iterdir()):
        lines += [f"{p},{c}" for p in sorted((CIFAR / "train" / c).glob("*.jpg"))[:10]]
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    for c in ("cat", "dog", "ship"):
        (root / "target" / c).mkdir(parents=True)
        for p in sorted((CIFAR / "test" / c).glob("*.jpg"))[:10]:
            ImageOps.invert(Image.open(p).convert("RGB")).save(root / "target" / c / f"{p.stem}.png")
    (root / "empty" / "sub").mkdir(parents=True)
    (root / "empty" / "sub" / "notes.txt").write_text("no images here")
    return root


def _fit(root, name, **train):
    run = finetunekit.fit({"data": {"path": str(root / "train.csv"), "image_size": 32, "augment": "none",
                                    "num_workers": 0, **({"target_data": str(root / "target")} if "domain_adapt" in train else {})},
                           "model": {"name": "timm:test_efficientnet", "pretrained": False},
                           "train": {"epochs": 1, "batch_size": 16, "strategy": "full", "seed": 3, **train},
                           "out": str(root / name), "quiet": True})
    steps = [float(line.split(",")[1]) for line in (run.run_dir / "steps.csv").read_text().splitlines()[1:]]
    return run, steps


def test_the_alignment_loss_changes_training(shifted):
    """The same seed, data and target batches: with a weight of 0 the target images only ride along (BatchNorm
    sees them); with a weight the loss moves the weights, so the first step's task loss is the same and the later
    ones are not. The metrics name the target folder, its size and content hash, and the loss per epoch."""
    zero, zero_steps = _fit(shifted, "zero", domain_adapt="coral", da_weight=0.0)
    aligned, aligned_steps = _fit(shifted, "coral", domain_adapt="coral", da_weight=100.0)
    assert aligned_steps[0] == zero_steps[0] and aligned_steps[1:] != zero_steps[1:]
    assert [round(v, 4) for v in zero_steps] == ZERO_STEPS
    assert [round(v, 4) for v in aligned_steps] == CORAL_STEPS
    entry = aligned.metrics["domain_adapt"]
    assert entry["method"] == "coral" and entry["weight"] == 100.0 and entry["target_images"] == 30
    assert entry["target_data"] == str(shifted / "target") and len(entry["target_hash"]) == 64
    assert [round(v, 6) for v in entry["loss_by_epoch"]] == CORAL_LOSS
    assert json.loads((aligned.run_dir / "metrics.json").read_text())["domain_adapt"] == entry
    recipe = (aligned.run_dir / "recipe.yaml").read_text()
    assert f"target_data: {shifted / 'target'}" in recipe and "domain_adapt: coral" in recipe
    log = (aligned.run_dir / "log.txt").read_text()
    assert "domain adaptation: coral (weight 100) between each training batch and a batch of the 30 unlabeled " \
           f"images of {shifted / 'target'}" in log


ZERO_STEPS = [2.2344, 2.2003, 2.3478, 2.4467, 2.4654]
CORAL_STEPS = [2.2344, 2.2003, 2.3423, 2.4448, 2.4791]
CORAL_LOSS = [0.005476]


def test_while_the_head_trains_alone_nothing_changes_then_mmd_does(shifted):
    """--strategy auto picks lp-ft, not the linear probe it would pick for 10 images a class without adaptation. In
    lp-ft's head-only epoch (on cached features) the features are fixed, so no target image is read and training
    is bit-identical to lp-ft without adaptation; from the next epoch on, the MMD loss changes it."""
    plain, plain_steps = _fit(shifted, "plain-lpft", strategy="lp-ft", epochs=2, head_epochs=1)
    run, steps = _fit(shifted, "mmd-auto", domain_adapt="mmd", da_weight=1.0, strategy="auto", epochs=2)
    half = len(steps) // 2
    assert len(steps) == len(plain_steps) == 10
    assert steps[:half] == plain_steps[:half] and steps[half] != plain_steps[half]
    assert [round(v, 4) for v in steps] == MMD_STEPS
    log = (run.run_dir / "log.txt").read_text()
    assert "strategy auto -> lp-ft: 9 samples per class at 32 px (<= 200): few enough that the pretrained features " \
           "with a new head generalize best, on cached features; but --domain-adapt mmd needs the backbone to train" in log
    assert "the head-only phase (1 epoch) trains on cached features" in log
    assert "domain adaptation: off while the head alone trains (the features it aligns do not change) from epoch 1" \
        in log
    assert "domain adaptation: mmd on from epoch 2" in log
    assert [round(v, 6) for v in run.metrics["domain_adapt"]["loss_by_epoch"]] == MMD_LOSS  # epoch 2 alone


MMD_STEPS = [2.3001, 2.3055, 2.2853, 2.3051, 2.3169, 2.2357, 2.4042, 2.406, 2.2927, 2.3189]
MMD_LOSS = [0.397438]


@pytest.mark.slow
def test_a_killed_run_resumes_the_same_target_stream(shifted, tmp_path):
    """Killed inside epoch 1 (its last checkpoint at update 2 of 5), then --resume: the same task losses, weights
    and per-epoch alignment losses as the run that was never stopped (the target batches come back in order)."""
    args = ["fit", "--data", str(shifted / "train.csv"), "--model", "timm:test_efficientnet", "--no-pretrained",
            "--image-size", "32", "--augment", "light", "--num-workers", "0", "--epochs", "2", "--batch-size", "16",
            "--strategy", "full", "--domain-adapt", "mmd", "--target-data", str(shifted / "target"),
            "--checkpoint-every", "2", "--quiet"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert run_cli(*args, "--out", str(whole)).returncode == 0
    assert run_cli(*args, "--out", str(cut), env={"FINETUNEKIT_FAULT": "batch@4"}).returncode == -9
    r = run_cli("fit", "--resume", str(cut), "--quiet")
    assert r.returncode == 0, r.stderr
    assert (whole / "steps.csv").read_text() == (cut / "steps.csv").read_text()
    a, b = load_file(str(whole / "model" / "model.safetensors")), load_file(str(cut / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [json.loads((r / "metrics.json").read_text())["domain_adapt"]["loss_by_epoch"] for r in (whole, cut)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6) and len(losses[0]) == 2


def test_resume_refuses_a_target_folder_whose_images_changed(shifted, tmp_path):
    """The target images' content is in the checkpoint's fingerprint: the same folder with an image added since is
    drift, refused in one line (exit 2) unless --resume-force."""
    import shutil

    target = tmp_path / "target"
    shutil.copytree(shifted / "target", target)
    args = ["fit", "--data", str(shifted / "train.csv"), "--model", "timm:test_efficientnet", "--no-pretrained",
            "--image-size", "32", "--augment", "none", "--num-workers", "0", "--epochs", "1", "--batch-size", "16",
            "--strategy", "full", "--domain-adapt", "coral", "--target-data", str(target), "--checkpoint-every", "2",
            "--quiet", "--out", str(tmp_path / "run")]
    assert run_cli(*args, env={"FINETUNEKIT_FAULT": "batch@4"}).returncode == -9
    shutil.copy(target / "cat" / sorted(p.name for p in (target / "cat").iterdir())[0], target / "cat" / "new.png")
    r = run_cli("fit", "--resume", str(tmp_path / "run"), "--quiet")
    assert r.returncode == 2, r.stderr
    assert "the run changed since its checkpoint: the target-domain images' content (SHA-256)" in r.stderr


# --- errors -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, expected", [
    ({"train.domain_adapt": "coral"}, "--domain-adapt coral: needs --target-data DIR, a folder of unlabeled images"),
    ({"data.target_data": "{target}"}, "--target-data: needs --domain-adapt coral or mmd"),
    ({"train.da_weight": 2.0}, "--da-weight: needs --domain-adapt coral or mmd"),
    ({"train.domain_adapt": "mmd", "data.target_data": "{empty}"},
     "--target-data {empty}: no images found (looked for .jpg, .jpeg, .png"),
    ({"train.domain_adapt": "mmd", "data.target_data": "{root}/nowhere"}, "--target-data {root}/nowhere: no such folder"),
    ({"train.domain_adapt": "mmd", "data.target_data": "{root}/train.csv"}, "--target-data {root}/train.csv: not a folder"),
    ({"train.domain_adapt": "coral", "data.target_data": "{target}", "train.strategy": "linear-probe"},
     "--domain-adapt coral: --strategy linear-probe trains the head alone"),
    ({"train.domain_adapt": "coral", "data.target_data": "{target}", "task": "detection"},
     "--domain-adapt coral: for --task image-classification, image-multilabel, image-regression, not detection"),
])
def test_preflight_errors(shifted, options, expected):
    names = {"{target}": str(shifted / "target"), "{empty}": str(shifted / "empty"), "{root}": str(shifted)}

    def fill(v):
        for k, n in names.items():
            v = v.replace(k, n) if isinstance(v, str) else v
        return v

    overrides = {"data.path": str(shifted / "train.csv"), "model.name": "timm:test_efficientnet",
                 **{k: fill(v) for k, v in options.items()}}
    with pytest.raises(UserError) as e:
        preflight(build_recipe({}, overrides))
    assert fill(expected) in str(e.value)


def test_a_text_task_is_refused_on_the_command_line(shifted, tmp_path):
    out = tmp_path / "out"
    code, _, err = cli("fit", "--task", "text-classification", "--data", str(shifted / "train.csv"),
                       "--domain-adapt", "coral", "--target-data", str(shifted / "target"), "--out", str(out))
    assert code == 2, err
    assert err.strip() == ("finetunekit: error: --domain-adapt coral: for --task image-classification, "
                           "image-multilabel, image-regression, not text-classification")
    assert not out.exists()
