"""`--peft`: LoRA, DoRA, IA3 and prompt tuning with the peft library on tiny models (a 2-layer BERT, timm's
test_vit and test_efficientnet, torchvision's resnet18): the targets discovered, the trainable counts, the
strategies' phases, gradients under gradient checkpointing, the adapter folder (small, loadable with plain
peft, predict and evaluate), merging (logits agree, plain timm/transformers load the result, which never
reloads as an adapter), and the one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import finetunekit
from finetunekit import UserError
from finetunekit.models import create_backbone, create_text_backbone
from finetunekit.peft_methods import PeftOptions, apply, discover, match, patterns, require_input_grads

from conftest import CIFAR, cli, torch_threads, write_manifest
from test_adapters import tiny_vit  # noqa: F401 - a fixture
from test_text import tiny_bert, write_sentiment  # noqa: F401 - a fixture and a data writer

BASE = {"model": "test", "pretrained": False, "weights": None, "trust_remote_code": False}
CLASSES = ["airplane", "cat", "dog"]
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "config.json"]
TEXTS = ["the movie was great", "a boring and awful film", "really quite good"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):  # tiny runs: one intra-op thread is as fast and spares shared cores
        yield


def _bert(folder: Path, labels=("negative", "positive")):
    return create_text_backbone(f"hf:{folder}", list(labels), "classification")


def _vit(classes: int = 3, size: int = 32):
    torch.manual_seed(0)
    return create_backbone("timm:test_vit", classes, pretrained=False, image_size=size)


def _trainable(module) -> dict[str, int]:
    return {n: p.numel() for n, p in module.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def vit_weights(tmp_path_factory) -> Path:
    """timm's test_vit with seeded random weights, as a --weights file: a base a folder can rebuild."""
    torch.manual_seed(0)
    import timm

    path = tmp_path_factory.mktemp("vit") / "test_vit.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_vit", num_classes=3).state_dict().items()},
              str(path))
    return path


@pytest.fixture(scope="module")
def few_images(tmp_path_factory) -> Path:
    if not CIFAR.is_dir():
        pytest.skip(f"{CIFAR} not found")
    return write_manifest(tmp_path_factory.mktemp("few") / "train.csv", CIFAR / "train", 4, CLASSES)


# 1. targets, trainable parameters, phases: no training

@pytest.mark.parametrize("spec, expected, count", [
    ("timm:test_vit", ["blocks.*.attn.qkv", "blocks.*.mlp.fc1", "blocks.*.mlp.fc2"], 18),
    # depthwise convolutions (groups > 1) left out: peft cannot merge them
    ("timm:test_efficientnet", ["conv_stem", "blocks.*.*.conv", "blocks.*.*.conv_exp", "blocks.*.*.conv_pwl",
                                "blocks.*.*.conv_pw", "blocks.*.*.se.conv_reduce", "blocks.*.*.se.conv_expand",
                                "conv_head"], 15),
    ("torchvision:resnet18", ["conv1", "layer1.*.conv1", "layer1.*.conv2", "layer2.*.conv1", "layer2.*.conv2",
                              "layer2.*.downsample.*", "layer3.*.conv1", "layer3.*.conv2", "layer3.*.downsample.*",
                              "layer4.*.conv1", "layer4.*.conv2", "layer4.*.downsample.*"], 20),
])
def test_discovered_targets_of_images(spec, expected, count):
    backbone = create_backbone(spec, 3, pretrained=False, image_size=32)
    found = discover(backbone)
    assert patterns(found) == expected and len(found) == count
    assert not any(backbone.is_head(n) for n in found)


def test_discovered_targets_of_text_and_the_head_left_out(tiny_bert):
    backbone = _bert(tiny_bert)
    found = discover(backbone)
    assert patterns(found) == [f"bert.encoder.layer.*.{m}" for m in (
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "intermediate.dense", "output.dense")]  # not the pooler, never the classifier
    assert match(backbone, ("query", "value")) == [f"bert.encoder.layer.{i}.attention.self.{m}"
                                                   for i in (0, 1) for m in ("query", "value")]
    with pytest.raises(UserError, match=r"^--lora-targets classifier: matches the head classifier"):
        match(backbone, ("classifier",))
    with pytest.raises(UserError, match=r"^--lora-targets qkv: matches no module of BertForSequenceClassification"):
        match(backbone, ("qkv",))


@pytest.mark.parametrize("method, trainable", [
    # 2 layers x 6 Linear layers: 32 -> 32 (q, k, v, o), 32 -> 64 -> 32 (fc1, fc2); + the head 32 x 3 + 3
    ("lora", 2 * (4 * 4 * (32 + 32) + 2 * 4 * (32 + 64)) + 32 * 3 + 3),
    ("dora", 2 * (4 * 4 * (32 + 32) + 2 * 4 * (32 + 64)) + 2 * (4 * 32 + 64 + 32) + 32 * 3 + 3),
])
def test_hf_image_models_take_lora_and_dora(tiny_vit, method, trainable):
    backbone = create_backbone(f"hf:{tiny_vit}", 3, pretrained=True, image_size=32, labels=CLASSES)
    apply(backbone, PeftOptions(method, r=4), BASE)
    assert patterns(backbone.peft.targets) == [f"vit.layers.*.{m}" for m in (
        "attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2")]
    assert sum(_trainable(backbone.module).values()) == trainable


@pytest.mark.parametrize("method, trainable", [
    # 2 layers x (4 x 8 x (32 + 32) + 8 x (32 + 64) x 2) = 7,168, + the head 32 x 2 + 2
    ("lora", 7_234),
    ("dora", 7_234 + 2 * (4 * 32 + 64 + 32)),  # + a magnitude per output of each target
    ("ia3", 2 * (32 + 32 + 32 + 64) + 66),  # key, value (outputs), attention.output.dense and output.dense (inputs)
    ("prompt", 5 * 32 + 66),  # 5 tokens of 32
])
def test_trainable_parameters_of_each_method_on_a_tiny_bert(tiny_bert, method, trainable):
    backbone = _bert(tiny_bert)
    base = {n: p.detach().clone() for n, p in backbone.module.named_parameters()}
    line = apply(backbone, PeftOptions(method, r=8, prompt_tokens=5), BASE)
    counts = _trainable(backbone.module)
    assert sum(counts.values()) == trainable and f"{trainable:,} trainable parameters" in line
    assert backbone.peft.trainable == set(counts) and all(backbone.is_head(n) for n in backbone.head_parameter_names())
    assert {n for n in counts if backbone.is_head(n)}  # the head trains (peft's trained copy) ...
    assert not any("original_module" in n for n in counts)  # ... never the head it replaces
    assert not any(n in base or n.removeprefix("base_model.") in base for n in counts)  # no base weight trains


def test_strategies_train_adapters_never_base_weights(tiny_bert):
    from finetunekit.strategies import make_plan

    backbone = _bert(tiny_bert)
    apply(backbone, PeftOptions("lora", r=4), BASE)
    adapters = {n for n in backbone.peft.trainable if not backbone.is_head(n)}
    head = backbone.peft.trainable - adapters
    assert head == {"classifier.modules_to_save.default.weight", "classifier.modules_to_save.default.bias"}
    full = make_plan("full", backbone, 3).phases
    assert [p.trainable for p in full] == [backbone.peft.trainable]
    staged = make_plan("freeze-unfreeze", backbone, 3).phases
    assert [(p.trainable, p.lr_mult) for p in staged] == [(head, 1.0), (backbone.peft.trainable, 1.0)]
    gradual = make_plan("gradual", backbone, 4).phases
    top = {n for n in adapters if n.startswith("bert.encoder.layer.1.")}
    assert gradual[0].trainable == head and gradual[1].trainable == head | top
    assert all(p.trainable <= backbone.peft.trainable for p in gradual)
    frozen = make_plan("full", backbone, 3, freeze_layers=1).phases[0].trainable  # --freeze-layers: their adapters
    assert frozen == backbone.peft.trainable - {n for n in adapters if n.startswith("bert.encoder.layer.0.")}


def test_default_lr_is_ten_times_the_full_one():
    from finetunekit.optim import default_lr

    assert default_lr("text", "full", 64, peft=True) == pytest.approx(2e-3)
    assert default_lr("image", "freeze-unfreeze", 32, peft=True) == pytest.approx(5e-3)


def _backward(module, x):
    module.train()
    out = module(x) if isinstance(x, torch.Tensor) else module(**x)
    getattr(out, "logits", out).square().sum().backward()


def test_adapter_gradients_under_gradient_checkpointing(tiny_bert):
    """With every base weight frozen, reentrant checkpointing passes no gradient into a block unless the
    first layer's output requires one (require_input_grads); the adapters inside then train."""
    from timm.layers import set_reentrant_ckpt

    def lora_b_grads(backbone):
        return [p.grad for n, p in backbone.module.named_parameters() if "lora_B" in n]

    set_reentrant_ckpt(True)
    try:
        for fixed in (False, True):
            backbone = _vit()
            apply(backbone, PeftOptions("lora", r=4), BASE)
            backbone.adapter.set_grad_checkpointing(backbone, True)
            if fixed:
                require_input_grads(backbone)
            with pytest.warns(UserWarning) if not fixed else _nothing():
                _backward(backbone.module, torch.randn(2, 3, 32, 32))
            grads = lora_b_grads(backbone)
            if fixed:
                assert len(grads) == 18 and all(g is not None and g.abs().sum() > 0 for g in grads)
            else:
                assert all(g is None for g in grads)  # the bug the hook fixes
    finally:
        set_reentrant_ckpt(False)
    # transformers (non-reentrant), through the add-on as a run uses it
    from finetunekit.addons import ADDONS

    backbone = _bert(tiny_bert)
    apply(backbone, PeftOptions("lora", r=4), BASE)
    ADDONS["grad-checkpointing"](backbone).wrap_model(backbone.module)
    assert backbone.module.is_activation_checkpointing
    ids = torch.randint(1000, 2000, (2, 7))
    _backward(backbone.module, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    grads = [p.grad for n, p in backbone.module.named_parameters() if "lora_B" in n]
    assert len(grads) == 12 and all(g is not None and g.abs().sum() > 0 for g in grads)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# 2. text runs: LoRA end to end (the adapter folder, plain peft, predict, evaluate, merge), prompt tuning

@pytest.fixture(scope="module")
def lora_run(tiny_bert, tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    data, test = write_sentiment(d / "train.csv", 64, 0), write_sentiment(d / "test.csv", 24, 2)
    run = finetunekit.fit({"task": "text-classification", "quiet": True, "out": str(d / "run"),
                           "data": {"path": str(data), "test": str(test)},
                           "model": {"name": f"hf:{tiny_bert}", "peft": "lora"},
                           "train": {"epochs": 2, "batch_size": 16, "seed": 0, "merge": True, "ema": 0.9}})
    return {"run": run.run_dir, "metrics": run.metrics, "data": data, "test": test, "dir": d}


def _plain_peft_logits(bert: Path, folder: Path) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = AutoModelForSequenceClassification.from_pretrained(bert, num_labels=2)
    model = PeftModel.from_pretrained(base, folder).eval()
    enc = AutoTokenizer.from_pretrained(bert)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits


def test_the_adapter_folder_is_small_and_plain_peft_loads_it(lora_run, tiny_bert):
    run, folder = lora_run["run"], lora_run["run"] / "model"
    assert sorted(p.name for p in folder.iterdir()) == ADAPTER_FILES
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert sum(t.numel() for t in tensors.values()) == 7_234  # the adapters and the head, nothing else
    assert all(k.startswith("base_model.model.bert.encoder.layer.") or k.startswith("base_model.model.classifier.")
               for k in tensors)
    assert sum(p.stat().st_size for p in folder.iterdir()) < 40_000
    peft = json.loads((folder / "config.json").read_text())["finetunekit"]["peft"]
    assert peft["method"] == "lora" and peft["r"] == 8 and peft["alpha"] == 16 and len(peft["targets"]) == 12
    assert peft["base"]["model"] == f"hf:{tiny_bert}" and len(peft["base"]["sha256"]) == 64
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    assert recipe["train"]["lr"] == pytest.approx(2e-3 * 16 / 64)  # the --peft default, resolved and recorded
    assert recipe["train"]["strategy"] == "full"
    ours = finetunekit.load(run)
    mine = ours.logits([(t,) for t in TEXTS])
    assert torch.allclose(_plain_peft_logits(tiny_bert, folder), mine, atol=1e-6)
    assert [p["label"] for p in ours.predict(TEXTS)] == [p["label"] for p in finetunekit.load(folder).predict(TEXTS)]


def test_predict_and_evaluate_on_the_adapter_run(lora_run):
    code, out, err = cli("predict", str(lora_run["run"]), "--text", TEXTS[0], "--format", "json")
    assert code == 0, err
    assert json.loads(out)[0]["label"] in ("negative", "positive")
    metrics = finetunekit.evaluate(lora_run["run"], lora_run["data"])
    assert 0 <= metrics["accuracy"] <= 1 and metrics["skipped"] == 0
    # the run scored its test set with the adapter folder's weights put back into the live model: the same
    tested = finetunekit.evaluate(lora_run["run"], lora_run["test"])
    assert tested["loss"] == pytest.approx(lora_run["metrics"]["test"]["loss"], abs=1e-6)


def test_merged_folder_is_ordinary_and_agrees(lora_run, tiny_bert, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run = lora_run["run"]
    merged = run / "merged"  # written by fit --merge
    assert lora_run["metrics"]["merged"]["max_logit_difference"] < 1e-5
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    plain = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    enc = AutoTokenizer.from_pretrained(merged)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = plain(**enc).logits
    assert torch.allclose(theirs, finetunekit.load(run).logits([(t,) for t in TEXTS]), atol=1e-5)
    reloaded = finetunekit.load(merged)
    assert reloaded.backbone.peft is None and not any("lora" in n for n, _ in reloaded.module.named_parameters())
    config = json.loads((merged / "config.json").read_text())["finetunekit"]
    assert "peft" not in config and config["merged_from"]["method"] == "lora"
    # the same through `finetunekit export --merge`
    code, out, err = cli("export", str(run), "--merge", "--out", str(tmp_path / "m"))
    assert code == 0 and "merged (lora)" in out, err
    again = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert again.keys() == load_file(str(merged / "model.safetensors")).keys()
    code, _, err = cli("export", str(run), "--merge", "--out", str(tmp_path / "m"))
    assert code == 2 and "exists; pass --overwrite" in err
    code, _, err = cli("export", str(merged), "--merge", "--out", str(tmp_path / "again"))
    assert code == 2 and "not the adapter of a `fit --peft` run" in err and len(err.strip().splitlines()) == 1


def test_text_prompt_tuning_with_peft(tiny_bert, tmp_path):
    data = write_sentiment(tmp_path / "train.csv", 48, 0)
    run = finetunekit.fit({"task": "text-classification", "quiet": True, "out": str(tmp_path / "run"),
                           "data": {"path": str(data), "test": str(data)},  # scored with the folder's weights
                           "model": {"name": f"hf:{tiny_bert}", "peft": "prompt", "prompt_tokens": 4},
                           "train": {"epochs": 2, "batch_size": 16, "seed": 0, "layer_decay": 0.8,
                                     "head_lr_mult": 2.0, "early_stopping": 1, "precision": "bf16"}})
    assert yaml.safe_load((run.run_dir / "recipe.yaml").read_text())["data"]["max_length"] == 64 - 4
    folder = run.run_dir / "model"
    assert sorted(p.name for p in folder.iterdir()) == ADAPTER_FILES
    assert sum(t.numel() for t in load_file(str(folder / "adapter_model.safetensors")).values()) == 4 * 32 + 66
    mine = finetunekit.load(run.run_dir).logits([(t,) for t in TEXTS])
    assert torch.allclose(_plain_peft_logits(tiny_bert, folder), mine, atol=1e-6)
    code, _, err = cli("export", str(run.run_dir), "--merge")
    assert code == 2 and "prompt tokens are not weights of the model" in err


def test_lr_find_trains_the_adapters(tiny_bert, tmp_path, caplog):
    import logging

    from finetunekit.config import build_recipe
    from finetunekit.lr_find import lr_range_test

    data = write_sentiment(tmp_path / "train.csv", 48, 0)
    recipe = build_recipe({"task": "text-classification", "data": {"path": str(data)},
                           "model": {"name": f"hf:{tiny_bert}", "peft": "lora"}, "train": {"batch_size": 8}}, {})
    with caplog.at_level(logging.INFO, logger="finetunekit"):
        result = lr_range_test(recipe, tmp_path / "lr", steps=12)
    assert "--peft lora: LoRA r 8" in caplog.text and result["steps"] >= 5


# 3. image runs: DoRA on a timm ViT (merged: plain timm), visual prompt tuning

def _image_recipe(images: Path, weights: Path, out: Path, **model) -> dict:
    return {"quiet": True, "out": str(out),
            "data": {"path": str(images), "val": str(images), "image_size": 32, "augment": "none",
                     "num_workers": 0, "cache_images": "off"},
            "model": {"name": "timm:test_vit", "weights": str(weights), **model},
            "train": {"epochs": 1, "batch_size": 4, "seed": 0}}


def test_dora_on_a_timm_vit_merges_into_a_plain_timm_folder(few_images, vit_weights, tmp_path):
    import timm

    recipe = _image_recipe(few_images, vit_weights, tmp_path / "run", peft="dora", lora_r=4)
    recipe["data"]["mixup"] = 0.2  # composes with the add-ons: MixUp's soft targets train the adapters
    run = finetunekit.fit(recipe)
    adapter = finetunekit.load(run.run_dir)
    code, _, err = cli("export", str(run.run_dir), "--merge")
    assert code == 0, err
    plain = timm.create_model(f"local-dir:{run.run_dir / 'merged'}", pretrained=True).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(plain(x), adapter.module(x), atol=1e-5)
    assert finetunekit.load(run.run_dir / "merged").backbone.peft is None


def test_visual_prompt_tuning_on_a_timm_vit(few_images, vit_weights, tmp_path):
    recipe = _image_recipe(few_images, vit_weights, tmp_path / "run", peft="prompt", prompt_tokens=3)
    recipe["data"]["test"] = str(few_images)  # scored with the folder's weights put back
    run = finetunekit.fit(recipe)
    assert run.metrics["test"]["loss"] == pytest.approx(run.metrics["val"]["loss"], abs=1e-6)  # the same images
    folder = run.run_dir / "model"
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_model.safetensors", "config.json"]
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "patch_drop.embedding.weight": (3, 64), "head.weight": (3, 64), "head.bias": (3,)}
    model = finetunekit.load(run.run_dir)
    seen = []
    model.module.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        tokens = model.module.forward_features(torch.randn(2, 3, 32, 32))
    assert seen == [1 + 3 + 4] and tokens.shape[1] == 1 + 4  # the blocks see class token, prompts, 2 x 2 patches
    assert len(model.predict([str(p) for p in sorted((CIFAR / "train" / "cat").glob("*.jpg"))[:2]])) == 2


def test_a_changed_base_is_refused(few_images, vit_weights, tmp_path):
    run = finetunekit.fit(_image_recipe(few_images, vit_weights, tmp_path / "run", peft="lora", lora_r=2,
                                        lora_targets="qkv"))
    assert json.loads((run.run_dir / "model" / "config.json").read_text())["finetunekit"]["peft"]["targets"] == [
        f"blocks.{i}.attn.qkv" for i in range(6)]
    state = load_file(str(vit_weights))
    state["blocks.0.attn.qkv.weight"] += 0.01
    save_file(state, str(vit_weights))  # another checkpoint under the same name
    try:
        with pytest.raises(UserError, match="does not have the weights this adapter was trained on"):
            finetunekit.load(run.run_dir)
    finally:
        state["blocks.0.attn.qkv.weight"] -= 0.01
        save_file(state, str(vit_weights))


# 4. refusals: one line, exit 2, before any data is read

@pytest.mark.parametrize("args, message", [
    (("--model", "timm:test_vit", "--peft", "ia3"), "--peft ia3: does not apply to --model timm:test_vit (it takes "
                                                    "--peft lora, dora, prompt)"),
    (("--peft", "ia3", "--task", "image-multilabel", "--model", "hf:bert-base-uncased"),
     "--peft ia3: does not apply to --model hf:bert-base-uncased (it takes --peft lora, dora)"),
    (("--model", "timm:test_efficientnet", "--peft", "prompt"), "--peft prompt: --model timm:test_efficientnet is "
                                                                "not a timm VisionTransformer"),
    (("--model", "torchvision:resnet18", "--peft", "prompt"), "--peft prompt: does not apply to --model "
                                                              "torchvision:resnet18"),
    (("--lora-r", "4",), "--lora-r: applies to --peft lora or dora"),
    (("--peft", "prompt", "--lora-targets", "qkv"), "--lora-targets: applies to --peft lora or dora or ia3, not "
                                                    "--peft prompt"),
    (("--peft", "lora", "--prompt-tokens", "5"), "--prompt-tokens: applies to --peft prompt, not --peft lora"),
    (("--peft", "prompt", "--merge"), "--merge: applies to --peft lora or dora or ia3, not --peft prompt"),
    (("--merge",), "--merge: applies to --peft lora or dora or ia3"),
    (("--peft", "lora", "--strategy", "bitfit"), "--strategy bitfit: chooses base weights to train"),
    (("--peft", "lora", "--prune", "0.3"), "--prune: not with --peft lora"),
    (("--peft", "lora", "--no-pretrained"), "--no-pretrained: --peft lora adapts pretrained weights"),
    (("--peft", "lora", "--task", "detection", "--model", "fasterrcnn_efficientnet_lite0"),
     "--peft: does not apply to --task detection"),
])
def test_refusals_are_one_line_and_exit_2(tmp_path, args, message):
    data = tmp_path / "data.csv"
    data.write_text("path,label\n")
    code, _, err = cli("fit", "--data", str(data), "--model", "timm:test_vit", *args, "--out", str(tmp_path / "r"))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()
