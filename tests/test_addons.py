"""The add-on contract: a plain object with named hooks, called by the loop in a fixed order; what it adds
to the loss trains the weights but never enters the logged loss; what it saves resumes."""

from __future__ import annotations

import pytest
import torch

from finetunekit import build, loop
from finetunekit.addons import AddOn, AddOns
from finetunekit.data import make_loader
from finetunekit.features import Features
from finetunekit.optim import build_scheduler
from finetunekit.strategies import Phase, Plan
from finetunekit.tasks import Classification

from conftest import save_tiny_bert
from test_text import write_sentiment


@pytest.fixture(scope="module")
def tiny_bert_for_addons(tmp_path_factory):
    """A 2-layer BERT (dropout on, so recomputation must replay its random draws) and a small labelled table."""
    folder = save_tiny_bert(tmp_path_factory.mktemp("gc-bert"), hidden_dropout=0.1)
    return folder, write_sentiment(folder / "texts.csv", 64, 0)


class Recorder(AddOn):
    name = "recorder"

    def __init__(self, penalty: float = 0.0):
        self.calls: list[str] = []
        self.penalty = penalty
        self.model = None

    def start(self, model):
        self.calls.append("start")
        self.model = model

    def train_batch(self, batch, epoch):
        self.calls.append(f"train_batch:{epoch}")
        return batch

    def extra_loss(self, batch, outputs):
        self.calls.append("extra_loss")
        return self.penalty * self.model.weight.pow(2).sum() if self.penalty else None

    def after_update(self, model, updates):
        self.calls.append(f"after_update:{updates}")

    def eval_model(self, model):
        self.calls.append("eval_model")
        return model

    def eval_candidates(self):
        self.calls.append("eval_candidates")
        return []

    def after_epoch(self, epoch, val):
        self.calls.append(f"after_epoch:{epoch}")
        return False


class Stopper(AddOn):
    """Stops training after `at` epochs, as a search trial's pruner does."""

    def __init__(self, at: int):
        self.at, self.seen = at, []

    def after_epoch(self, epoch, val):
        self.seen.append((epoch, round(val["loss"], 6)))
        return epoch >= self.at


def _run(addon: AddOn, seed: int = 0, epochs: int = 1):
    accelerator = build.accelerator("no", 2, True, None)
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    train = make_loader(Features(x[None], y), 4, train=True, workers=0, seed=0)
    val = make_loader(Features(x[None], y), 8, train=False, workers=0, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    module, optimizer, train, val = accelerator.prepare(model, optimizer, train, val)
    scheduler = build_scheduler(optimizer, kind="constant", epochs=1, updates_per_epoch=2, warmup_epochs=0,
                                min_lr_ratio=0.0)
    plan = Plan("full", [Phase(0, frozenset({"weight", "bias"}), 1.0, "all parameters")])
    state = loop.fit(accelerator, module, optimizer, scheduler, train, val, Classification(["a", "b", "c"]),
                     loop.LoopConfig(epochs=epochs, plan=plan, quiet=True), on_best=lambda *a: None,
                     addons=AddOns([addon]))
    return model, state


def test_hooks_run_in_the_documented_order():
    recorder = Recorder()
    _, state = _run(recorder)
    # 4 batches, accumulation 2: an update after every second batch; then one evaluation
    assert recorder.calls == ["start",
                              "train_batch:0", "extra_loss", "train_batch:0", "extra_loss", "after_update:1",
                              "train_batch:0", "extra_loss", "train_batch:0", "extra_loss", "after_update:2",
                              "eval_model", "eval_candidates", "after_epoch:1"]
    assert state.updates == 2 and len(state.history) == 1 and state.history[0]["grad_norm"] > 0


def test_after_epoch_may_stop_training_after_that_epoch():
    stopper = Stopper(at=2)
    _, state = _run(stopper, epochs=5)
    # asked after epochs 1 and 2 with that epoch's validation metrics; stopped after 2 of 5, not as early stopping
    assert [e for e, _ in stopper.seen] == [1, 2]
    assert [loss for _, loss in stopper.seen] == [round(r["val_loss"], 6) for r in state.history]
    assert state.epoch == 2 and len(state.history) == 2 and state.updates == 4 and not state.stopped_early


def test_an_extra_loss_trains_the_weights_but_stays_out_of_the_logged_loss():
    plain, plain_state = _run(Recorder())
    penalised, penalised_state = _run(Recorder(penalty=1.0))
    assert not torch.equal(plain.weight, penalised.weight)
    assert penalised.weight.abs().sum() < plain.weight.abs().sum()  # the L2 term pulled the weights in
    # same start, same batches: the logged losses differ only by what two updates changed, far less than the
    # penalty itself (which would be in them, were it logged)
    torch.manual_seed(0)
    penalty_at_start = torch.nn.Linear(4, 3).weight.pow(2).sum().item()
    gap = abs(penalised_state.history[0]["train_loss"] - plain_state.history[0]["train_loss"])
    assert gap < penalty_at_start / 4, (gap, penalty_at_start)


def test_gradient_checkpointing_changes_memory_not_numbers(cifar_subset, tmp_path, tiny_bert_for_addons):
    """--grad-checkpointing recomputes activations instead of keeping them: the same losses and weights, bit
    for bit on the CPU, for a timm ViT and a transformers encoder; a model without it is one clear line."""
    import finetunekit
    from safetensors.torch import load_file

    def fit(out, model, data, task, **train):
        recipe = {"task": task, "data": {"path": str(data), "num_workers": 0}, "model": {"name": model},
                  "train": {"epochs": 1, "batch_size": 16, **train}, "out": str(out), "quiet": True}
        if task.startswith("image"):
            recipe["data"].update(image_size=32, augment="none")
            recipe["model"]["pretrained"] = False
        run = finetunekit.fit(recipe)
        return load_file(str(run.model_dir / "model.safetensors")), (run.run_dir / "steps.csv").read_text()

    for model, data, task in (("timm:test_vit", cifar_subset["train"], "image-classification"),
                              (f"hf:{tiny_bert_for_addons[0]}", tiny_bert_for_addons[1], "text-classification")):
        plain = fit(tmp_path / f"{task}-plain", model, data, task)
        checkpointed = fit(tmp_path / f"{task}-gc", model, data, task, grad_checkpointing=True)
        assert plain[1] == checkpointed[1]
        assert all(torch.equal(plain[0][k], checkpointed[0][k]) for k in plain[0])
        assert "gradient checkpointing on" in (tmp_path / f"{task}-gc" / "log.txt").read_text()
    with pytest.raises(finetunekit.UserError, match="gradient checkpointing: "):
        fit(tmp_path / "tv", "torchvision:resnet18", cifar_subset["train"], "image-classification",
            grad_checkpointing=True)
