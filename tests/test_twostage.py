"""`--init RUN` (two-stage transfer, finetunekit/twostage.py) on tiny real runs (timm's test_efficientnet, 32 px,
CIFAR images): the weights a stage-2 run starts from, tensor for tensor; the head kept or new; the record in
recipe.yaml and metrics.json; cached features keyed on the init weights; --resume; the one-line refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import CIFAR, cli, write_manifest

TINY = ("--model", "timm:test_efficientnet", "--image-size", "32", "--augment", "none", "--num-workers", "0",
        "--batch-size", "4", "--lr", "0.01", "--quiet")


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> dict:
    """Stage 1: a 1-epoch fit on cat/dog (8 images each); the manifests of a same-classes and a new-classes target."""
    if not CIFAR.is_dir():
        pytest.skip(f"{CIFAR} not found (the shared datasets sit beside the repo)")
    d = tmp_path_factory.mktemp("twostage")
    same = write_manifest(d / "same.csv", CIFAR / "train", 8, ["cat", "dog"])
    new = write_manifest(d / "new.csv", CIFAR / "train", 8, ["bird", "frog"])
    code, _, err = cli("fit", "--data", str(same), *TINY, "--no-pretrained", "--strategy", "full", "--epochs", "1", "--seed", "0",
                       "--out", str(d / "stage1"))
    assert code == 0, err
    return {"dir": d, "stage1": d / "stage1", "same": same, "new": new}


def _start(stages: dict, data: Path) -> tuple[dict, dict, dict, dict]:
    """What a stage-2 run on `data` starts from: (state before --init, after it, stage 1's saved state, the record)."""
    from finetunekit import twostage
    from finetunekit.config import build_recipe
    from finetunekit.inputs import prepare_inputs
    from finetunekit.models import load_folder

    recipe = twostage.resolve(build_recipe({"data": {"path": str(data), "image_size": 32, "augment": "none",
                                                     "num_workers": 0},
                                            "model": {"init": str(stages["stage1"])}}, {}))
    assert recipe.model.name == "timm:test_efficientnet" and recipe.model.pretrained is False
    torch.manual_seed(0)
    inputs = prepare_inputs(recipe.task, recipe.data, recipe.model, recipe.train, gpu=False)
    module = inputs.backbone.module
    before = {k: v.clone() for k, v in module.state_dict().items()}
    record = twostage.apply(recipe.model, inputs)
    saved = load_folder(stages["stage1"] / "model")[0].module.state_dict()
    return before, module.state_dict(), saved, {"record": record, "is_head": inputs.backbone.is_head,
                                                  "summary": inputs.summary, "extra": inputs.extra_config}


def test_same_classes_keep_the_head_every_tensor_equal_to_stage_1(stages):
    before, after, saved, info = _start(stages, stages["same"])
    assert set(after) == set(saved)
    assert all(torch.equal(after[k], saved[k]) for k in after)  # backbone, BatchNorm statistics and head
    head = [k for k in after if info["is_head"](k)]
    assert head == ["classifier.weight", "classifier.bias"]
    assert not torch.equal(before["classifier.weight"], saved["classifier.weight"])  # it was loaded, not equal anyway
    assert info["record"] == {"run": str(stages["stage1"].resolve()), "model": "timm:test_efficientnet",
                              "head": "kept", "classes": ["cat", "dog"]}
    assert info["summary"][-1] == (f"--init {stages['stage1']}: started from its fine-tuned weights "
                                   f"(timm:test_efficientnet); head kept (the same classes in the same order)")
    assert info["extra"]["init"] == {"run": str(stages["stage1"].resolve()), "head": "kept"}


def test_other_classes_get_a_new_head_on_stage_1_s_backbone(stages):
    before, after, saved, info = _start(stages, stages["new"])
    body = [k for k in after if not info["is_head"](k)]
    assert len(body) == len(after) - 2
    assert not torch.equal(before["conv_stem.weight"], saved["conv_stem.weight"])  # stage 1 trained its backbone
    assert all(torch.equal(after[k], saved[k]) for k in body)
    for k in ("classifier.weight", "classifier.bias"):  # the freshly initialized head, untouched
        assert torch.equal(after[k], before[k])
    assert not torch.equal(after["classifier.weight"], saved["classifier.weight"])
    assert info["record"]["head"] == "new"
    assert info["summary"][-1].endswith("head new (its 2 classes differ from these 2)")


def test_a_stage_2_fit_records_its_init_keys_features_on_its_weights_and_resumes(stages):
    d, new = stages["dir"], str(stages["new"])
    probe = ("--strategy", "linear-probe", "--seed", "0", "--epochs", "1")
    # the same model, unpretrained, same data and transform: features that a key without the weights would serve
    code, _, err = cli("fit", "--data", new, *TINY, *probe, "--no-pretrained", "--out", str(d / "plain"))
    assert code == 0, err
    auto = ("--strategy", "auto", "--seed", "0", "--epochs", "1")  # picks the probe, on the --init run's features
    code, _, err = cli("fit", "--data", new, *TINY, *auto, "--init", str(stages["stage1"]), "--out", str(d / "b"))
    assert code == 0, err
    log = (d / "b" / "log.txt").read_text()
    assert "strategy auto -> linear-probe: 7 samples per class at 32 px" in log, log
    assert f"few enough that the features of --init {stages['stage1'].resolve()} with a new head" in log
    assert "features (train and val, pooled): 16 x 256, computed in" in log and "read from the cache" not in log
    assert "head new (its 2 classes differ from these 2)" in log
    metrics = json.loads((d / "b" / "metrics.json").read_text())
    assert metrics["init"] == {"run": str(stages["stage1"].resolve()), "model": "timm:test_efficientnet",
                               "head": "new", "classes": ["cat", "dog"]}
    recipe = (d / "b" / "recipe.yaml").read_text()
    assert f"init: {stages['stage1'].resolve()}" in recipe and "name: timm:test_efficientnet" in recipe
    config = json.loads((d / "b" / "model" / "config.json").read_text())
    assert config["finetunekit"]["init"] == {"run": str(stages["stage1"].resolve()), "head": "new"}
    # --resume: the saved recipe (init and model) passes its checks again; the checkpoint's weights win
    code, _, err = cli("fit", "--resume", str(d / "b"), "--epochs", "2", "--resume-force")
    assert code == 0, err
    resumed = json.loads((d / "b" / "metrics.json").read_text())
    assert resumed["epochs_run"] == 2 and "resumed_from" in resumed and resumed["init"]["head"] == "new"


@pytest.mark.parametrize("extra, expected", [
    (("--model", "efficientnet_lite0"), "--model efficientnet_lite0: --init {s} was fine-tuned from --model "
                                        "timm:test_efficientnet; drop --model (--init takes its model)"),
    (("--task", "image-multilabel"), "--init {s}: fine-tuned for --task image-classification, not --task "
                                     "image-multilabel (the same task is needed)"),
    (("--weights", "{s}/model/model.safetensors"), "--weights: not with --init (it starts from {s}'s weights)"),
])
def test_conflicts_are_one_line_exit_2(stages, extra, expected):
    s = str(stages["stage1"])
    code, out, err = cli("fit", "--data", str(stages["same"]), "--init", s, *[e.format(s=s) for e in extra],
                         "--out", str(stages["dir"] / "never"))
    assert code == 2 and err == f"finetunekit: error: {expected.format(s=s)}\n"
    assert not (stages["dir"] / "never").exists()


def test_folders_that_are_not_a_whole_finetunekit_model_are_refused(stages, tmp_path):
    data = str(stages["same"])
    code, _, err = cli("fit", "--data", data, "--init", str(tmp_path))
    assert code == 2 and err == f"finetunekit: error: --init {tmp_path}: not a finetunekit run or model folder (no " \
                                f"model/config.json)\n"
    peft = tmp_path / "peft"
    shutil.copytree(stages["stage1"] / "model", peft)
    config = json.loads((peft / "config.json").read_text())
    config["finetunekit"]["peft"] = {"method": "lora"}
    (peft / "config.json").write_text(json.dumps(config))
    code, _, err = cli("fit", "--data", data, "--init", str(peft))
    assert code == 2 and err.startswith(f"finetunekit: error: --init {peft}: a --peft run (its folder holds the "
                                        f"adapter alone)")
