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
    by_row = {s.row: (s.field, s.reason) for s in medi.skipped}
    assert by_row[2] == ("record", "record is a str, not an object")
    assert by_row[3] == ("pos", "missing field(s) ['pos']")
    assert by_row[4] == ("query", "query: expected [instruction, text], got a list of 3")
    assert by_row[5] == ("query", "query: empty or whitespace text")
    assert by_row[6] == ("pos", "pos: text is int, not a string")
    assert by_row[7] == ("task_name", "missing task_name (or task_id)")
    assert by_row[8][1].startswith("not valid JSON")
    assert by_row[9] == ("record", "not valid UTF-8")
    assert by_row[10] == ("positive", "anchor equals its positive or negative")
    assert all(s.file == "m.jsonl" for s in medi.skipped)
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
