"""Knowledge distillation (--teacher): the losses against hand computations, the teacher fed exactly what the
student sees (its own preprocessing, the mixed batch, the cached views), cached logits equal to recomputed
ones, the student alone in the optimizer, checkpoints and model folder, and exact resume."""

from __future__ import annotations

import csv
import dataclasses
import math

import pytest
import torch
from safetensors.torch import load_file

import finetunekit
from finetunekit.addons import AddOns
from finetunekit.addons.distill import Distill, hard_loss, soft_loss, soft_loss_multilabel

from conftest import cli, run_cli

S = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]  # student logits
T = [[2.0, 1.0, 0.0], [1.0, 1.0, 1.0]]  # teacher logits


def _log_softmax(v):
    m = max(v)
    z = m + math.log(sum(math.exp(x - m) for x in v))
    return [x - z for x in v]


def _kl(temperature):
    """KL(softmax(t/T) || softmax(s/T)) summed over classes, averaged over the two rows, by hand."""
    total = 0.0
    for s, t in zip(S, T):
        lq, lp = _log_softmax([x / temperature for x in s]), _log_softmax([x / temperature for x in t])
        total += sum(math.exp(p) * (p - q) for p, q in zip(lp, lq))
    return total / len(S)


def test_the_soft_loss_is_the_kl_at_temperature_t_scaled_by_t_squared():
    s, t = torch.tensor(S), torch.tensor(T)
    for temperature in (1.0, 2.0, 4.0):
        assert soft_loss(s, t, temperature).item() == pytest.approx(_kl(temperature) * temperature ** 2, rel=1e-6)
    assert soft_loss(s, t, 1.0).item() == pytest.approx(0.8664325, abs=1e-6)
    assert soft_loss(s, t, 2.0).item() == pytest.approx(4 * 0.2395196541, abs=1e-6)  # T^2 x the KL at T = 2
    assert soft_loss(s, t, 4.0).item() == pytest.approx(0.9545201, abs=1e-6)
    assert soft_loss(t, t, 4.0).item() == pytest.approx(0.0, abs=1e-7)
    # its gradient keeps the task loss's scale as T grows (Hinton et al.): the T^2 cancels the 1/T^2 of the softmax
    grads = []
    for temperature in (2.0, 8.0, 32.0):
        x = torch.tensor(S, requires_grad=True)
        soft_loss(x, t, temperature).backward()
        grads.append(x.grad.norm().item())
    assert grads[2] == pytest.approx(grads[1], rel=0.05) and grads[1] == pytest.approx(grads[0], rel=0.2)


def test_the_multilabel_and_hard_losses_by_hand():
    s, t = torch.tensor(S), torch.tensor(T)
    binary = 0.0
    for a, b in zip(S, T):
        for x, y in zip(a, b):
            p, q = 1 / (1 + math.exp(-y / 2)), 1 / (1 + math.exp(-x / 2))
            binary += p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    assert soft_loss_multilabel(s, t, 2.0).item() == pytest.approx(binary / 6 * 4, rel=1e-6)
    assert soft_loss_multilabel(s, t, 2.0).item() == pytest.approx(0.2131520, abs=1e-6)
    # hard: cross-entropy on the teacher's top class (row 2 ties: the first, as argmax takes it)
    ce = -(_log_softmax(S[0])[0] + _log_softmax(S[1])[0]) / 2
    assert hard_loss(s, t, multilabel=False).item() == pytest.approx(ce, rel=1e-6)
    # multi-label hard: BCE on the labels the teacher predicts at the threshold (sigmoid(t) > 0.5: t > 0)
    bce = -sum(math.log(1 / (1 + math.exp(-x))) if y > 0 else math.log(1 - 1 / (1 + math.exp(-x)))
               for a, b in zip(S, T) for x, y in zip(a, b)) / 6
    assert hard_loss(s, t, multilabel=True).item() == pytest.approx(bce, rel=1e-6)


class _Teacher:
    """Records what it was fed; its logits are fixed."""

    spec, logits_source = "stub", "every batch"

    def __init__(self, logits):
        self.logits, self.fed = logits, []

    def __call__(self, x):
        self.fed.append(x)
        return self.logits


def test_the_addon_mixes_the_losses_and_takes_cached_logits_off_the_batch():
    s, t, y = torch.tensor(S), torch.tensor(T), torch.tensor([1, 2])
    task_loss = torch.tensor(1.5)
    teacher = _Teacher(t)
    kd = Distill(teacher, alpha=0.25, temperature=2.0, hard=False, multilabel=False)
    addons = AddOns([kd])
    x = torch.zeros(2, 3, 4, 4)
    batch = addons.train_batch((x, y), 0)  # no cached logits: the teacher runs on the batch as trained
    loss = addons.extra_loss(task_loss, batch, s)
    assert loss.item() == pytest.approx(0.75 * 1.5 + 0.25 * 4 * _kl(2.0), rel=1e-6)
    assert teacher.fed[0] is x
    cached = torch.tensor(T) * 3
    batch = addons.train_batch((x, y, cached), 0)  # a cached batch: (x, y, logits)
    assert len(batch) == 2 and batch[0] is x
    loss = addons.extra_loss(task_loss, batch, s)
    assert loss.item() == pytest.approx(0.75 * 1.5 + 0.25 * soft_loss(s, cached, 2.0).item(), rel=1e-6)
    assert len(teacher.fed) == 1  # the teacher did not run for the cached batch


def test_the_teacher_sees_the_mixed_batch():
    """build.addons puts distillation after MixUp/CutMix: its teacher reads the images the student trains on."""
    from finetunekit import build
    from finetunekit.config import DataConfig, TrainConfig
    from finetunekit.tasks import Classification

    teacher = _Teacher(torch.zeros(4, 3))
    addons = build.addons(DataConfig(mixup=0.4), TrainConfig(teacher="t"), "image", None, Classification("abc"),
                          teacher)
    assert [a.name for a in addons] == ["mixup", "distill"]
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    mixed = addons.train_batch((x.clone(), y), 0)
    addons.extra_loss(torch.tensor(0.0), mixed, torch.zeros(4, 3))
    assert torch.equal(teacher.fed[0], mixed[0]) and not torch.equal(mixed[0], x)


def test_renormalize_gives_the_teacher_its_own_preprocessing():
    from finetunekit.data.transforms import Preprocessing
    from finetunekit.teacher import Renormalize

    student = Preprocessing(32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    teacher = Preprocessing(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    raw = torch.rand(2, 3, 32, 32)
    norm = lambda p: (raw - torch.tensor(p.mean).view(1, 3, 1, 1)) / torch.tensor(p.std).view(1, 3, 1, 1)  # noqa
    assert torch.allclose(Renormalize(student, teacher)(norm(student)), norm(teacher), atol=1e-6)
    bigger = dataclasses.replace(teacher, input_size=48)
    out = Renormalize(student, bigger)(norm(student))
    assert out.shape == (2, 3, 48, 48)
    resized = torch.nn.functional.interpolate(norm(teacher), size=(48, 48), mode="bilinear", antialias=True)
    assert torch.allclose(out, resized, atol=1e-5)  # resize and the affine renormalization commute


# --- runs ------------------------------------------------------------------------------------------------

def _teacher_folder(folder, classes, *, size=32, seed=1, stats=None, reverse=False, task="image-classification"):
    """A model folder of timm:test_efficientnet (random init from `seed`) for `classes`; `stats` = (mean, std)
    of its preprocessing; `reverse`: the classes and the head's rows in reverse order (the same function)."""
    from finetunekit.artifacts import save_model_folder
    from finetunekit.models import create_backbone

    torch.manual_seed(seed)
    backbone = create_backbone("timm:test_efficientnet", len(classes), pretrained=False, image_size=size)
    if stats:
        backbone.preprocessing = dataclasses.replace(backbone.preprocessing, mean=stats[0], std=stats[1])
    if reverse:
        head = backbone.module.get_classifier()
        with torch.no_grad():
            head.weight.copy_(head.weight.flip(0))
            head.bias.copy_(head.bias.flip(0))
        classes = classes[::-1]
    save_model_folder(folder, backbone, classes, "timm:test_efficientnet", task=task)
    return folder


CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A 48 px teacher with its own mean/std: the student's 32 px batches are resized and renormalized for it."""
    return _teacher_folder(tmp_path_factory.mktemp("teacher") / "model", CLASSES, size=48,
                           stats=((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))


def _fit(data, out, *, data_opts=None, **train):
    run = finetunekit.fit({"data": {"path": str(data), "image_size": 32, "augment": "none", "num_workers": 0,
                                    **(data_opts or {})},
                           "model": {"name": "timm:test_efficientnet", "pretrained": False},
                           "train": {"epochs": 1, "batch_size": 16, "strategy": "full", "seed": 3, **train},
                           "out": str(out), "quiet": True})
    return run, (run.run_dir / "log.txt").read_text()


def _steps(run) -> list[str]:
    return (run.run_dir / "steps.csv").read_text().splitlines()


def _weights(run):
    return load_file(str(run.model_dir / "model.safetensors"))


def test_alpha_zero_trains_exactly_as_without_a_teacher(cifar_subset, tmp_path, teacher):
    """The teacher runs on every (mixed) batch, with no weight: not one bit of training changes, so loading
    it and running it draw nothing from training's random streams."""
    mix = {"mixup": 0.4}
    plain, _ = _fit(cifar_subset["train"], tmp_path / "plain", data_opts=mix)
    distilled, log = _fit(cifar_subset["train"], tmp_path / "kd", data_opts=mix, teacher=str(teacher), kd_alpha=0.0)
    assert "distillation: the teacher runs on every training batch (MixUp/CutMix mix every batch anew)" in log
    assert "reading the student's input resized from 32px to 48px and renormalized to its mean/std" in log
    assert _steps(plain) == _steps(distilled)
    a, b = _weights(plain), _weights(distilled)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cached_logits_train_as_the_teacher_run_on_every_batch(cifar_subset, tmp_path, teacher, monkeypatch):
    """Unaugmented images: the teacher's logits are computed once (then read from the cache by the next run)
    and the run trains as one that runs the teacher on every batch (2 epochs: the decoded-image cache too)."""
    monkeypatch.setenv("FINETUNEKIT_CACHE", str(tmp_path / "cache"))
    opts = dict(teacher=str(teacher), kd_alpha=0.7, kd_temperature=2.0, epochs=2)
    live, log = _fit(cifar_subset["train"], tmp_path / "live", kd_cache="off", **opts)
    assert "the teacher runs on every training batch (--kd-cache off)" in log
    cached, log = _fit(cifar_subset["train"], tmp_path / "cached", **opts)
    assert "distillation: the teacher's logits (train): 360 x 10, computed in" in log
    again, log = _fit(cifar_subset["train"], tmp_path / "again", **opts)
    assert "distillation: the teacher's logits (train): 360 x 10, read from the cache" in log
    plain, _ = _fit(cifar_subset["train"], tmp_path / "plain", epochs=2)
    assert _steps(cached) == _steps(again)
    steps = lambda run: [float(r.split(",")[1]) for r in _steps(run)[1:]]  # noqa: E731
    assert len(steps(cached)) == 44 and steps(cached) == pytest.approx(steps(live), rel=1e-5)
    assert steps(cached) != pytest.approx(steps(plain), rel=1e-3)  # the teacher did change the training
    a, b = _weights(live), _weights(cached)
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-4) for k in a)
    assert cached.metrics["distill"]["teacher_logits"] == "cached"
    assert live.metrics["distill"]["teacher_logits"] == "every batch"
    assert cached.metrics["distill"]["teacher_val"]["accuracy"] == live.metrics["distill"]["teacher_val"]["accuracy"]


def test_only_the_student_is_trained_checkpointed_and_saved(cifar_subset, tmp_path, teacher):
    plain, _ = _fit(cifar_subset["train"], tmp_path / "plain", ema=0.9)
    run, _ = _fit(cifar_subset["train"], tmp_path / "kd", ema=0.9, teacher=str(teacher))
    assert _weights(run).keys() == _weights(plain).keys()
    ckpt = lambda r: sorted((r.run_dir / "checkpoints").glob("step-*"))[-1]  # noqa: E731
    assert sorted(p.name for p in ckpt(run).iterdir()) == sorted(p.name for p in ckpt(plain).iterdir())
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        assert load_file(str(ckpt(run) / name)).keys() == load_file(str(ckpt(plain) / name)).keys(), name
    config = (run.model_dir / "config.json").read_text()
    assert '"distilled_from"' in config and str(teacher) in config
    model = finetunekit.load(run.run_dir)  # the student, as any model folder loads
    assert model.backbone.preprocessing.input_size == 32


def test_a_student_equal_to_its_teacher_is_not_moved_on_any_cached_view(cifar_subset, tmp_path, monkeypatch):
    """Student initialized as the teacher, alpha 1, SGD without weight decay: its gradient is zero only where
    the teacher's logits are of the very view the student trains on: each of 2 augmented views cached beside
    the features (linear probe), and the mixed batch the frozen backbone reads (teacher on every batch)."""
    monkeypatch.setenv("FINETUNEKIT_CACHE", str(tmp_path / "cache"))
    folder = _teacher_folder(tmp_path / "teacher", CLASSES, seed=5)
    start = load_file(str(folder / "model.safetensors"))

    def fit(name, data_opts, **train):
        run = finetunekit.fit({"data": {"path": str(cifar_subset["train"]), "image_size": 32, "num_workers": 0,
                                        **data_opts},
                               "model": {"name": "timm:test_efficientnet", "pretrained": False,
                                         "weights": str(folder / "model.safetensors")},
                               "train": {"epochs": 2, "batch_size": 16, "strategy": "linear-probe", "seed": 3,
                                         "optimizer": "sgd", "weight_decay": 0.0, "lr": 0.5, "label_smoothing": 0.0,
                                         "teacher": str(folder), "kd_alpha": 1.0, "kd_temperature": 1.0, **train},
                               "out": str(tmp_path / name), "quiet": True})
        return run, (run.run_dir / "log.txt").read_text()

    for name, data_opts in (("views", {"augment": "light", "cache_views": 2}),
                            ("mixed", {"augment": "light", "mixup": 0.4, "cache_features": "off"})):
        run, log = fit(name, data_opts)
        if name == "views":
            assert "distillation: the teacher's logits (train, the cached features' views): 360 x 10 x 2 views" in log
        else:
            assert "the teacher runs on every training batch (MixUp/CutMix mix every batch anew)" in log
        after = _weights(run)
        assert torch.allclose(after["classifier.weight"], start["classifier.weight"], atol=1e-6), name
    # the control: with the task's loss alone (alpha 0) the same head does move
    run, _ = fit("control", {"augment": "light", "cache_views": 2}, kd_alpha=0.0)
    assert not torch.allclose(_weights(run)["classifier.weight"], start["classifier.weight"], atol=1e-3)


def test_a_teacher_with_the_classes_in_another_order_is_mapped(cifar_subset, tmp_path, teacher):
    same = _teacher_folder(tmp_path / "same", CLASSES, seed=7)
    reordered = _teacher_folder(tmp_path / "reordered", CLASSES, seed=7, reverse=True)
    a, _ = _fit(cifar_subset["train"], tmp_path / "a", teacher=str(same))
    b, log = _fit(cifar_subset["train"], tmp_path / "b", teacher=str(reordered))
    assert "its classes reordered to the student's" in log
    steps = lambda run: [float(r.split(",")[1]) for r in _steps(run)[1:]]  # noqa: E731
    assert steps(a) == pytest.approx(steps(b), rel=1e-5)


@pytest.mark.parametrize("args, expected", [
    (["--kd-alpha", "0.3"], "--kd-alpha: needs --teacher"),
    (["--teacher", "{teacher}", "--kd-alpha", "1.5"], "--kd-alpha: expected a value <= 1, got '1.5'"),
    (["--teacher", "{teacher}", "--kd-hard", "--kd-temperature", "2"], "--kd-temperature: does not apply to --kd-hard"),
    (["--teacher", "timm:resnet18"], "--teacher timm:resnet18: the teacher must know the student's classes"),
    (["--teacher", "efficientnet_lite0"], "--teacher efficientnet_lite0: the teacher must know the student's classes"),
    (["--teacher", "nowhere/run"], "--teacher nowhere/run: no such run directory or model folder"),
    (["--teacher", "{empty}"], "--teacher {empty}: not a finetunekit run or model folder"),
    (["--teacher", "{teacher}", "--task", "image-regression"], "--teacher: distillation is for classification and "
                                                                "multi-label tasks, not --task image-regression"),
    (["--teacher", "{others}"], "--teacher {others}: its classes (2: cat, dog) are not the student's (10: airplane, "
                                "automobile, bird, cat, deer, dog, ...)"),
    (["--teacher", "{multilabel}"], "--teacher {multilabel}: a multilabel model of images; the student's task is "
                                    "image-classification"),
])
def test_bad_teachers_are_one_line_before_any_work(cifar_subset, tmp_path, teacher, args, expected):
    names = {"{teacher}": str(teacher), "{empty}": str(tmp_path), "{others}": str(tmp_path / "others"),
             "{multilabel}": str(tmp_path / "multilabel")}
    if "{others}" in args:
        _teacher_folder(tmp_path / "others", ["cat", "dog"])
    if "{multilabel}" in args:
        _teacher_folder(tmp_path / "multilabel", CLASSES, task="image-multilabel")
    args = [names.get(a, a) for a in args]
    expected = next((expected.replace(k, v) for k, v in names.items() if k in expected), expected)
    out = tmp_path / "out"
    code, _, err = cli("fit", "--data", str(cifar_subset["train"]), "--model", "timm:test_efficientnet",
                       "--no-pretrained", "--image-size", "32", "--out", str(out), "--quiet", *args)
    assert code == 2, err
    assert err.startswith("finetunekit: error: ") and expected in err, err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()  # the run never claimed its folder


def test_overwrite_never_replaces_the_teacher(cifar_subset, tmp_path):
    """--out on the teacher's run with --overwrite would delete the teacher the run needs: refused."""
    run, _ = _fit(cifar_subset["train"], tmp_path / "teacher")
    code, _, err = cli("fit", "--data", str(cifar_subset["train"]), "--model", "timm:test_efficientnet",
                       "--no-pretrained", "--image-size", "32", "--teacher", str(run.run_dir), "--out", str(run.run_dir),
                       "--overwrite", "--quiet")
    assert code == 2 and f"--out {run.run_dir}: holds --teacher {run.model_dir}" in err, err
    assert (run.model_dir / "model.safetensors").is_file()


def test_text_distillation_with_the_same_or_another_tokenizer(tmp_path):
    """A tiny BERT teacher: the same tokenizer reads the student's ids (cached: no augmentation; on every batch
    under token masking); another tokenizer (uncased vs cased) tokenizes the texts itself, cached only."""
    from transformers import AutoTokenizer

    from conftest import save_tiny_bert
    from test_text import write_sentiment

    bert = save_tiny_bert(tmp_path / "bert")
    data = write_sentiment(tmp_path / "texts.csv", 96, 0)

    def fit(name, **train):
        data_opts = train.pop("data", {})
        run = finetunekit.fit({"task": "text-classification", "data": {"path": str(data), **data_opts},
                               "model": {"name": f"hf:{bert}"},
                               "train": {"epochs": 1, "batch_size": 16, "lr": 3e-3, **train},
                               "out": str(tmp_path / name), "quiet": True})
        return run, (run.run_dir / "log.txt").read_text()

    teacher, _ = fit("teacher")
    _, log = fit("same", teacher=f"hf:{teacher.model_dir}")  # its model folder, a Hugging Face folder
    assert "reading the student's token ids (the same tokenizer)" in log
    assert "the teacher's logits (train): 86 x 2, computed" in log
    run, log = fit("masked", teacher=str(teacher.run_dir), data={"token_mask": 0.1})
    assert "the teacher runs on every training batch (token augmentation changes the texts every epoch)" in log
    assert "teacher_val" in run.metrics["distill"]

    cased = tmp_path / "cased"  # the teacher's folder with a tokenizer that keeps case: other ids
    import shutil

    shutil.copytree(teacher.model_dir, cased)
    AutoTokenizer.from_pretrained(cased, do_lower_case=False).save_pretrained(cased)
    run, log = fit("other", teacher=str(cased))
    assert "reading the raw texts through its own tokenizer (the student's differs)" in log
    assert "the teacher's logits (train): 86 x 2, computed" in log
    assert "teacher_val" not in run.metrics["distill"]  # it cannot read the student's validation batches
    with pytest.raises(finetunekit.UserError, match=r"--teacher .*cased: its tokenizer differs from the student's "
                                                    r"and token augmentation changes the texts every epoch"):
        fit("refused", teacher=str(cased), data={"token_mask": 0.1})


def test_a_lora_student_distils_and_saves_its_adapter_alone(tmp_path):
    """--peft lora with --teacher: the teacher's cached logits train the adapters and the head; the student's
    model folder is the adapter folder, and the frozen base weights did not move."""
    import torch
    from safetensors.torch import load_file

    from conftest import save_tiny_bert
    from test_text import write_sentiment

    bert = save_tiny_bert(tmp_path / "bert")
    data = write_sentiment(tmp_path / "texts.csv", 96, 0)
    common = {"task": "text-classification", "data": {"path": str(data)}, "quiet": True}
    teacher = finetunekit.fit({**common, "model": {"name": f"hf:{bert}"}, "out": str(tmp_path / "teacher"),
                               "train": {"epochs": 1, "batch_size": 16, "lr": 3e-3}})
    run = finetunekit.fit({**common, "model": {"name": f"hf:{bert}", "peft": "lora"}, "out": str(tmp_path / "s"),
                           "train": {"epochs": 1, "batch_size": 16, "teacher": str(teacher.run_dir)}})
    assert run.metrics["distill"]["teacher_logits"] == "cached"
    assert sorted(p.name for p in run.model_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                                "config.json"]
    adapter = load_file(str(run.model_dir / "adapter_model.safetensors"))
    assert any("lora_A" in k for k in adapter) and any("classifier" in k for k in adapter)
    base = load_file(str(bert / "model.safetensors"))
    student = finetunekit.load(run.run_dir).module
    def plain(name):  # the student's name of a base weight -> its name in the tiny BERT's own file
        return name.removeprefix("bert.").replace(".base_layer.", ".")

    frozen = {plain(n): p for n, p in student.named_parameters() if plain(n) in base}
    assert len(frozen) > 20  # the encoder's weights, LoRA-wrapped ones included, compared one by one
    assert [n for n, p in frozen.items() if not torch.equal(p.detach().cpu(), base[n])] == []


def test_multilabel_distillation_on_sigmoids(cifar_subset, tmp_path):
    from test_training import _table

    table = _table(cifar_subset, tmp_path / "t.csv", "multilabel")

    def fit(name, **train):
        return finetunekit.fit({"task": "image-multilabel", "data": {"path": str(table), "image_size": 32,
                                                                     "augment": "none", "num_workers": 0},
                                "model": {"name": "timm:test_efficientnet", "pretrained": False},
                                "train": {"epochs": 1, "batch_size": 16, "strategy": "full", **train},
                                "out": str(tmp_path / name), "quiet": True})

    teacher = fit("teacher")
    soft = fit("soft", teacher=str(teacher.run_dir))
    hard = fit("hard", teacher=str(teacher.run_dir), kd_hard=True)
    assert soft.metrics["distill"]["teacher_val"]["micro_f1"] == teacher.metrics["val"]["micro_f1"]
    assert hard.metrics["distill"]["hard"] is True and _steps(soft) != _steps(hard)


def test_a_killed_distillation_run_resumes_exactly(cifar_subset, tmp_path, teacher):
    """kill -9 inside an accumulation window, with the teacher on every mixed batch and an EMA: the resumed run
    ends with the uninterrupted run's weights, steps and history."""
    from test_resume import _outcome, _same

    def args(out, *extra):
        return ("fit", "--data", str(cifar_subset["train"]), "--model", "timm:test_efficientnet", "--no-pretrained",
                "--image-size", "32", "--augment", "light", "--mixup", "0.2", "--ema", "0.9", "--epochs", "2",
                "--batch-size", "16", "--grad-accum", "2", "--num-workers", "0", "--checkpoint-every", "3",
                "--teacher", str(teacher), "--kd-alpha", "0.6", "--out", str(out), "--quiet", *extra)

    assert run_cli(*args(tmp_path / "ref")).returncode == 0
    out = tmp_path / "run"
    assert run_cli(*args(out), env={"FINETUNEKIT_FAULT": "batch@13"}).returncode == -9
    r = run_cli(*args(out, "--resume", str(out)))
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stderr
    _same(_outcome(out), _outcome(tmp_path / "ref"))
    with (out / "history.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 2
