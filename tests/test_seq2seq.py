"""--task seq2seq on tiny T5 and BART models built from configs (random init) with a word-level tokenizer trained
offline, on a parallel corpus made from real SST-2 sentences (target: the words in reverse order;
tests/seq2seq_helper.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

import finetunekit
from seq2seq_helper import SST2, reverse, save_tiny_bart, save_tiny_t5, sst2_sentences, write_pairs

from conftest import cli

pytestmark = pytest.mark.skipif(not SST2.is_dir(), reason=f"{SST2} not found")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("pairs")
    s = sst2_sentences(max_words=8, limit=136)
    texts = s + [reverse(x) for x in s]
    return {"sentences": s, "texts": texts, "train": write_pairs(d / "train.csv", s[:96]),
            "val": write_pairs(d / "val.csv", s[96:120]), "test": write_pairs(d / "test.csv", s[120:136])}


@pytest.fixture(scope="module")
def t5(tmp_path_factory, corpus) -> Path:
    return save_tiny_t5(tmp_path_factory.mktemp("t5"), corpus["texts"])


@pytest.fixture(scope="module")
def bart(tmp_path_factory, corpus) -> Path:
    return save_tiny_bart(tmp_path_factory.mktemp("bart"), corpus["texts"])


def _recipe(model: Path, corpus: dict, out: Path, epochs: int = 2, **train) -> dict:
    return {"task": "seq2seq", "quiet": True, "out": str(out), "log_with": "none",
            "data": {"path": str(corpus["train"]), "val": str(corpus["val"]), "test": str(corpus["test"])},
            "model": {"name": f"hf:{model}", "num_beams": 2, "max_new_tokens": 10},
            "train": {"epochs": epochs, "batch_size": 16, "lr": 1e-2, "seed": 0, "eval_generate_max": 8, **train}}


@pytest.fixture(scope="module")
def t5_run(tmp_path_factory, t5, corpus):
    return finetunekit.fit(_recipe(t5, corpus, tmp_path_factory.mktemp("runs") / "t5"))


def test_collate_pads_sources_with_the_pad_id_and_labels_with_minus_100():
    from finetunekit.data.seq2seq import Seq2SeqCollate

    batch = [({"input_ids": [5, 6, 1], "attention_mask": [1, 1, 1]}, [7, 1], 3),
             ({"input_ids": [8, 1], "attention_mask": [1, 1]}, [9, 10, 11, 1], 0)]
    features, labels, indices = Seq2SeqCollate(pad_id=0)(batch)
    assert features["input_ids"].tolist() == [[5, 6, 1], [8, 1, 0]]
    assert features["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert labels.tolist() == [[7, 1, -100, -100], [9, 10, 11, 1]]
    assert indices.tolist() == [3, 0]
    features, labels, _ = Seq2SeqCollate(pad_id=0, multiple=8)(batch)  # GPUs: widths rounded up to 8
    assert features["input_ids"].shape == (2, 8) and labels.shape == (2, 8) and int(labels[0, 2:].max()) == -100


@pytest.mark.parametrize("which", ["t5", "bart"])
def test_the_training_loss_is_transformers_own_without_smoothing(which, request, corpus):
    """Teacher forcing through the model's own decoder inputs: the loss equals the model's `labels=` loss; label
    smoothing raises it."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from finetunekit.data.seq2seq import Seq2SeqCollate, Seq2SeqDataset, PairSplit
    from finetunekit.tasks.seq2seq import Seq2Seq

    folder = request.getfixturevalue(which)
    model, tok = AutoModelForSeq2SeqLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    s = corpus["sentences"][:6]
    ds = Seq2SeqDataset(PairSplit(s, [reverse(x) for x in s]), tok, 64, 64)
    features, labels, _ = Seq2SeqCollate(tok.pad_token_id)([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        theirs = model(**features, labels=labels).loss
        ours, _, logits = Seq2Seq(0.0).step(model, (features, labels, None))
        smoothed = Seq2Seq(0.1).step(model, (features, labels, None)).loss
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6)
    uniform = -logits.log_softmax(-1).mean(-1)[labels != -100].mean()  # the smoothing's share: the mean over the vocabulary
    assert float(smoothed) == pytest.approx(0.9 * float(ours) + 0.1 * float(uniform), rel=1e-5)


def test_scores_are_sacrebleu_chrf_and_rouge_l():
    from finetunekit.tasks.seq2seq import scores

    same = scores(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert [same[k] for k in ("bleu", "chrf", "rouge_l")] == pytest.approx([100.0] * 3, abs=1e-9)
    assert same["generated"] == 1
    part = scores(["the cat sat on a mat today"], ["the cat sat on the mat"])
    assert part["bleu"] == pytest.approx(43.4721, abs=1e-3)
    assert part["chrf"] == pytest.approx(62.5885, abs=1e-3)
    assert part["rouge_l"] == pytest.approx(2 * (5 / 7) * (5 / 6) / (5 / 7 + 5 / 6) * 100, abs=1e-9)
    assert all(v != v for k, v in scores([], []).items() if k != "generated")  # NaN: nothing generated


def test_evaluation_generates_the_subset_per_epoch_and_everything_when_scoring_the_best(t5, corpus):
    from accelerate import Accelerator
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from finetunekit.data.seq2seq import Seq2SeqCollate, Seq2SeqDataset, PairSplit
    from finetunekit.data.text import make_text_loader
    from finetunekit.evaluation import evaluate
    from finetunekit.tasks.seq2seq import Seq2Seq

    model, tok = AutoModelForSeq2SeqLM.from_pretrained(t5), AutoTokenizer.from_pretrained(t5)
    model.generation_config.max_new_tokens = 4
    s = corpus["sentences"][:10]
    loader = make_text_loader(Seq2SeqDataset(PairSplit(s, [reverse(x) for x in s]), tok, 64, 64), 4, train=False,
                              group_by_length=False, seed=0, collate=Seq2SeqCollate(tok.pad_token_id))
    task = Seq2Seq(0.1, tok)
    task.eval_subset = {0, 3, 9}
    accelerator = Accelerator(cpu=True)
    subset = evaluate(accelerator, model, loader, task, quiet=True)
    with task.scoring_best():
        whole = evaluate(accelerator, model, loader, task, quiet=True)
    assert (subset["generated"], whole["generated"], subset["samples"], whole["samples"]) == (3, 10, 10, 10)
    assert subset["loss"] == pytest.approx(whole["loss"], rel=1e-9)  # the loss covers every sample either way
    assert task.eval_subset == {0, 3, 9}


def test_t5_fit_scores_generations_and_writes_a_folder_plain_transformers_loads(t5_run, corpus):
    from sacrebleu import corpus_bleu
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    run, metrics = t5_run.run_dir, t5_run.metrics
    history = list(csv.DictReader((run / "history.csv").open()))
    assert [h["epoch"] for h in history] == ["1", "2"]
    assert {"val_loss", "val_bleu", "val_chrf", "val_rouge_l", "train_token_accuracy"} <= set(history[0])
    assert float(history[1]["train_loss"]) < float(history[0]["train_loss"])
    assert (metrics["monitor"], metrics["best_epoch"]) == ("bleu", 2)  # bleu on the per-epoch subset
    # the best model over the whole validation and test sets (per epoch: 8 generated pairs)
    assert (metrics["val"]["generated"], metrics["test"]["generated"]) == (24, 16)
    assert metrics["val"]["loss"] == pytest.approx(float(history[int(metrics["best_epoch"]) - 1]["val_loss"]), rel=1e-6)
    assert metrics["val"]["loss"] == pytest.approx(5.5544, abs=2e-3)
    rows = list(csv.DictReader((run / "val_predictions.csv").open(encoding="utf-8")))
    assert list(rows[0]) == ["item", "reference", "prediction", "loss"]
    assert [r["item"] for r in rows] == corpus["sentences"][96:120]  # dataset order
    assert [r["reference"] for r in rows] == [reverse(s).lower() for s in corpus["sentences"][96:120]]
    assert metrics["val"]["bleu"] == pytest.approx(
        corpus_bleu([r["prediction"] for r in rows], [[r["reference"] for r in rows]]).score, abs=1e-9)
    assert sum(float(r["loss"]) for r in rows) / len(rows) == pytest.approx(metrics["val"]["loss"], rel=1e-4)

    folder = run / "model"
    gen = json.loads((folder / "generation_config.json").read_text())
    assert (gen["num_beams"], gen["max_new_tokens"], gen["length_penalty"]) == (2, 10, 1.0)
    theirs, tok = AutoModelForSeq2SeqLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    texts = corpus["sentences"][120:124]
    with torch.no_grad():
        made = [tok.decode(theirs.generate(**tok(t, return_tensors="pt"))[0], skip_special_tokens=True).strip()
                for t in texts]
    ours = finetunekit.load(run).predict(texts)
    assert [p["generated"] for p in ours] == made
    assert [p["text"] for p in ours] == texts


def test_predict_and_evaluate_commands(t5_run, corpus):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    run = str(t5_run.run_dir)
    text = corpus["sentences"][130]
    code, out, err = cli("predict", run, "--text", text, "--num-beams", "1", "--max-new-tokens", "3",
                         "--format", "json")
    assert code == 0, err
    theirs, tok = AutoModelForSeq2SeqLM.from_pretrained(t5_run.model_dir), AutoTokenizer.from_pretrained(t5_run.model_dir)
    with torch.no_grad():
        greedy = theirs.generate(**tok(text, return_tensors="pt"), num_beams=1, max_new_tokens=3)[0]
    assert json.loads(out) == [{"text": text, "generated": tok.decode(greedy, skip_special_tokens=True).strip()}]
    assert len(greedy) <= 4  # the decoder start token and at most 3 new ones
    code, out, err = cli("evaluate", run, "--data", str(corpus["val"]))
    assert code == 0, err
    figures = dict(zip(out.split()[::2], out.split()[1::2]))
    assert figures["generated"] == "24" and figures["samples"] == "24"
    assert float(figures["loss"]) == pytest.approx(t5_run.metrics["val"]["loss"], abs=1e-4)
    code, _, err = cli("predict", run, "--text", text, "--num-beams", "0")
    assert code == 2 and "--num-beams 0" in err
    code, _, err = cli("export", run)
    assert code == 2 and "export of seq2seq models is not supported" in err
    code, _, err = cli("explain", run, "--text", text)
    assert code == 2 and "is a seq2seq (text generation) model" in err


def test_report_of_a_seq2seq_run(t5_run, monkeypatch):
    code, out, err = cli("report", str(t5_run.run_dir))
    assert code == 0, err
    assert (t5_run.run_dir / "report.html").stat().st_size > 1000


def test_bart_fits_and_its_folder_loads_with_plain_transformers(tmp_path, bart, corpus):
    from transformers import AutoModelForSeq2SeqLM

    recipe = _recipe(bart, corpus, tmp_path / "bart", epochs=1, label_smoothing=0.0)
    recipe["data"].pop("test")
    recipe["model"]["num_beams"] = 1
    result = finetunekit.fit(recipe)
    assert result.metrics["val"]["generated"] == 24
    assert json.loads((result.model_dir / "config.json").read_text())["finetunekit"]["source"] == "hf-seq2seq"
    model = AutoModelForSeq2SeqLM.from_pretrained(result.model_dir)
    assert type(model).__name__ == "BartForConditionalGeneration"
    assert finetunekit.load(result.run_dir).backbone.architecture == "BartForConditionalGeneration"


@pytest.mark.parametrize("extra, message", [
    (["--source-column", "english"], "--source-column english: no such column in --data"),
    (["--precision", "fp16"], "--precision fp16: hf:{t5} is a t5 model"),
    (["--metric", "bleu", "--eval-generate-max", "0"], "--metric bleu: scores the texts generated after each epoch"),
    (["--metric", "accuracy"], "--metric accuracy: for --task seq2seq expected one of loss, bleu, chrf, rouge_l"),
    (["--text-column", "source"], "--text-column: does not apply to --task seq2seq"),
    (["--model", "minilm"], "--model minilm: not an encoder-decoder model"),
    (["--strategy", "lp-ft"], "--strategy lp-ft: starts with the head alone"),
])
def test_mistakes_are_one_line_errors(extra, message, t5, corpus, tmp_path):
    args = ["fit", "--task", "seq2seq", "--data", str(corpus["train"]), "--model", f"hf:{t5}", "--out",
            str(tmp_path / "run"), "--quiet", *extra]
    code, _, err = cli(*args)
    assert code == 2
    line = [x for x in err.strip().splitlines() if "error" in x]
    assert len(line) == 1 and message.format(t5=t5) in line[0], err
    assert not (tmp_path / "run").exists()


def test_seq2seq_options_belong_to_seq2seq(tmp_path, corpus):
    code, _, err = cli("fit", "--task", "text-classification", "--data", str(corpus["train"]), "--num-beams", "3",
                       "--out", str(tmp_path / "run"))
    assert code == 2 and "--num-beams: does not apply to --task text-classification" in err


def test_layer_groups_run_from_the_embeddings_through_the_encoder_to_the_decoder(t5):
    from finetunekit.models.groups import layer_groups
    from finetunekit.models.hf_seq2seq import HfSeq2SeqSource, Seq2SeqOptions

    backbone = HfSeq2SeqSource.create(str(t5), 0, Seq2SeqOptions(spec=f"hf:{t5}"))
    groups = layer_groups(backbone)
    assert [g.name for g in groups] == ["shared", "encoder.block.0", "encoder.block.1", "encoder.final_layer_norm",
                                        "decoder.block.0", "decoder.block.1", "decoder.final_layer_norm"]
    assert sum(len(g.params) for g in groups) == len(list(backbone.module.named_parameters()))
