from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from gist_core.config import ClassificationSource, DataSettings
from gist_core.data import build_triplets, load_triplets, prepare_data, prepare_task, write_outputs
from gist_core.errors import DataError


def _frame(labels: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "row": range(1, len(labels) + 1),
            "text": [f"text {i} {lab}" for i, lab in enumerate(labels)],
            "label": labels,
        }
    )


def test_positive_same_label_negative_other_label() -> None:
    frame = _frame(["a"] * 5 + ["b"] * 3 + ["c"] * 7)
    triplets, singletons = build_triplets(frame, "T", seed=1)
    assert singletons.empty and len(triplets) == 15
    label_of = dict(zip(frame["text"], frame["label"], strict=True))
    for row in triplets.itertuples():
        assert row.anchor != row.positive
        assert label_of[row.positive] == label_of[row.anchor]
        assert label_of[row.negative] != label_of[row.anchor]
    assert (triplets["task_name"] == "T").all()


def test_seeded_and_deterministic() -> None:
    frame = _frame(["a", "b"] * 20)
    first, _ = build_triplets(frame, "T", seed=3)
    again, _ = build_triplets(frame, "T", seed=3)
    other, _ = build_triplets(frame, "T", seed=4)
    pd.testing.assert_frame_equal(first, again)
    assert not first.equals(other)


def test_single_example_labels_and_too_few_labels() -> None:
    triplets, singletons = build_triplets(_frame(["a", "a", "b", "b", "c"]), "T", seed=0)
    assert singletons["label"].tolist() == ["c"] and len(triplets) == 4
    with pytest.raises(DataError, match="at least two labels"):
        build_triplets(_frame(["a", "a", "a", "b"]), "T", seed=0)


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_bad_rows_are_quarantined_with_file_row_and_reason(tmp_path: Path) -> None:
    rows = [
        "text,category",
        "good one,a",
        "good two,a",
        "   ,a",
        "no label,",
        "good three,b",
        "good four,b",
        "lonely,c",
    ]
    _write(tmp_path / "t.csv", "\n".join(rows) + "\n")
    source = ClassificationSource(name="T", path="t.csv", text_column="text", label_column="category")
    triplets, report, skipped = prepare_task(source, tmp_path, seed=0, max_per_task=None)
    reasons = {(s.row, s.field, s.reason) for s in skipped}
    assert (3, "text", "empty or whitespace text") in reasons
    assert (4, "label", "missing label") in reasons
    assert (7, "label", "label has a single example") in reasons
    assert all(s.file == "t.csv" for s in skipped)
    assert report.input_rows == 7 and report.kept == 4 and report.quarantined == 3
    assert (
        report.input_rows
        == report.kept + report.quarantined + report.degenerate + report.duplicates + report.not_sampled
    )


def test_lastsep_format_splits_on_last_separator_and_quarantines_bad_bytes(tmp_path: Path) -> None:
    body = (
        b"text;label_name\nhappy; really happy;joy\nglad;joy\nsad;sadness\nblue;sadness\n"
        b"\xff\xfe broken;joy\nno separator here\n"
    )
    _write(tmp_path / "e.txt", body)
    source = ClassificationSource(
        name="E", path="e.txt", format="lastsep", text_column="text", label_column="label_name"
    )
    triplets, report, skipped = prepare_task(source, tmp_path, seed=0, max_per_task=None)
    assert "happy; really happy" in set(triplets["anchor"])
    by_row = {s.row: s.reason for s in skipped}
    assert by_row[5] == "not valid UTF-8"
    assert by_row[6].startswith("no ';' separator")
    assert report.input_rows == 6 and report.kept == 4


def test_cap_counts_not_sampled(tmp_path: Path) -> None:
    _write(tmp_path / "t.csv", "text,label\n" + "".join(f"t{i},{i % 3}\n" for i in range(30)))
    source = ClassificationSource(name="T", path="t.csv")
    triplets, report, _ = prepare_task(source, tmp_path, seed=0, max_per_task=10)
    assert len(triplets) == 10 and report.not_sampled == 20 and report.kept == 10


def test_unusable_inputs_fail_with_the_file_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing\.csv: classification data file not found"):
        prepare_task(ClassificationSource(name="T", path="missing.csv"), tmp_path, 0, None)
    _write(tmp_path / "cols.csv", "sentence,label\nx,1\n")
    with pytest.raises(DataError, match=r"cols\.csv: missing column\(s\) \['text'\]"):
        prepare_task(ClassificationSource(name="T", path="cols.csv"), tmp_path, 0, None)


def test_outputs_are_byte_identical_across_runs(tmp_path: Path) -> None:
    _write(tmp_path / "t.csv", "text,label\n" + "".join(f"t{i},{i % 4}\n" for i in range(40)))
    settings = DataSettings(classification=[ClassificationSource(name="T", path="t.csv")], max_per_task=25)
    digests = []
    for attempt in range(2):
        data, report, skipped = prepare_data(settings, tmp_path, seed=42)
        out = tmp_path / f"run{attempt}"
        write_outputs(data, report, skipped, out / "t.parquet", out / "r.json", out / "q.csv")
        digests.append((out / "t.parquet").read_bytes())
        assert json.loads((out / "r.json").read_text())["totals"]["kept"] == 25
    assert digests[0] == digests[1]
    assert len(load_triplets(tmp_path / "run0" / "t.parquet")) == 25


def test_load_triplets_checks_columns(tmp_path: Path) -> None:
    pd.DataFrame({"anchor": ["a"], "positive": ["b"]}).to_parquet(tmp_path / "x.parquet")
    with pytest.raises(DataError, match=r"missing column\(s\) \['negative', 'task_name'\]"):
        load_triplets(tmp_path / "x.parquet")
    with pytest.raises(DataError, match="run `gist data`"):
        load_triplets(tmp_path / "none.parquet")
