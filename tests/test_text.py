"""Text tasks end to end: a tiny BERT built from a small config (no download) for the logic, and the real
all-MiniLM-L6-v2 (`minilm`) on a slice of SST-2."""

from __future__ import annotations

import csv
import json
import random
import time
from pathlib import Path

import pytest
import torch

import finetunekit
from finetunekit import UserError

from conftest import SHARED_DATA, hub_reachable, run_cli, save_tiny_bert

SST2 = SHARED_DATA / "sst2"
POS, NEG = ["good", "great", "excellent", "wonderful"], ["bad", "awful", "terrible", "boring"]
FILLER = ["the", "movie", "was", "plot", "actors", "story", "a", "really", "quite", "film", "and", "it", "very"]


def _sentence(rng: random.Random, word: str) -> str:
    words = rng.sample(FILLER, rng.randint(2, 9))
    words.insert(rng.randint(0, len(words)), word)
    return " ".join(words)


def write_sentiment(path: Path, n: int, seed: int, sep: str = ",") -> Path:
    """Sentences whose label is decided by one sentiment word among filler words."""
    rng = random.Random(seed)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=sep)
        w.writerow(["text", "label"])
        for i in range(n):
            label = ("positive", "negative")[i % 2]
            w.writerow([_sentence(rng, rng.choice(POS if label == "positive" else NEG)), label])
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT with the real MiniLM tokenizer, saved as a Hugging Face folder."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def sentiment(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("sentiment")
    return {"train": write_sentiment(d / "train.csv", 480, 0), "val": write_sentiment(d / "val.csv", 80, 1),
            "test": write_sentiment(d / "test.tsv", 80, 2, sep="\t")}


def _fit(tmp_path: Path, bert: Path, data: Path, **options):
    recipe = {"task": "text-classification", "quiet": True, "out": str(tmp_path / "run"),
              "data": {"path": str(data)}, "model": {"name": f"hf:{bert}"},
              "train": {"epochs": 3, "batch_size": 16, "lr": 3e-3, "seed": 0}}
    for key, value in options.items():
        section, _, name = key.partition(".")
        if name:
            recipe.setdefault(section, {})[name] = value
        else:
            recipe[key] = value
    return finetunekit.fit(recipe)


@pytest.fixture(scope="module")
def sentiment_run(tiny_bert, sentiment, tmp_path_factory):
    return _fit(tmp_path_factory.mktemp("sent"), tiny_bert, sentiment["train"],
                **{"data.val": str(sentiment["val"]), "data.test": str(sentiment["test"])})


def test_tiny_bert_learns_and_writes_a_hugging_face_folder(sentiment_run):
    m = sentiment_run.metrics
    assert m["task"] == "text-classification" and m["classes"] == ["negative", "positive"]
    assert m["val"]["accuracy"] >= 0.9 and m["test"]["accuracy"] >= 0.9, m
    assert set(m["test"]["per_class"]) == {"negative", "positive"}
    folder = sentiment_run.model_dir
    config = json.loads((folder / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert config["label2id"] == {"negative": 0, "positive": 1}
    assert config["problem_type"] == "single_label_classification"
    assert config["finetunekit"]["text_columns"] == ["text"]
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt")), "pickle files in the model folder"
    split = json.loads((sentiment_run.run_dir / "split.json").read_text())
    assert split["columns_chosen"] == {"text": "detected", "label": "detected"}


def test_plain_transformers_predicts_like_finetunekit(sentiment_run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = ["the movie was great", "a boring and bad plot", "it", "quite a wonderful film " * 30]
    ours = finetunekit.load(sentiment_run.run_dir)
    theirs = AutoModelForSequenceClassification.from_pretrained(sentiment_run.model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(sentiment_run.model_dir)
    with torch.no_grad():
        logits = theirs(**tokenizer(texts, padding=True, truncation=True, return_tensors="pt")).logits
    assert torch.allclose(ours.logits([(t,) for t in texts]), logits, atol=1e-5)
    preds = ours.predict(texts)
    assert [p["label"] for p in preds] == [theirs.config.id2label[int(i)] for i in logits.argmax(-1)]
    assert [p["label"] for p in preds[:2]] == ["positive", "negative"]
    assert preds[0]["text"] == texts[0]


def test_predict_and_evaluate_from_the_command_line(sentiment_run, sentiment, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("a great story\n\nthe plot was awful\n", encoding="utf-8")
    r = run_cli("predict", str(sentiment_run.run_dir), str(texts), "--text", "a wonderful film", "--format", "csv")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(r.stdout.splitlines()))
    assert [(row["text"], row["label"]) for row in rows] == [
        ("a wonderful film", "positive"), ("a great story", "positive"), ("the plot was awful", "negative")]
    r = run_cli("predict", str(sentiment_run.run_dir), "--text", "x", str(texts))
    assert r.returncode == 2 and "unexpected argument" in r.stderr
    out = tmp_path / "m.json"
    r = run_cli("evaluate", str(sentiment_run.run_dir), "--data", str(sentiment["test"]), "--output", str(out))
    assert r.returncode == 0, r.stderr
    metrics = json.loads(out.read_text())
    assert metrics["samples"] == 80
    assert metrics["accuracy"] == pytest.approx(sentiment_run.metrics["test"]["accuracy"], abs=1e-6)


def test_linear_probe_trains_only_the_head_and_freeze_layers_freezes_the_bottom(tiny_bert, sentiment, tmp_path):
    from safetensors.torch import load_file

    base = load_file(str(tiny_bert / "model.safetensors"))

    def changed(run) -> set[str]:
        after = load_file(str(run.model_dir / "model.safetensors"))
        return {k for k, v in base.items() if not torch.equal(after["bert." + k.removeprefix("bert.")], v)}

    probe = _fit(tmp_path / "p", tiny_bert, sentiment["train"], **{"train.strategy": "linear-probe",
                                                                    "train.epochs": 1})
    assert changed(probe) == set(), "linear-probe changed encoder weights"
    frozen = _fit(tmp_path / "f", tiny_bert, sentiment["train"], **{"train.freeze_layers": 1, "train.epochs": 1})
    moved = changed(frozen)
    prefix = "" if "embeddings.word_embeddings.weight" in base else "bert."
    assert not any(k.startswith((f"{prefix}embeddings.", f"{prefix}encoder.layer.0.")) for k in moved), moved
    assert any(k.startswith(f"{prefix}encoder.layer.1.") for k in moved)


def test_sentence_pairs(tiny_bert, tmp_path):
    """Label: do the two texts carry the same sentiment? Encoded as one pair with token type ids."""
    rng = random.Random(0)
    path = tmp_path / "pairs.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i in range(200):
            a, b = rng.choice(POS + NEG), rng.choice(POS + NEG)
            same = (a in POS) == (b in POS)
            f.write(json.dumps({"premise": _sentence(rng, a), "hypothesis": _sentence(rng, b),
                                "label": "same" if same else "different"}) + "\n")
    run = _fit(tmp_path, tiny_bert, path, **{"train.epochs": 1})
    split = json.loads((run.run_dir / "split.json").read_text())
    assert split["text_columns"] == ["premise", "hypothesis"]
    model = finetunekit.load(run.run_dir)
    preds = model.predict([("the film was great", "a good story")])
    assert preds[0]["label"] in ("same", "different") and preds[0]["text"] == ["the film was great", "a good story"]
    with pytest.raises(UserError, match="reads 2 text"):
        model.predict(["only one text"])


def test_multilabel_from_a_delimited_column(tiny_bert, tmp_path):
    from transformers import AutoModelForSequenceClassification

    rng = random.Random(0)
    path = tmp_path / "tags.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "labels"])
        for _ in range(480):
            tags = [t for t, words in (("pos", POS), ("neg", NEG)) if rng.random() < 0.5]
            words = [rng.choice(POS if t == "pos" else NEG) for t in tags] or ["film"]
            w.writerow([" ".join(words + rng.sample(FILLER, 3)), "|".join(tags)])
    run = _fit(tmp_path, tiny_bert, path, task="text-multilabel", **{"train.epochs": 4})
    val = run.metrics["val"]
    assert {"micro_f1", "macro_f1", "map", "exact_match", "per_label"} <= set(val)
    assert val["micro_f1"] > 0.8, val
    assert run.metrics["monitor"] == "micro_f1"
    hf = AutoModelForSequenceClassification.from_pretrained(run.model_dir)
    assert hf.config.problem_type == "multi_label_classification" and hf.config.num_labels == 2
    pred = finetunekit.load(run.run_dir).predict(["a great and good film"])[0]
    assert set(pred["scores"]) == {"neg", "pos"} and "pos" in pred["labels"]


def test_regression(tiny_bert, tmp_path):
    from transformers import AutoModelForSequenceClassification

    rng = random.Random(0)
    path = tmp_path / "scores.tsv"
    with path.open("w", encoding="utf-8") as f:
        f.write("sentence\tscore\n")
        for _ in range(480):
            n = rng.randint(0, 3)
            f.write(" ".join(["great"] * n + rng.sample(FILLER, 3)) + f"\t{n}\n")
    run = _fit(tmp_path, tiny_bert, path, task="text-regression", **{"train.epochs": 3})
    val = run.metrics["val"]
    assert {"mae", "rmse", "r2", "spearman"} <= set(val) and run.metrics["monitor"] == "rmse"
    assert val["spearman"] > 0.5, val
    hf = AutoModelForSequenceClassification.from_pretrained(run.model_dir)
    assert hf.config.problem_type == "regression" and hf.config.num_labels == 1
    value = finetunekit.load(run.run_dir).predict("great great great film")[0]["value"]
    assert isinstance(value, float)


def test_class_weights_and_focal_loss(tiny_bert, sentiment, tmp_path):
    from finetunekit.inputs import class_weights
    from finetunekit.tasks import Classification

    assert class_weights("auto", "classification", ["a", "b"], [0, 0, 0, 1]) == [pytest.approx(2 / 3, abs=1e-3),
                                                                                  2.0]
    with pytest.raises(UserError, match="expected 2 non-negative numbers"):
        class_weights("1,2,3", "classification", ["a", "b"], [0, 1])
    logits, target = torch.randn(8, 3), torch.randint(0, 3, (8,))
    focal0 = Classification(["a", "b", "c"], loss="focal", focal_gamma=0.0).loss(logits, target)
    assert torch.allclose(focal0, torch.nn.functional.cross_entropy(logits, target))
    easy = torch.tensor([[5.0, 0.0, 0.0]])
    focal = Classification(["a", "b", "c"], loss="focal", focal_gamma=2.0)
    assert focal.loss(easy, torch.tensor([0])) < 0.01 * Classification(["a", "b", "c"]).loss(easy, torch.tensor([0]))
    run = _fit(tmp_path, tiny_bert, sentiment["train"], **{"train.loss": "focal", "train.class_weights": "auto",
                                                           "train.epochs": 1})
    assert "class weights: negative 1, positive 1" in (run.run_dir / "log.txt").read_text()


@pytest.mark.parametrize("args, expected", [
    (["--task", "text-classification", "--data", "{train}", "--model", "efficientnet_lite0"],
     "--model efficientnet_lite0: reads images, but --task text-classification needs a text model"),
    (["--task", "text-classification", "--data", "{train}", "--image-size", "64"],
     "--image-size: does not apply to --task text-classification"),
    (["--data", "{train}", "--text-column", "text"], "--text-column: does not apply to --task image-classification"),
    (["--task", "text-classification", "--data", "{train}", "--loss", "mse"],
     "--loss mse: for --task text-classification expected one of ce, focal"),
    (["--task", "text-regression", "--data", "{train}", "--metric", "accuracy"],
     "--metric accuracy: for --task text-regression expected one of rmse"),
    (["--task", "text-classification", "--data", "{train}", "--text-column", "review"],
     "--text-column review: --data {train} has no column 'review'"),
    (["--task", "text-classification", "--data", "{train}", "--model", "hf:{bert}", "--max-length", "100"],
     "--max-length 100: hf:{bert} takes at most 64 tokens"),
    (["--task", "text-classification", "--data", "{train}", "--model", "hf:/no/such/folder"],
     "--model hf:/no/such/folder: no such folder"),
    (["--task", "text-classification", "--data", "{train}", "--class-weights", "1,2,3"],
     "--class-weights 1,2,3: expected 2 non-negative numbers"),
])
def test_bad_text_options_are_one_line_errors(args, expected, sentiment, tiny_bert, tmp_path):
    fill = {"train": str(sentiment["train"]), "bert": str(tiny_bert)}
    r = run_cli("fit", *[a.format(**fill) for a in args], "--out", str(tmp_path / "run"))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expected.format(**fill) in lines[0], r.stderr
    assert not (tmp_path / "run").exists(), "a failed run left its directory behind"


@pytest.mark.skipif(hub_reachable(), reason="the Hub is reachable: the offline message cannot be shown")
def test_offline_hub_id_is_one_clear_line(sentiment, tmp_path):
    start = time.perf_counter()
    r = run_cli("fit", "--config", "bert-base-sst2", "--data", str(sentiment["train"]), "--val",
                str(sentiment["val"]), "--text-column", "text", "--out", str(tmp_path / "run"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--model hf:bert-base-uncased: not in the local Hugging Face cache" in lines[0], \
        r.stderr
    assert time.perf_counter() - start < 30


def test_remote_code_is_refused_unless_trusted(tmp_path, sentiment):
    """A hub-style folder whose config points at its own Python code: nothing of it runs by default."""
    folder = tmp_path / "remote"
    folder.mkdir()
    canary = tmp_path / "canary"
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}))
    (folder / "configuration_evil.py").write_text(f"open({str(canary)!r}, 'w').write('ran')\n")
    with pytest.raises(UserError, match="--trust-remote-code"):
        finetunekit.fit({"task": "text-classification", "data": {"path": str(sentiment["train"])},
                         "model": {"name": f"hf:{folder}"}, "out": str(tmp_path / "run"), "quiet": True})
    assert not canary.exists()


@pytest.mark.skipif(not SST2.is_dir(), reason="../shared/data/sst2 not found")
def test_minilm_on_an_sst2_slice(tmp_path):
    """The real offline all-MiniLM-L6-v2, end to end through the CLI on 320 SST-2 sentences."""
    train, dev = tmp_path / "train.tsv", tmp_path / "dev.tsv"
    for src, dst, n in ((SST2 / "train.tsv", train, 320), (SST2 / "dev.tsv", dev, 160)):
        dst.write_text("".join(src.read_text(encoding="utf-8").splitlines(keepends=True)[:n + 1]), encoding="utf-8")
    r = run_cli("fit", "--config", "sst2-minilm", "--data", str(train), "--val", str(dev), "--epochs", "3",
                "--batch-size", "16", "--lr", "1e-4", "--out", str(tmp_path / "run"), "--quiet")
    assert r.returncode == 0, r.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["model"] == "minilm" and metrics["max_length"] == 128
    assert metrics["val"]["accuracy"] >= 0.7, metrics["val"]
    r = run_cli("predict", str(tmp_path / "run"), "--text", "a gripping, funny film", "--format", "json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["label"] == "1"


def test_gradual_unfreezing_through_the_pipeline(tiny_bert, sentiment, tmp_path):
    """3 epochs of gradual: head, then + pooler, then + the top layer; the bottom never moves."""
    from safetensors.torch import load_file

    run = _fit(tmp_path, tiny_bert, sentiment["train"], **{"train.strategy": "gradual"})
    base = load_file(str(tiny_bert / "model.safetensors"))
    after = load_file(str(run.model_dir / "model.safetensors"))
    key = (lambda k: k if k in after else "bert." + k)
    moved = {k for k, v in base.items() if not torch.equal(after[key(k)], v)}
    assert not any("embeddings." in k or "layer.0." in k for k in moved), sorted(moved)[:5]
    best = run.metrics["best_epoch"]  # the saved weights are the best epoch's
    assert any("pooler." in k for k in moved) == (best >= 2) and any("layer.1." in k for k in moved) == (best == 3)
    log = (run.run_dir / "log.txt").read_text()
    assert "epoch 2: training head + the top group (down to bert.pooler); " in log
    assert "epoch 3: training head + the top 2 groups (down to bert.encoder.layer.1); " in log
