"""Expectations on the data shipped in the repo and on the default data stage's output."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from gist_core.config import load_settings
from gist_core.data import prepare_data, read_classification_source

EXPECTED_ROWS = {
    "Banking77Classification": 10003,
    "EmotionClassification": 16000,
    "TweetSentimentExtractionClassification": 27480,
}


def test_provenance_and_licences_are_shipped(repo_root: Path) -> None:
    raw = repo_root / "data" / "raw"
    sources = (raw / "SOURCES.md").read_text()
    for needle in ("PolyAI-LDN/task-specific-datasets", "STSBenchmark", "SciFact"):
        assert needle in sources
    assert (raw / "classification" / "banking77" / "LICENSE").is_file()
    assert (raw / "sts" / "stsbenchmark" / "LICENSE.txt").is_file()


def test_train_splits_read_completely(repo_root: Path) -> None:
    settings = load_settings(repo_root)
    for source in settings.data.classification:
        frame, skipped, input_rows = read_classification_source(source, repo_root)
        assert input_rows == EXPECTED_ROWS[source.name]
        assert len(frame) + len(skipped) == input_rows
        assert frame["label"].nunique() == {"Banking77Classification": 77}.get(source.name, frame["label"].nunique())


def test_default_triplets(repo_root: Path) -> None:
    settings = load_settings(repo_root)
    data, report, skipped = prepare_data(settings.data, repo_root, settings.base.seed)
    report.check_identity()
    assert report.totals["input_rows"] == sum(EXPECTED_ROWS.values())
    assert set(data["task_name"]) == set(EXPECTED_ROWS)
    assert (data.groupby("task_name").size() <= settings.data.max_per_task).all()
    # every positive shares the anchor's label, every negative does not
    for source in settings.data.classification:
        frame, _, _ = read_classification_source(source, repo_root)
        label_of = dict(zip(frame["text"], frame["label"], strict=True))
        task = data[data["task_name"] == source.name]
        same = (task["anchor"].map(label_of) == task["positive"].map(label_of)).mean()
        other = (task["anchor"].map(label_of) != task["negative"].map(label_of)).mean()
        # texts repeated under two labels make the text->label map ambiguous for a handful of rows
        assert same > 0.99 and other > 0.99, (source.name, same, other)
    assert not (data["anchor"] == data["positive"]).any()
    json.dumps(report.to_dict())
    assert isinstance(data, pd.DataFrame)
