"""Property-based tests (hypothesis) of the table readers: whatever a user's CSV holds (quotes, commas,
embedded newlines, any Unicode, blank or unknown labels, numbers), every row comes back exactly or is
skipped with its line, never mangled, never an exception."""

from __future__ import annotations

import csv
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finetunekit.data.tables import read_labelled_texts
from finetunekit.errors import UserError

TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)
LABEL = st.sampled_from(["neg", "pos", " pos ", "neg\t", "", "  "])  # unknown labels: an error, tested below
NUMBER = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64), st.text(max_size=6))


def _write(rows: list[list], header: list[str]) -> Path:
    path = Path(tempfile.mkdtemp()) / "t.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(TEXT, LABEL), min_size=1, max_size=25))
def test_classification_rows_round_trip_or_are_skipped(rows):
    path = _write([list(r) for r in rows], ["text", "label"])
    expected = [((t.strip(),), ["neg", "pos"].index(lab.strip())) for t, lab in rows
                if t.strip() and lab.strip() in ("neg", "pos")]
    if not expected:  # nothing usable: one clear error, not an empty training set
        with pytest.raises(UserError, match=f"--data {path}: no usable rows"):
            read_labelled_texts(path, "text-classification", ["text"], ["label"], None, ["neg", "pos"],
                                max_bad_fraction=1.0)
        return
    split, skipped = read_labelled_texts(path, "text-classification", ["text"], ["label"], None, ["neg", "pos"],
                                         max_bad_fraction=1.0)
    assert list(zip(split.texts, split.targets)) == expected
    assert len(skipped) == len(rows) - len(expected)
    assert all(where.startswith(f"{path}:") and why for where, why in skipped)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(TEXT, NUMBER), min_size=1, max_size=25))
def test_regression_numbers_round_trip_and_non_finite_ones_are_skipped(rows):
    path = _write([[t, repr(v) if isinstance(v, float) else v] for t, v in rows], ["text", "value"])

    def number(v):
        try:
            x = float(v)
        except ValueError:
            return None
        return x if math.isfinite(x) else None

    expected = [(t.strip(), number(v)) for t, v in rows if t.strip() and number(v) is not None]
    if not expected:
        with pytest.raises(UserError, match=f"--data {path}: no usable rows"):
            read_labelled_texts(path, "text-regression", ["text"], ["value"], None, [], max_bad_fraction=1.0)
        return
    split, skipped = read_labelled_texts(path, "text-regression", ["text"], ["value"], None, [],
                                         max_bad_fraction=1.0)
    assert [(x[0], y) for x, y in zip(split.texts, split.targets)] == expected
    assert len(skipped) == len(rows) - len(expected)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(TEXT, LABEL), max_size=10), TEXT.filter(lambda t: t.strip() not in ("", "neg", "pos")))
def test_a_label_the_model_never_saw_is_named(rows, unknown):
    path = _write([list(r) for r in rows] + [["some text", unknown]], ["text", "label"])
    with pytest.raises(UserError, match="is not in the training data"):
        read_labelled_texts(path, "text-classification", ["text"], ["label"], None, ["neg", "pos"],
                            max_bad_fraction=1.0)
