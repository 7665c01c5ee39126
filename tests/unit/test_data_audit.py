"""Validation rules, contamination against the shipped evaluation splits, and the readable report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gist_core.catalogue import eval_split_texts
from gist_core.config import load_settings
from gist_core.data.audit import DataReport, SourceReport, render_markdown, similarity_summary
from gist_core.data.contamination import build_contamination_index, contamination_tasks, normalize_text
from gist_core.errors import DataError
from gist_core.readers import label_problem, text_problem


def test_text_and_label_rules() -> None:
    assert text_problem("fine") == ""
    assert text_problem(" \t\n") == "empty or whitespace text"
    assert text_problem(None) == "missing text"
    assert text_problem(12) == "text is int, not a string"
    assert text_problem("bad \udcff byte") == "not valid UTF-8"
    assert text_problem("x" * 11, max_chars=10) == "text longer than 10 characters"
    assert label_problem("a") == label_problem(3) == ""
    assert label_problem("") == label_problem(None) == label_problem(float("nan")) == "missing label"
    assert label_problem(True) == "label is bool, not a string or a number"


def test_normalize_text() -> None:
    assert normalize_text("  Hello\t\tWORLD \n again ") == "hello world again"


def test_contamination_index_reads_every_evaluation_split(repo_root: Path) -> None:
    data_dir = repo_root / "data" / "raw"
    emotion = eval_split_texts("EmotionClassification", data_dir)
    assert sorted(emotion) == ["EmotionClassification/test", "EmotionClassification/validation"]
    assert len(emotion["EmotionClassification/test"]) == 2000
    scifact = eval_split_texts("SciFact", data_dir)
    assert len(scifact["SciFact/test queries"]) == 300
    index = build_contamination_index(["STSBenchmark", "Banking77Classification", "SciFact"], data_dir)
    banking_test = eval_split_texts("Banking77Classification", data_dir)["Banking77Classification/test"][0]
    assert index.match("  " + banking_test.upper() + " ") == "Banking77Classification/test"
    assert index.match("a text that is in no evaluation split at all") is None
    with pytest.raises(DataError, match="'Nope' is not a local task"):
        build_contamination_index(["Nope"], data_dir)
    lenient = build_contamination_index(["mteb:Nope", "STSBenchmark"], data_dir, local_only=True)
    assert lenient.not_checked == ["mteb:Nope"] and lenient.tasks == ["STSBenchmark"]
    with pytest.raises(DataError, match="not found"):
        build_contamination_index(["SciFact"], data_dir / "nowhere")


def test_default_contamination_tasks_add_the_mined_local_tasks(repo_root: Path) -> None:
    settings = load_settings(repo_root)
    tasks, local_only = contamination_tasks(settings)
    assert local_only and tasks[: len(settings.evaluate.tasks)] == list(settings.evaluate.tasks)
    assert {"EmotionClassification", "TweetSentimentExtractionClassification"} <= set(tasks)


def test_identity_check_and_markdown() -> None:
    source = SourceReport(name="T", kind="classification", file="t.csv", input_rows=10, kept=6)
    source.count("quarantined", "empty or whitespace text", 3)
    source.count("not_sampled", "over data.max_per_task", 1)
    similarity_summary(source, np.array([0.9, 0.5, np.nan], np.float32), np.array([0.1, 0.6, 0.2], np.float32))
    assert (source.guide_scored, source.guide_flagged) == (2, 1)
    report = DataReport([source], {"T": 6}, contamination={"tasks": ["X"], "eval_texts": 3, "rows": 0})
    report.check_identity()
    text = render_markdown(report)
    for heading in ("# Data report", "## Rows per source", "## Why rows were removed", "## Contamination", "verdict"):
        assert heading in text
    assert text == render_markdown(report)  # deterministic
    source.kept = 7
    with pytest.raises(AssertionError, match="row accounting broken"):
        report.check_identity()
    with pytest.raises(ValueError, match="unknown bucket"):
        source.count("lost", "why")
