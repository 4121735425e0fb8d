"""Layer groups, strategies (phases), and per-group learning rates: which parameters change, and when."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from finetunekit import UserError
from finetunekit.models import create_backbone
from finetunekit.models.groups import layer_groups
from finetunekit.optim import build_optimizer, build_scheduler, param_groups
from finetunekit.strategies import STRATEGIES, apply_phase, make_plan, set_train_mode

from conftest import run_cli


def _covers_every_parameter_once(backbone):
    groups = layer_groups(backbone)
    names = [n for g in groups for n in g.params]
    assert sorted(names) == sorted(n for n, _ in backbone.module.named_parameters())
    assert len(names) == len(set(names))
    assert groups[-1].is_head and all(backbone.is_head(n) for n in groups[-1].params)
    return groups


def test_layer_groups_timm_follow_its_group_matcher():
    groups = _covers_every_parameter_once(create_backbone("efficientnet_lite0", 3, pretrained=False))
    assert groups[0].params[0] == "conv_stem.weight" and groups[1].name == "blocks.0"
    assert len(groups) == 9


def test_layer_groups_torchvision_follow_module_order():
    groups = _covers_every_parameter_once(create_backbone("torchvision:resnet18", 3, pretrained=False))
    assert [g.name for g in groups] == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "head"]


def test_layer_groups_transformers_embeddings_layers_pooler():
    from finetunekit.models import create_text_backbone

    backbone = create_text_backbone("minilm", ["a", "b"], "classification", pretrained=False)
    groups = _covers_every_parameter_once(backbone)
    assert [g.name for g in groups] == (["bert.embeddings"] + [f"bert.encoder.layer.{i}" for i in range(6)]
                                        + ["bert.pooler", "head"])


def _batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_phase_changes_exactly_its_parameters(strategy):
    """One optimizer over every parameter, built once; each phase trains exactly its own set (weight decay
    never touches a frozen tensor) and frozen modules keep their BatchNorm statistics."""
    torch.manual_seed(0)
    backbone = create_backbone("timm:test_efficientnet", 3, pretrained=False)
    module = backbone.module
    plan = make_plan(strategy, backbone, epochs=4, head_epochs=2 if strategy in ("freeze-unfreeze", "lp-ft")
                     else None)
    optimizer = build_optimizer(backbone, 1e-2, weight_decay=0.05)
    scheduler = build_scheduler(optimizer, kind="cosine", epochs=4, updates_per_epoch=3, warmup_epochs=1,
                                min_lr_ratio=0.01)
    n_groups = len(optimizer.param_groups)
    updates = 0
    for epoch in range(4):
        phase = plan.phase_at(epoch)
        apply_phase(phase, module, optimizer)
        set_train_mode(module)
        params = {n: p.detach().clone() for n, p in module.named_parameters()}
        buffers = {n: b.detach().clone() for n, b in module.named_buffers() if "running_mean" in n}
        for x, y in _batches(seed=epoch):
            F.cross_entropy(module(x), y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            updates += 1
            scheduler.step_update(updates)
        changed = {n for n, p in module.named_parameters() if not torch.equal(p, params[n])}
        assert changed == set(phase.trainable), (strategy, epoch, sorted(changed ^ set(phase.trainable))[:5])
        for n, b in module.named_buffers():
            if n in buffers:
                owner = n.rsplit(".", 1)[0]
                frozen = not any(p.requires_grad for p in module.get_submodule(owner).parameters())
                assert torch.equal(b, buffers[n]) == frozen, (strategy, epoch, n)
    assert len(optimizer.param_groups) == n_groups, "a phase added param groups the scheduler never saw"


def test_phases_of_the_staged_strategies():
    backbone = create_backbone("timm:test_efficientnet", 3, pretrained=False)
    head = set(backbone.head_parameter_names())
    everything = {n for n, _ in backbone.module.named_parameters()}
    fu = make_plan("freeze-unfreeze", backbone, epochs=5)
    assert [(p.start_epoch, p.trainable == head, p.lr_mult) for p in fu.phases] == [(0, True, 10.0), (1, False, 1.0)]
    assert fu.phases[1].trainable == everything
    lpft = make_plan("lp-ft", backbone, epochs=6)
    assert [p.start_epoch for p in lpft.phases] == [0, 3]
    gradual = make_plan("gradual", backbone, epochs=6, unfreeze_every=2)
    assert [p.start_epoch for p in gradual.phases] == [0, 2, 4]
    assert [p.lr_mult for p in gradual.phases] == [10.0, 1.0, 1.0]  # the head alone at 10x, like fastai
    sizes = [len(p.trainable) for p in gradual.phases]
    assert sizes == sorted(sizes) and sizes[0] == len(head)
    top = layer_groups(backbone)[-2]
    assert set(top.params) <= gradual.phases[1].trainable
    bitfit = make_plan("bitfit", backbone, epochs=1).phases[0].trainable
    assert bitfit - head and all(n.endswith("bias") for n in bitfit - head)
    norm = make_plan("norm-head", backbone, epochs=1).phases[0].trainable
    assert norm - head and all(n.split(".")[-2].startswith("bn") for n in norm - head)


def test_freeze_patterns_and_types():
    backbone = create_backbone("timm:test_vit", 3, pretrained=False)
    plan = make_plan("full", backbone, epochs=1, freeze="patch_embed*,pos_embed", freeze_types="norm")
    trainable = plan.phases[0].trainable
    names = {n for n, _ in backbone.module.named_parameters()}
    frozen = names - trainable
    assert {"pos_embed", "patch_embed.proj.weight", "blocks.0.norm1.weight", "norm.bias"} <= frozen
    assert "blocks.0.attn.qkv.weight" in trainable and backbone.head_parameter_names() <= trainable
    with pytest.raises(UserError, match="--freeze nothing\\*: matches no parameter"):
        make_plan("full", backbone, epochs=1, freeze="nothing*")
    with pytest.raises(UserError, match="--freeze-types norms: expected some of norm"):
        make_plan("full", backbone, epochs=1, freeze_types="norms")
    with pytest.raises(UserError, match="--head-epochs 3: must be less than --epochs 3"):
        make_plan("lp-ft", backbone, epochs=3, head_epochs=3)


def test_layer_decay_head_multiplier_and_no_decay_groups():
    backbone = create_backbone("timm:test_efficientnet", 3, pretrained=False)
    groups = layer_groups(backbone)
    optimizer = build_optimizer(backbone, 1e-2, weight_decay=0.05, layer_decay=0.5, head_lr_mult=10)
    scheduler = build_scheduler(optimizer, kind="linear", epochs=1, updates_per_epoch=10, warmup_epochs=0,
                                min_lr_ratio=0.0)
    scheduler.step_update(0)
    lrs = {g["group"]: g["lr"] for g in optimizer.param_groups}
    n = len(groups)
    for i, g in enumerate(groups[:-1]):
        assert lrs[g.name] == pytest.approx(1e-2 * 0.5 ** (n - 1 - i))
    assert lrs["head"] == pytest.approx(1e-2 * 10)
    for g in optimizer.param_groups:
        if g["weight_decay"]:
            assert all(p.ndim > 1 for p in g["params"])


def test_embeddings_get_no_weight_decay():
    from finetunekit.models import create_text_backbone

    backbone = create_text_backbone("minilm", ["a", "b"], "classification", pretrained=False)
    word = backbone.module.get_input_embeddings().weight
    decayed = [p for g in param_groups(backbone, 0.01) if g["weight_decay"] for p in g["params"]]
    assert not any(p is word for p in decayed)
    assert any(p is backbone.module.classifier.weight for p in decayed)


def test_inspect_prints_groups_and_when_they_train():
    r = run_cli("inspect", "efficientnet_lite0", "--strategy", "gradual", "--epochs", "3")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "9 layer groups" in lines[0]
    assert lines[-2].split()[1] == "head" and "epoch 1" in lines[-2]
    assert "frozen" in r.stdout and "epoch 3" in r.stdout
    r = run_cli("inspect", "efficientnet_lite0", "--strategy", "lp-f")
    assert r.returncode == 2 and "did you mean 'lp-ft'" in r.stderr


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd", "nesterov", "rmsprop", "lamb", "lars"])
def test_every_optimizer_keeps_groups_and_leaves_frozen_tensors_alone(name):
    from finetunekit.optim import OPTIMIZERS

    assert name in OPTIMIZERS
    torch.manual_seed(0)
    backbone = create_backbone("timm:test_efficientnet", 3, pretrained=False)
    plan = make_plan("freeze-unfreeze", backbone, epochs=2)
    optimizer = build_optimizer(backbone, 1e-2, weight_decay=0.05, name=name)
    assert len(optimizer.param_groups) == len(param_groups(backbone, 0.05))
    assert all("lr_scale" in g for g in optimizer.param_groups)
    apply_phase(plan.phases[0], backbone.module, optimizer)
    before = {n: p.detach().clone() for n, p in backbone.module.named_parameters()}
    x, y = _batches(1)[0]
    F.cross_entropy(backbone.module(x), y).backward()
    optimizer.step()
    changed = {n for n, p in backbone.module.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(plan.phases[0].trainable)


def _lrs(kind: str, metrics=None, epochs=6, **kw):
    backbone = create_backbone("timm:test_efficientnet", 3, pretrained=False)
    optimizer = build_optimizer(backbone, 1.0, weight_decay=0.0)
    scheduler = build_scheduler(optimizer, kind=kind, epochs=epochs, updates_per_epoch=10, warmup_epochs=1,
                                min_lr_ratio=0.01, **kw)
    out, updates = [], 0
    for epoch in range(epochs):
        for _ in range(10):
            updates += 1
            scheduler.step_update(updates)
        out.append(round(optimizer.param_groups[-1]["lr"], 3))
        scheduler.step(epoch + 1, metric=(metrics or [0.0] * epochs)[epoch])
    return out, scheduler


def test_schedules_have_their_shapes():
    assert _lrs("cosine")[0] == [1.0, 0.905, 0.658, 0.352, 0.105, 0.01]
    assert _lrs("linear")[0] == [1.0, 0.802, 0.604, 0.406, 0.208, 0.01]
    assert _lrs("step")[0] == [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    assert _lrs("constant")[0] == [1.0] * 6
    restarts = _lrs("cosine-restarts", restart_epochs=2)[0]
    assert restarts[0] == restarts[2] == restarts[4] == 1.0 and restarts[1] < 0.6
    plateau, scheduler = _lrs("plateau", metrics=[0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.7, 0.7], epochs=8)
    assert plateau == [1.0, 1.0, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    state = scheduler.state_dict()
    assert all(isinstance(v, (int, float)) for v in state.values())  # checkpointable as JSON
    assert state["scale"] == pytest.approx(0.01)


def test_early_stopping_patience_and_min_delta():
    from finetunekit.loop import EarlyStopping, _score

    def epochs_run(accuracies, patience, min_delta=0.0):
        stopper = EarlyStopping(patience, min_delta)
        for i, acc in enumerate(accuracies):
            if stopper.update(_score("accuracy", {"accuracy": acc, "loss": 1.0})):
                return i + 1
        return len(accuracies)

    assert epochs_run([0.5, 0.6, 0.6, 0.6, 0.7], patience=2) == 4
    assert epochs_run([0.5, 0.6, 0.6, 0.7, 0.7], patience=2) == 5
    # +0.005 per epoch: an improvement, but not by more than min_delta 0.01
    assert epochs_run([0.5, 0.505, 0.51, 0.515, 0.52], patience=2, min_delta=0.01) == 3
    assert epochs_run([0.5, 0.52, 0.54, 0.56], patience=2, min_delta=0.01) == 4
    assert epochs_run([0.5, 0.4, 0.3, 0.2], patience=None) == 4
    # lower-is-better metrics: rmse falling counts as progress
    stopper = EarlyStopping(1)
    assert not stopper.update(_score("rmse", {"rmse": 2.0, "loss": 1.0}))
    assert not stopper.update(_score("rmse", {"rmse": 1.0, "loss": 1.0}))
    assert stopper.update(_score("rmse", {"rmse": 1.5, "loss": 1.0}))


def test_drop_path_reaches_the_model_or_is_refused():
    backbone = create_backbone("efficientnet_lite0", 3, pretrained=False, drop_path=0.2)
    rates = [m.drop_prob for m in backbone.module.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.2, abs=0.02)
    with pytest.raises(UserError, match="--drop-path: torchvision's resnet18 has no stochastic depth"):
        create_backbone("torchvision:resnet18", 3, pretrained=False, drop_path=0.1)


def test_lr_find_writes_the_curve_and_a_suggestion(cifar_subset, tmp_path):
    import csv
    import xml.etree.ElementTree as ET

    out = tmp_path / "lrf"
    r = run_cli("lr-find", "--data", str(cifar_subset["train"]), "--model", "timm:test_efficientnet",
                "--no-pretrained", "--image-size", "32", "--augment", "none", "--batch-size", "16", "--steps", "30",
                "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader((out / "lr_find.csv").open()))
    lrs = [float(x["lr"]) for x in rows]
    assert len(rows) >= 10 and lrs == sorted(lrs) and lrs[0] == pytest.approx(1e-7)
    lowest = lrs[min(range(len(rows)), key=lambda i: float(rows[i]["smoothed_loss"]))]
    suggested = float(r.stdout.split("suggested lr:")[1].split()[0])
    assert suggested == pytest.approx(lowest / 10, rel=0.01)
    assert ET.parse(out / "lr_find.svg").getroot().tag.endswith("svg")
    again = run_cli("lr-find", "--data", str(cifar_subset["train"]), "--out", str(out))
    assert again.returncode == 2 and "already holds an lr-find result" in again.stderr


def test_default_lr_follows_strategy_batch_and_optimizer():
    from finetunekit.optim import default_lr

    assert default_lr("image", "full", 64) == pytest.approx(1e-3)
    assert default_lr("image", "full", 32) == pytest.approx(5e-4)
    assert default_lr("image", "gradual", 64) == default_lr("image", "full", 64)  # its head phase scales 10x
    for strategy in ("linear-probe", "bitfit", "norm-head"):  # few tensors train: 10x
        assert default_lr("image", strategy, 64) == pytest.approx(1e-2)
    assert default_lr("text", "bitfit", 32) == pytest.approx(5e-4)
    assert default_lr("image", "full", 64, "nesterov") == pytest.approx(1e-2)


def _relative_change(name: str, steps: int = 10) -> tuple[float, float]:
    """(backbone, head) relative weight change after `steps` updates at the optimizer's default lr."""
    from finetunekit.optim import default_lr

    torch.manual_seed(0)
    backbone = create_backbone("timm:test_efficientnet", 3, pretrained=False)
    before = {n: p.detach().clone() for n, p in backbone.module.named_parameters()}
    optimizer = build_optimizer(backbone, default_lr("image", "full", 32, name), 0.05, name=name)
    for g in optimizer.param_groups:
        g["lr"] *= g["lr_scale"]  # as the scheduler applies it
    x, y = _batches(1)[0]
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(backbone.module(x), y).backward()
        optimizer.step()

    def change(head: bool) -> float:
        names = [n for n in before if backbone.is_head(n) == head]
        params = dict(backbone.module.named_parameters())
        return math.sqrt(sum((params[n] - before[n]).pow(2).sum().item() for n in names)
                         / sum(before[n].pow(2).sum().item() for n in names))
    return change(False), change(True)


def test_lars_at_its_default_lr_moves_the_weights():
    """The audit's finding: LARS moved the weights 7.7e-5 against AdamW's 0.10. Its lr now accounts for the
    trust coefficient, and the new head (tiny norm: LARS would freeze it) trains by plain momentum SGD."""
    adamw_body, adamw_head = _relative_change("adamw")
    lars_body, lars_head = _relative_change("lars")
    assert 0.1 < lars_body / adamw_body < 2  # the audit measured 7.7e-5 against 0.10: a ratio of 0.0008
    assert lars_head > adamw_head / 2
    from finetunekit.optim import default_lr
    assert default_lr("image", "full", 64, "lars") == pytest.approx(0.1)  # 1e-3 x 10 (SGD) x 10
