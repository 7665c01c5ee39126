"""compute_deltas / summarize on hand-made scores: no model, no mteb."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from gist_core.errors import EvaluationError
from gist_core.evaluate import TaskScore, compute_deltas, scores_to_metrics, summarize


def score(task: str, value: float, category: str, main: str = "accuracy") -> TaskScore:
    return TaskScore(
        task=task,
        main_score_name=main,
        main_score=value,
        category=category,
        task_revision=f"rev-{task}",
        mteb_version="2.26.24",
        evaluation_time=1.0,
    )


@pytest.fixture
def candidate() -> dict[str, TaskScore]:
    return {
        "STSBenchmark": score("STSBenchmark", 0.84, "STS", "cosine_spearman"),
        "Banking77Classification": score("Banking77Classification", 0.82, "Classification"),
        "EmotionClassification": score("EmotionClassification", 0.40, "Classification"),
    }


@pytest.fixture
def baseline() -> dict[str, TaskScore]:
    return {
        "STSBenchmark": score("STSBenchmark", 0.82, "STS", "cosine_spearman"),
        "Banking77Classification": score("Banking77Classification", 0.80, "Classification"),
        "EmotionClassification": score("EmotionClassification", 0.41, "Classification"),
    }


def test_scores_to_metrics(candidate: dict[str, TaskScore]) -> None:
    assert scores_to_metrics(candidate) == {
        "STSBenchmark": 0.84,
        "Banking77Classification": 0.82,
        "EmotionClassification": 0.40,
    }


def test_compute_deltas_is_candidate_minus_baseline() -> None:
    deltas = compute_deltas({"a": 0.5, "b": 0.25}, {"b": 0.5, "a": 0.25})
    assert list(deltas) == ["a", "b"]  # the candidate's order
    assert deltas == pytest.approx({"a": 0.25, "b": -0.25})


def test_compute_deltas_of_nothing_is_empty() -> None:
    assert compute_deltas({}, {}) == {}


@pytest.mark.parametrize(
    ("candidate", "baseline", "named"),
    [
        ({"a": 1.0, "b": 1.0}, {"a": 1.0}, ["only candidate ['b']", "only baseline []"]),
        ({"a": 1.0}, {"a": 1.0, "c": 1.0}, ["only candidate []", "only baseline ['c']"]),
        ({"a": 1.0}, {"c": 1.0}, ["only candidate ['a']", "only baseline ['c']"]),
    ],
)
def test_compute_deltas_rejects_different_task_sets(
    candidate: dict[str, float], baseline: dict[str, float], named: list[str]
) -> None:
    with pytest.raises(EvaluationError) as err:
        compute_deltas(candidate, baseline)
    for text in named:
        assert text in str(err.value)


def test_summarize_per_task_category_and_overall(
    candidate: dict[str, TaskScore], baseline: dict[str, TaskScore]
) -> None:
    summary = summarize(candidate, baseline)

    assert summary["tasks"]["STSBenchmark"] == {
        "category": "STS",
        "main_score_name": "cosine_spearman",
        "candidate": 0.84,
        "baseline": 0.82,
        "delta": pytest.approx(0.02),
    }
    assert summary["tasks"]["EmotionClassification"]["delta"] == pytest.approx(-0.01)

    # by hand: Classification = mean(0.82, 0.40) = 0.61 vs mean(0.80, 0.41) = 0.605; deltas +0.02, -0.01
    classification = summary["categories"]["Classification"]
    assert classification["tasks"] == ["Banking77Classification", "EmotionClassification"]
    assert classification["candidate"] == pytest.approx(0.61)
    assert classification["baseline"] == pytest.approx(0.605)
    assert classification["delta"] == pytest.approx(0.005)
    sts = summary["categories"]["STS"]
    assert (sts["tasks"], sts["candidate"], sts["baseline"]) == (["STSBenchmark"], 0.84, 0.82)
    assert sts["delta"] == pytest.approx(0.02)

    # overall: unweighted over the three tasks (not over categories)
    overall = summary["overall"]
    assert overall["tasks"] == ["STSBenchmark", "Banking77Classification", "EmotionClassification"]
    assert overall["candidate"] == pytest.approx((0.84 + 0.82 + 0.40) / 3)
    assert overall["baseline"] == pytest.approx((0.82 + 0.80 + 0.41) / 3)
    assert overall["delta"] == pytest.approx((0.02 + 0.02 - 0.01) / 3)


def test_summary_is_json_serialisable(candidate: dict[str, TaskScore], baseline: dict[str, TaskScore]) -> None:
    summary = summarize(candidate, baseline)
    assert json.loads(json.dumps(summary)) == summary


def test_summarize_rejects_different_task_sets(candidate: dict[str, TaskScore], baseline: dict[str, TaskScore]) -> None:
    del baseline["EmotionClassification"]
    with pytest.raises(EvaluationError, match=r"only candidate \['EmotionClassification'\]"):
        summarize(candidate, baseline)


def test_summarize_rejects_nothing() -> None:
    with pytest.raises(EvaluationError, match="no tasks"):
        summarize({}, {})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("task_revision", "rev-other-data"),
        ("mteb_version", "2.0.0"),
        ("main_score_name", "f1"),
        ("category", "Clustering"),
    ],
)
def test_summarize_rejects_incomparable_scores(
    candidate: dict[str, TaskScore], baseline: dict[str, TaskScore], field: str, value: str
) -> None:
    baseline["Banking77Classification"] = replace(baseline["Banking77Classification"], **{field: value})
    with pytest.raises(EvaluationError, match=f"Banking77Classification: .*{field}"):
        summarize(candidate, baseline)


def test_summarize_rejects_nan(candidate: dict[str, TaskScore], baseline: dict[str, TaskScore]) -> None:
    candidate["STSBenchmark"] = replace(candidate["STSBenchmark"], main_score=float("nan"))
    with pytest.raises(EvaluationError, match="STSBenchmark: main score is nan"):
        summarize(candidate, baseline)


def test_task_score_is_frozen(candidate: dict[str, TaskScore]) -> None:
    with pytest.raises(AttributeError):
        candidate["STSBenchmark"].main_score = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("name", "revision", "message"),
    [
        ("all-MiniLM-L6-v2", "abc123", "org/name"),
        ("/MiniLM", "abc123", "org/name"),
        ("local/MiniLM", "", "single path component"),
        ("local/MiniLM", "a/b", "single path component"),
        ("local/MiniLM", "..", "single path component"),
    ],
)
def test_evaluate_model_rejects_bad_identity(tmp_path, name: str, revision: str, message: str) -> None:
    from gist_core.evaluate import evaluate_model

    # checked before mteb is imported or the model is touched
    with pytest.raises(EvaluationError, match=message):
        evaluate_model(object(), model_name=name, model_revision=revision, tasks=[], cache_dir=tmp_path)  # type: ignore[arg-type]
