"""The MEDI loader on MEDI-format files written here: both record shapes, instructions, malformed input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pandas as pd
import pytest

from gist_core.config import ClassificationSource, DataSettings, MediSettings
from gist_core.data.combine import prepare_data
from gist_core.data.medi import load_medi
from gist_core.errors import DataError

QI, PI = "Represent the question for retrieving answers:", "Represent the answer for retrieval:"
NESTED = [
    {
        "query": [QI, "how do I reset my pin"],
        "pos": [PI, "Open the app and tap Reset PIN."],
        "neg": [PI, "We are open 9-5."],
        "task_name": "bank_faq",
    },
    {
        "query": [QI, "what is a bond"],
        "pos": [PI, "A bond is a loan to an issuer."],
        "neg": [PI, "Stocks are shares."],
        "task_name": "finance_qa",
    },
    {
        "query": ["", "who wrote hamlet"],
        "pos": ["", "Shakespeare wrote Hamlet."],
        "neg": ["", "Goethe wrote Faust."],
        "task_id": 7,
    },
]


def _flat(records: list[dict]) -> pd.DataFrame:
    rows = []
    for r in records:
        row = {f: r[f][1] for f in ("query", "pos", "neg")}
        row |= {f"{f}_instruct": r[f][0] for f in ("query", "pos", "neg")}
        row["task_name"] = r.get("task_name") or f"medi-task-{r['task_id']}"
        rows.append(row)
    return pd.DataFrame(rows)


def _load(tmp_path: Path, name: str, keep: bool = False, fraction: float = 0.5):  # noqa: ANN202
    return load_medi(MediSettings(path=name, keep_instructions=keep), tmp_path, 20_000, fraction)


def test_both_shapes_and_all_file_formats_give_the_same_triplets(tmp_path: Path) -> None:
    (tmp_path / "medi.json").write_text(json.dumps(NESTED))
    (tmp_path / "medi.jsonl").write_text("\n".join(json.dumps(r) for r in NESTED) + "\n")
    (tmp_path / "medi.json.gz").write_bytes(gzip.compress(json.dumps(NESTED).encode()))
    _flat(NESTED).to_parquet(tmp_path / "flat.parquet")
    (tmp_path / "flat.jsonl").write_text(_flat(NESTED).to_json(orient="records", lines=True))
    results = [
        _load(tmp_path, name) for name in ("medi.json", "medi.jsonl", "medi.json.gz", "flat.parquet", "flat.jsonl")
    ]
    first = results[0].triplets.drop(columns="row")
    assert list(first["anchor"]) == ["how do I reset my pin", "what is a bond", "who wrote hamlet"]
    assert list(first["task_name"]) == ["bank_faq", "finance_qa", "medi-task-7"]
    for result in results[1:]:
        pd.testing.assert_frame_equal(result.triplets.drop(columns="row"), first)
        assert result.report.input_rows == 3 and result.report.quarantined == 0


def test_instructions_are_kept_when_asked(tmp_path: Path) -> None:
    (tmp_path / "medi.json").write_text(json.dumps(NESTED))
    _flat(NESTED).to_parquet(tmp_path / "flat.parquet")
    for name in ("medi.json", "flat.parquet"):
        triplets = _load(tmp_path, name, keep=True).triplets
        assert triplets["anchor"][0] == f"{QI} how do I reset my pin"
        assert triplets["positive"][1] == f"{PI} A bond is a loan to an issuer."
        assert triplets["anchor"][2] == "who wrote hamlet"  # an empty instruction adds nothing


def test_malformed_records_are_quarantined_with_record_number_and_reason(tmp_path: Path) -> None:
    good = json.dumps(NESTED[0])
    lines = [
        good.encode(),
        b'"just a string"',
        json.dumps({"query": [QI, "q"], "neg": [PI, "n"], "task_name": "t"}).encode(),
        json.dumps({"query": [QI, "q", "extra"], "pos": [PI, "p"], "neg": [PI, "n"], "task_name": "t"}).encode(),
        json.dumps({"query": [QI, "   "], "pos": [PI, "p"], "neg": [PI, "n"], "task_name": "t"}).encode(),
        json.dumps({"query": [QI, "q"], "pos": [PI, 3], "neg": [PI, "n"], "task_name": "t"}).encode(),
        json.dumps({"query": [QI, "q"], "pos": [PI, "p"], "neg": [PI, "n"]}).encode(),
        b'{"query": [broken',
        b'{"query": ["i", "caf\xe9"], "pos": ["i", "p"], "neg": ["i", "n"], "task_name": "t"}',
        json.dumps({"query": [QI, "same"], "pos": [PI, "same"], "neg": [PI, "n"], "task_name": "t"}).encode(),
        json.dumps(NESTED[1]).encode(),
    ]
    (tmp_path / "m.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    medi = _load(tmp_path, "m.jsonl", fraction=1.0)
    by_row = {int(r.row): (r.field, r.reason) for r in medi.removed().itertuples()}
    assert by_row[2] == ("record", "record is a str, not an object")
    assert by_row[3] == ("pos", "missing field(s) ['pos']")
    assert by_row[4] == ("query", "query: expected [instruction, text], got a list of 3")
    assert by_row[5] == ("query", "query: empty or whitespace text")
    assert by_row[6] == ("pos", "pos: text is int, not a string")
    assert by_row[7] == ("task_name", "missing task_name (or task_id)")
    assert by_row[8][1].startswith("not valid JSON")
    assert by_row[9] == ("record", "not valid UTF-8")
    assert by_row[10] == ("positive", "anchor equals its positive or negative")
    assert set(medi.removed()["file"]) == {"m.jsonl"}
    report = medi.report
    assert report.input_rows == 11 and report.quarantined == 8 and report.degenerate == 1 and len(medi.triplets) == 2


def test_wrong_shapes_fail_with_a_clear_message(tmp_path: Path) -> None:
    (tmp_path / "obj.json").write_text(json.dumps({"data": NESTED}))
    with pytest.raises(DataError, match=r"obj\.json: a JSON dict, expected a list of MEDI records"):
        _load(tmp_path, "obj.json")
    pd.DataFrame({"question": ["q"], "answer": ["a"]}).to_parquet(tmp_path / "cols.parquet")
    with pytest.raises(DataError, match=r"not MEDI data: missing column\(s\) \['query', 'pos', 'neg', 'task_name"):
        _load(tmp_path, "cols.parquet")
    (tmp_path / "lists.json").write_text(json.dumps([[1, 2], [3, 4], NESTED[0]]))
    with pytest.raises(DataError, match=r"lists\.json: 2 of 3 MEDI records are malformed .* record 1 \(record: "):
        _load(tmp_path, "lists.json")
    with pytest.raises(DataError, match=r"nowhere\.json: MEDI file not found"):
        _load(tmp_path, "nowhere.json")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="no MEDI records"):
        _load(tmp_path, "empty.jsonl")


def test_an_unreachable_hub_dataset_is_one_clear_error(tmp_path: Path) -> None:
    # conftest sets HF_HUB_OFFLINE=1
    with pytest.raises(DataError, match=r"could not load the Hub dataset 'nobody/no-such-medi'.*HF_HUB_OFFLINE"):
        load_medi(MediSettings(path="nobody/no-such-medi"), tmp_path, 20_000, 0.5)


def test_medi_joins_the_mined_triplets(tmp_path: Path) -> None:
    (tmp_path / "medi.json").write_text(json.dumps(NESTED + [NESTED[0]]))  # one exact duplicate
    (tmp_path / "t.csv").write_text("text,label\n" + "".join(f"text {i},{i % 2}\n" for i in range(10)))
    settings = DataSettings(
        classification=[ClassificationSource(name="T", path="t.csv")],
        mining={"positive_strategy": "random"},
        medi={"path": "medi.json"},
        max_per_task=1,
    )
    data, report, skipped = prepare_data(settings, tmp_path, seed=0)
    assert report.rows_per_task == {"T": 1, "bank_faq": 1, "finance_qa": 1, "medi-task-7": 1}
    medi = next(s for s in report.sources if s.name == "MEDI")
    assert medi.input_rows == 4 and medi.duplicates == 1 and medi.kept == 3
    assert data.loc[data["source"] == "MEDI", "anchor_label"].isna().all()
    report.check_identity()
    only_medi = DataSettings(classification=[], medi={"path": "medi.json"})
    data, report, _ = prepare_data(only_medi, tmp_path, seed=0)
    assert len(data) == 3 and [s.name for s in report.sources] == ["MEDI"]


def _records(n: int) -> list[dict]:
    return [
        {"query": ["q:", f"question {i}"], "pos": ["p:", f"answer {i}"], "neg": ["p:", f"other {i}"], "task_name": "t"}
        for i in range(n)
    ]


def test_a_json_list_broken_mid_stream_keeps_the_records_before_it(tmp_path: Path) -> None:
    """Rows before a syntax error are kept, the broken record is quarantined with its number, and the
    unread rest of the file counts against max_bad_fraction."""
    good = [json.dumps(r) for r in _records(6)]
    broken = good[:4] + ['{"query": ["q:", "broken" "pos": []}'] + good[4:]
    (tmp_path / "mid.json").write_text("[" + ",\n".join(broken) + "]")
    medi = _load(tmp_path, "mid.json", fraction=1.0)
    assert list(medi.triplets["anchor"]) == [f"question {i}" for i in range(4)]
    (bad,) = medi.skipped
    assert bad.row == 5 and bad.field == "record" and bad.reason.startswith("not valid JSON")
    assert medi.report.input_rows == 5 and medi.report.quarantined == 1
    # a truncated file: everything before the cut is kept
    (tmp_path / "cut.json").write_text(("[" + ",".join(good))[:-20])
    medi = _load(tmp_path, "cut.json")
    assert len(medi.triplets) == 5 and medi.skipped[0].row == 6
    # past max_bad_fraction (here: most of a long file unread after an early break), the stage fails
    many = [json.dumps(r) for r in _records(3000)]
    (tmp_path / "early.json").write_text("[" + ",".join(many[:2] + ["{broken"] + many[2:]) + "]")
    with pytest.raises(
        DataError, match=r"early\.json: 1 of 3 MEDI records are malformed, and \d+% of the file could not"
    ):
        _load(tmp_path, "early.json", fraction=0.5)


def test_bad_bytes_inside_a_json_list_quarantine_one_record(tmp_path: Path) -> None:
    good = [json.dumps(r).encode() for r in _records(3)]
    bad = b'{"query": ["q", "caf\xe9"], "pos": ["p", "x"], "neg": ["n", "y"], "task_name": "t"}'
    (tmp_path / "bytes.json").write_bytes(b"[" + b",".join([good[0], bad, *good[1:]]) + b"]")
    medi = _load(tmp_path, "bytes.json")
    assert len(medi.triplets) == 3 and [(s.row, s.reason) for s in medi.skipped] == [
        (2, "query: not valid UTF-8 (replacement characters)")
    ]


def test_near_duplicate_positive_is_degenerate(tmp_path: Path) -> None:
    records = _records(3)
    records[1]["pos"] = ["p:", "  QUESTION\t 1 "]  # the anchor, up to case and whitespace
    records[2]["neg"] = ["p:", "question 2"]  # the anchor itself
    (tmp_path / "near.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    medi = _load(tmp_path, "near.jsonl")
    assert list(medi.triplets["row"]) == [1]
    removed = medi.removed().set_index("row")
    assert removed.loc[2, "reason"] == "anchor equals its positive or negative after case and whitespace normalisation"
    assert (removed.loc[2, "field"], removed.loc[3, "field"]) == ("positive", "negative")
    assert removed.loc[3, "reason"] == "anchor equals its positive or negative"
    assert medi.report.degenerate == 2 and medi.report.input_rows == 3


def test_parquet_is_read_in_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gist_core.data import medi as medi_module

    monkeypatch.setattr(medi_module, "RECORD_CHUNK", 7)
    _flat(NESTED * 10).to_parquet(tmp_path / "flat.parquet", row_group_size=4)
    medi = _load(tmp_path, "flat.parquet")
    assert len(medi.triplets) == 30 and list(medi.triplets["row"]) == list(range(1, 31))
