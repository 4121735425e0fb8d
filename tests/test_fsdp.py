"""`--fsdp`: the model sharded with torch's FSDP2 over two CPU processes (gloo), against one unsharded process.

Marker `distributed` on every test that starts several processes (`make test-distributed`); the checks at the end
run in one process, in the default suite. The helpers, data and tiny model are test_distributed.py's: timm's test
ViT (no BatchNorm, no dropout), 64 CIFAR-10-mini training images, 21 validation images, momentum SGD.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from test_distributed import PARITY, SGD, _final, _fit_args, _max_diff, _metrics, images, one, torchrun  # noqa: F401
from conftest import CIFAR

STRATEGIES = {"full": (), "freeze-unfreeze": (), "lp-ft": ("--head-epochs", "1")}


def _logits(run, val) -> torch.Tensor:
    """The logits of the run's model folder, loaded in this process by finetunekit.load, on the 21 validation
    images."""
    import finetunekit

    paths = [line.split(",")[0] for line in val.read_text().splitlines()[1:]]
    return finetunekit.load(run).logits(paths).double()


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_fsdp_in_two_processes_matches_one_unsharded_process(images, tmp_path, strategy):
    """(a, b) `--fsdp` in two processes (batch 8 each) against one unsharded process (batch 16): the final
    weights within PARITY, through every phase change of the strategy; (e) each process holds about half of
    the parameters; (c) the model folder process 0 wrote from the gathered shards loads in one process and
    predicts what the unsharded run's folder predicts."""
    extra = ("--strategy", strategy, *STRATEGIES[strategy], *SGD)
    two = torchrun(*_fit_args(images, tmp_path / "two", 8, "--fsdp", *extra))
    assert two.returncode == 0, two.stderr[-3000:]
    single = one(*_fit_args(images, tmp_path / "one", 16, *extra))
    assert single.returncode == 0, single.stderr[-3000:]
    assert "--fsdp: the model sharded over 2 processes by torch's fully_shard" in two.stderr
    diff = _max_diff(_final(tmp_path / "two"), _final(tmp_path / "one"))
    print(f"{strategy}: max |param(2 processes, FSDP) - param(1 process)| = {diff:.3g}")
    assert diff < PARITY
    m2, m1 = _metrics(tmp_path / "two"), _metrics(tmp_path / "one")
    held = m2["processes"]
    assert held["count"] == 2 and held["sharded"] == "fsdp (fully_shard)" and "max_param_difference" not in held
    total = sum(p.numel() for p in load_file(str(tmp_path / "one" / "model" / "model.safetensors")).values())
    assert held["total"] == total and sum(held["per_process"]) == total
    print(f"{strategy}: parameters per process {held['per_process']} of {total}")
    assert all(abs(n - total / 2) < 0.05 * total for n in held["per_process"])  # each about half
    assert m2["best_epoch"] == m1["best_epoch"]
    assert m2["val"]["accuracy"] == m1["val"]["accuracy"]
    assert m2["val"]["loss"] == pytest.approx(m1["val"]["loss"], abs=1e-5)
    if strategy != "full":
        assert "training all parameters" in two.stderr or "down to" in two.stderr
    folder2 = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    assert _max_diff(folder2, load_file(str(tmp_path / "one" / "model" / "model.safetensors"))) < PARITY
    if m2["best_epoch"] == 2:  # the folder holds the final weights: exactly the last checkpoint's
        assert _max_diff(folder2, _final(tmp_path / "two")) == 0.0
    logits = _logits(tmp_path / "two", images["val"])
    assert (logits - _logits(tmp_path / "one", images["val"])).abs().max() < 1e-5


@pytest.mark.distributed
def test_fsdp_killed_then_resumed_reproduces_the_uninterrupted_run(images, tmp_path):
    """(d) kill -9 of process 1 mid-epoch 2 of a sharded freeze-unfreeze run, `--resume` in two processes: the
    final weights and the model folder are exactly the uninterrupted sharded run's. The checkpoint has the
    unsharded format: it also resumes in one process (--resume-force: the process count changed)."""
    args = lambda out, *more: _fit_args(images, out, 8, "--fsdp", "--strategy", "freeze-unfreeze",
                                        "--checkpoint-every", "2", "--augment", "strong", *more)
    reference = torchrun(*args(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    out = tmp_path / "run"
    killed = torchrun(*args(out), env={"FINETUNEKIT_FAULT": "batch@7", "FINETUNEKIT_FAULT_RANK": "1"})
    assert killed.returncode != 0
    assert (out / "checkpoints").is_dir()
    saved = tmp_path / "saved"
    shutil.copytree(out, saved)
    resumed = torchrun(*args(out, "--resume", str(out)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    assert _max_diff(_final(out), _final(tmp_path / "reference")) == 0.0
    assert (out / "model" / "model.safetensors").read_bytes() == \
        (tmp_path / "reference" / "model" / "model.safetensors").read_bytes()
    alone = one("fit", "--resume", str(saved), "--resume-force", "--quiet")
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert "resuming from" in alone.stderr and "--fsdp: one process, nothing to shard" in alone.stderr


# ---- one process, default suite ----

@pytest.mark.parametrize("extra, message", [
    (("--ema", "0.99"), "--fsdp: not with --ema (its average is a deep copy of the model"),
    (("--l1-penalty", "1e-4"), "--fsdp: not with --l1-penalty"),
    (("--qat",), "--fsdp: not with --qat"),
    (("--domain-adapt", "coral", "--target-data", str(CIFAR / "test" / "cat")), "--fsdp: not with --domain-adapt coral"),
])
def test_fsdp_refuses_what_does_not_work_sharded_in_one_line(images, tmp_path, extra, message):
    from conftest import cli

    code, _, err = cli(*_fit_args(images, tmp_path / "run", 8, "--fsdp", *extra))
    assert code == 2 and err.strip().count("\n") == 0, err
    assert message in err
    assert not (tmp_path / "run").exists()


def test_fsdp_in_one_process_trains_unsharded_and_sharded_configs_are_checked(caplog):
    from finetunekit.distributed import check_backend, shard_mode
    from finetunekit.errors import UserError

    class Kind:
        def __init__(self, value):
            self.value = value

    class Accelerator:
        num_processes = 1
        distributed_type = Kind("NO")

        class state:
            class fsdp_plugin:
                fsdp_version = 1

    with caplog.at_level("INFO", logger="finetunekit"):
        assert shard_mode(Accelerator(), True) is None
    assert "--fsdp: one process, nothing to shard: the model trains unsharded" in caplog.text
    assert shard_mode(Accelerator(), False) is None
    Accelerator.num_processes = 2
    Accelerator.distributed_type = Kind("MULTI_CPU")
    assert shard_mode(Accelerator(), True) == "fully_shard" and shard_mode(Accelerator(), False) is None
    Accelerator.distributed_type = Kind("FSDP")
    with pytest.raises(UserError, match="fsdp_version 1: finetunekit shards with FSDP2 only"):
        check_backend(Accelerator())
    Accelerator.state.fsdp_plugin.fsdp_version = 2
    check_backend(Accelerator())
    assert shard_mode(Accelerator(), False) == "accelerate"
    for kind in ("DEEPSPEED", "MEGATRON_LM"):
        Accelerator.distributed_type = Kind(kind)
        with pytest.raises(UserError, match=f"distributed_type {kind}: not supported by finetunekit .* use --fsdp"):
            check_backend(Accelerator())


def test_fsdp_units_are_the_layer_groups_that_are_one_submodule():
    from finetunekit.models import create_backbone
    from finetunekit.sharding import units

    backbone = create_backbone("timm:test_vit", 3, pretrained=False)
    names = [n for n, _ in units(backbone.module, backbone.adapter.layer_groups(backbone))]
    assert names == ["blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4", "head"]  # blocks.5 + norm: root


def test_on_gpus_accelerate_wraps_the_blocks_and_process_0_keeps_a_weightless_skeleton():
    """The GPU path's preparation (accelerate's FSDP2 plugin shards in prepare; not run here, no GPU): timm's
    blocks become the transformer-based wrap policy's classes (not the head's Linear, which would wrap every
    Linear), and process 0's copy of the model for the model folder holds no weights until an export."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    from finetunekit.models import create_backbone
    from finetunekit.sharding import for_accelerate

    class Accelerator:
        is_main_process = True

        class state:
            fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")

    backbone = create_backbone("timm:test_vit", 3, pretrained=False)
    shards = for_accelerate(Accelerator(), backbone.module, backbone.adapter.layer_groups(backbone))
    assert Accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap == ["Block"]
    assert shards.engine == "accelerate" and type(shards.skeleton) is type(backbone.module)
    assert all(p.is_meta for p in shards.skeleton.parameters())
    assert not any(p.is_meta for p in backbone.module.parameters())
