"""Reading, validation, quarantine and row accounting of classification sources; combining; outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from gist_core.config import ClassificationSource, DataSettings
from gist_core.data.classification import read_classification_source
from gist_core.data.combine import combine, prepare_data, write_outputs
from gist_core.data.contamination import ContaminationIndex
from gist_core.data.mine import mine_all, mine_source
from gist_core.data.schema import OUTPUT_COLUMNS, load_triplets
from gist_core.errors import DataError
from tests.support.fakes import fake_guide

BUCKETS = ("quarantined", "degenerate", "duplicates", "decontaminated", "not_sampled")


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _settings(*sources: ClassificationSource, strategy: str = "random", **data: object) -> DataSettings:
    mining = {"positive_strategy": strategy, "max_texts_per_task": None, **(data.pop("mining", None) or {})}
    return DataSettings(classification=list(sources), mining=mining, **data)


def _identity(report) -> None:  # noqa: ANN001
    assert report.input_rows == report.kept + sum(getattr(report, b) for b in BUCKETS)


def _labelled_csv(n: int, labels: int = 3) -> str:
    return "text,label\n" + "".join(f"text number {i} about {i % labels},{i % labels}\n" for i in range(n))


def test_bad_rows_are_quarantined_with_file_row_and_reason(tmp_path: Path) -> None:
    rows = [
        b"text,category",
        b"good one,a",
        b"good two,a",
        b"   ,a",
        b"no label,",
        b"too,many,fields",
        b"bad \xff\xfe bytes,a",
        b"x" * 50 + b",b",
        b"lonely,c",
        b"good three,b",
        b"good four,b",
    ]
    _write(tmp_path / "t.csv", b"\n".join(rows) + b"\n")
    source = ClassificationSource(name="T", path="t.csv", text_column="text", label_column="category")
    triplets, report, skipped, _ = mine_source(source, tmp_path, _settings(source, max_text_chars=40), seed=0)
    reasons = {(s.row, s.field, s.reason) for s in skipped}
    assert (3, "text", "empty or whitespace text") in reasons
    assert (4, "label", "missing label") in reasons
    assert (5, "row", "expected 2 fields, got 3") in reasons
    assert (6, "text", "not valid UTF-8") in reasons
    assert (7, "text", "text longer than 40 characters") in reasons
    assert (8, "label", "label has a single example") in reasons
    assert all(s.file == "t.csv" for s in skipped)
    assert report.input_rows == 10 and report.kept == 0 and report.quarantined == 6 and len(triplets) == 4
    # kept is set by combine; before that every mined row is still in play
    report.kept = len(triplets)
    _identity(report)
    label_of = {"good one": "a", "good two": "a", "good three": "b", "good four": "b"}
    for row in triplets.itertuples():
        assert label_of[row.positive] == row.anchor_label == row.positive_label
        assert label_of[row.negative] == row.negative_label != row.anchor_label


def test_lastsep_format_splits_on_last_separator_and_quarantines_bad_bytes(tmp_path: Path) -> None:
    body = (
        b"text;label_name\nhappy; really happy;joy\nglad;joy\nsad;sadness\nblue;sadness\n"
        b"\xff\xfe broken;joy\nno separator here\n"
    )
    _write(tmp_path / "e.txt", body)
    source = ClassificationSource(
        name="E", path="e.txt", format="lastsep", text_column="text", label_column="label_name"
    )
    triplets, report, skipped, _ = mine_source(source, tmp_path, _settings(source), seed=0)
    assert "happy; really happy" in set(triplets["anchor"])
    by_row = {s.row: s.reason for s in skipped}
    assert by_row[5] == "not valid UTF-8"
    assert by_row[6].startswith("no ';' separator")
    assert report.input_rows == 6 and len(triplets) == 4


def test_jsonl_wrong_types_and_broken_lines(tmp_path: Path) -> None:
    lines = [
        '{"text": "one a", "label": "a"}',
        '{"text": 5, "label": "a"}',
        '{"text": "listy", "label": ["a"]}',
        "{not json",
        "[1, 2]",
        "",
        '{"text": "two a", "label": "a"}',
        '{"text": "one b", "label": 7}',
        '{"text": "two b", "label": 7.0}',
        '{"label": "a"}',
    ]
    _write(tmp_path / "t.jsonl", "\n".join(lines) + "\n")
    source = ClassificationSource(name="T", path="t.jsonl", format="jsonl")
    frame, skipped, input_rows = read_classification_source(source, tmp_path)
    by_row = {s.row: (s.field, s.reason) for s in skipped}
    assert by_row[2] == ("text", "text is int, not a string")
    assert by_row[3] == ("label", "label is list, not a string or a number")
    assert by_row[4][1].startswith("not valid JSON")
    assert by_row[5] == ("row", "a JSON list, not an object")
    assert by_row[6] == ("row", "blank line")
    assert by_row[10] == ("text", "missing text")
    assert input_rows == 10 and len(frame) == 4
    assert sorted(frame["label"]) == ["7", "7", "a", "a"]  # 7 and 7.0 are one class


def test_parquet_source(tmp_path: Path) -> None:
    pd.DataFrame({"sentence": ["a x", "b x", None, "c y", "d y"], "y": [1, 1, 1, 2, 2]}).to_parquet(tmp_path / "t.pq")
    source = ClassificationSource(name="T", path="t.pq", format="parquet", text_column="sentence", label_column="y")
    frame, skipped, input_rows = read_classification_source(source, tmp_path)
    assert input_rows == 5 and len(frame) == 4 and [(s.row, s.reason) for s in skipped] == [(3, "missing text")]


def test_unusable_inputs_fail_with_the_file_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing\.csv: classification data file not found"):
        read_classification_source(ClassificationSource(name="T", path="missing.csv"), tmp_path)
    _write(tmp_path / "cols.csv", "sentence,label\nx,1\n")
    with pytest.raises(DataError, match=r"cols\.csv: missing column\(s\) \['text'\]"):
        read_classification_source(ClassificationSource(name="T", path="cols.csv"), tmp_path)
    _write(tmp_path / "cols.jsonl", '{"sentence": "x", "label": 1}\n')
    with pytest.raises(DataError, match=r"cols\.jsonl: missing column\(s\) \['text'\]"):
        read_classification_source(ClassificationSource(name="T", path="cols.jsonl", format="jsonl"), tmp_path)
    _write(tmp_path / "empty.csv", "")
    with pytest.raises(DataError, match=r"empty\.csv: file is empty"):
        read_classification_source(ClassificationSource(name="T", path="empty.csv"), tmp_path)
    _write(tmp_path / "garbage.parquet", b"PAR1 not really")
    with pytest.raises(DataError, match=r"garbage\.parquet: cannot be read as parquet"):
        read_classification_source(ClassificationSource(name="T", path="garbage.parquet", format="parquet"), tmp_path)
    # mostly corrupt: the message names the file and the first bad rows
    _write(tmp_path / "bad.csv", b"text,label\nok,a\n" + b"\xff\xfe,a\n" * 5)
    with pytest.raises(DataError, match=r"bad\.csv: 5 of 6 rows are unusable .* row 2 \(text: not valid UTF-8\)"):
        read_classification_source(ClassificationSource(name="T", path="bad.csv"), tmp_path, max_bad_fraction=0.5)


def test_guide_topk_needs_a_guide_and_two_labels(tmp_path: Path) -> None:
    _write(tmp_path / "t.csv", _labelled_csv(12))
    source = ClassificationSource(name="T", path="t.csv")
    with pytest.raises(DataError, match="guide_topk needs the guide"):
        mine_source(source, tmp_path, _settings(source, strategy="guide_topk"), seed=0)
    _write(tmp_path / "one.csv", "text,label\na,x\nb,x\nc,x\n")
    one = ClassificationSource(name="One", path="one.csv")
    with pytest.raises(DataError, match="at least two labels"):
        mine_source(one, tmp_path, _settings(one), seed=0)


def test_guided_mining_with_a_fake_guide(tmp_path: Path) -> None:
    texts = ["card lost", "lost my card", "card stolen", "transfer failed", "failed transfer again", "transfer late"]
    labels = ["card", "card", "card", "transfer", "transfer", "transfer"]
    _write(tmp_path / "t.csv", "text,label\n" + "".join(f"{t},{lab}\n" for t, lab in zip(texts, labels, strict=True)))
    source = ClassificationSource(name="T", path="t.csv")
    settings = _settings(source, strategy="guide_topk", mining={"top_k": 1})
    triplets, report, _, _ = mine_source(source, tmp_path, settings, seed=0, guide=fake_guide())
    by_anchor = triplets.set_index("anchor")
    assert by_anchor.loc["card lost", "positive"] == "lost my card"  # shares two words: the top-1
    assert by_anchor.loc["failed transfer again", "positive"] == "transfer failed"
    assert (triplets["positive_label"] == triplets["anchor_label"]).all()
    assert (triplets["guide_pos_sim"] > 0).all() and triplets["guide_neg_sim"].notna().all()
    assert report.guide_random_same_label_sim_mean is not None


def test_caps_count_not_sampled(tmp_path: Path) -> None:
    _write(tmp_path / "t.csv", _labelled_csv(30))
    source = ClassificationSource(name="T", path="t.csv")
    settings = _settings(source, mining={"max_texts_per_task": 20}, max_per_task=10)
    data, report, _ = prepare_data(settings, tmp_path, seed=0)
    (task,) = report.sources
    assert len(data) == 10 and task.kept == 10 and task.not_sampled == 20
    assert task.reasons == {
        "outside the mining pool (data.mining.max_texts_per_task)": 10,
        "over data.max_per_task": 10,
    }
    _identity(task)


def test_duplicates_and_contamination_are_removed_and_counted(tmp_path: Path) -> None:
    _write(tmp_path / "a.csv", "text,label\nsame one,x\nsame two,x\nother,y\nother two,y\n")
    _write(tmp_path / "b.csv", "text,label\nsame one,x\nsame two,x\nEVAL   Text,y\nother three,y\n")
    a, b = ClassificationSource(name="A", path="a.csv"), ClassificationSource(name="B", path="b.csv")
    settings = _settings(a, b)
    mined = mine_all(settings, tmp_path, seed=0)
    # make one triplet of B an exact copy of one of A's
    first_a = mined.triplets[mined.triplets["source"] == "A"].iloc[0]
    mined.triplets.loc[mined.triplets["source"] == "B", ["anchor", "positive", "negative"]] = None
    b_rows = mined.triplets["source"] == "B"
    mined.triplets.loc[b_rows, "anchor"] = ["x1", "x2", "x3", "x4"]
    mined.triplets.loc[b_rows, "positive"] = ["p1", "p2", "p3", "p4"]
    mined.triplets.loc[b_rows, "negative"] = ["n1", "n2", "eval text", "n4"]
    first_b = mined.triplets.index[b_rows][0]
    mined.triplets.loc[first_b, ["anchor", "positive", "negative"]] = first_a[["anchor", "positive", "negative"]]
    index = ContaminationIndex({"eval text": "Task/test"}, ["Task"], {"Task/test": 1})
    data, report, skipped = combine(mined, None, settings, seed=0, contamination=index)
    by_name = {s.name: s for s in report.sources}
    assert by_name["B"].duplicates == 1 and by_name["B"].decontaminated == 1 and by_name["B"].kept == 2
    assert report.contamination["by_split"] == {"Task/test": 1} and report.contamination["rows"] == 1
    assert {"duplicate triplet", "text in evaluation split Task/test"} <= set(skipped["reason"])
    assert len(data) == report.totals["kept"] == 6
    report.check_identity()
    # remove: false counts but keeps
    keep = _settings(a, b, contamination={"remove": False})
    kept, report2, _ = combine(mined, None, keep, seed=0, contamination=index)
    assert report2.contamination["rows"] == 1 and len(kept) == 7 and report2.totals["decontaminated"] == 0


def test_texts_in_evaluation_splits_are_dropped_before_mining(tmp_path: Path) -> None:
    _write(tmp_path / "t.csv", "text,label\nA Test   sentence,x\nfine,x\nfine too,x\nok,y\nok too,y\n")
    source = ClassificationSource(name="T", path="t.csv")
    index = ContaminationIndex({"a test sentence": "STSBenchmark/test"}, ["STSBenchmark"], {})
    triplets, report, skipped, found = mine_source(source, tmp_path, _settings(source), 0, contamination=index)
    assert found == {"STSBenchmark/test": 1} and report.decontaminated == 1
    assert "A Test   sentence" not in set(triplets[["anchor", "positive", "negative"]].to_numpy().ravel())
    assert [(s.row, s.reason) for s in skipped] == [(1, "text in evaluation split STSBenchmark/test")]


def test_exclude_list(tmp_path: Path) -> None:
    _write(tmp_path / "t.csv", _labelled_csv(12))
    source = ClassificationSource(name="T", path="t.csv")
    with pytest.raises(ValidationError, match=r"mining.exclude names unknown datasets \['NoSuchSet'\]"):
        _settings(source, mining={"exclude": ["NoSuchSet"]})
    assert _settings(source, mining={"exclude": ["AmazonPolarity"]}).is_excluded("AmazonPolarityClassification")
    other = ClassificationSource(name="U", path="t.csv")
    mined = mine_all(_settings(source, other, mining={"exclude": ["T"]}), tmp_path, seed=0)
    assert mined.excluded == ["T"] and set(mined.triplets["task_name"]) == {"U"}
    with pytest.raises(DataError, match="every data.classification source is in data.mining.exclude"):
        mine_all(_settings(source, mining={"exclude": ["T"]}), tmp_path, seed=0)


def test_outputs_are_byte_identical_across_runs(tmp_path: Path) -> None:
    _write(tmp_path / "t.csv", _labelled_csv(40, labels=4))
    source = ClassificationSource(name="T", path="t.csv")
    for strategy in ("random", "guide_topk"):
        settings = _settings(source, strategy=strategy, max_per_task=25)
        digests = []
        for attempt, cache in enumerate((None, tmp_path / "cache", tmp_path / "cache")):
            data, report, skipped = prepare_data(settings, tmp_path, seed=42, guide=fake_guide(cache))
            out = tmp_path / f"{strategy}{attempt}"
            write_outputs(data, report, skipped, out / "t.parquet", out / "r.json", out / "q.csv", out / "r.md")
            digests.append(tuple((out / name).read_bytes() for name in ("t.parquet", "r.json", "q.csv", "r.md")))
            assert json.loads((out / "r.json").read_text())["totals"]["kept"] == 25
        assert digests[0] == digests[1] == digests[2]
        frame = load_triplets(tmp_path / f"{strategy}0" / "t.parquet")
        assert list(frame.columns) == OUTPUT_COLUMNS and len(frame) == 25


def test_load_triplets_checks_columns(tmp_path: Path) -> None:
    pd.DataFrame({"anchor": ["a"], "positive": ["b"]}).to_parquet(tmp_path / "x.parquet")
    with pytest.raises(DataError, match=r"missing column\(s\) \['negative', 'task_name'\]"):
        load_triplets(tmp_path / "x.parquet")
    with pytest.raises(DataError, match="run `gist data`"):
        load_triplets(tmp_path / "none.parquet")


def test_write_outputs_fills_optional_columns(tmp_path: Path) -> None:
    data = pd.DataFrame({"anchor": ["a"], "positive": ["b"], "negative": ["c"], "task_name": ["T"]})
    from gist_core.data.audit import DataReport

    write_outputs(data, DataReport([], {}), [], tmp_path / "t.parquet", tmp_path / "r.json", tmp_path / "q.csv")
    frame = pd.read_parquet(tmp_path / "t.parquet")
    assert list(frame.columns) == OUTPUT_COLUMNS and np.isnan(frame["guide_pos_sim"][0])


def test_near_duplicates_are_never_an_anchors_positive(tmp_path: Path) -> None:
    """Texts equal after case and whitespace normalisation count as copies: never each other's positive."""
    _write(tmp_path / "t.csv", "text,label\nHello world,a\nhello   WORLD,a\nfoo,b\nbar,b\n")
    source = ClassificationSource(name="T", path="t.csv")
    for strategy in ("random", "guide_topk"):
        triplets, report, skipped, _ = mine_source(
            source, tmp_path, _settings(source, strategy=strategy), seed=0, guide=fake_guide()
        )
        assert set(triplets["anchor"]) == {"foo", "bar"}, strategy
        reasons = {s.reason for s in skipped if s.row in (1, 2)}
        expected = (
            "anchor equals its positive or negative after case and whitespace normalisation"
            if strategy == "random"
            else "no same-label text other than copies of itself"
        )
        assert reasons == {expected} and report.degenerate == 2, strategy
