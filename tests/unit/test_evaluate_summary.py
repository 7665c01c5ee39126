"""compute_deltas / summarize and its renderings (metrics, Markdown, chart) on hand-made scores: no model, no mteb."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from gist_core.errors import EvaluationError
from gist_core.evaluation.summary import (
    TaskScore,
    compute_deltas,
    plot_deltas,
    scores_to_metrics,
    summarize,
    summary_markdown,
    summary_metrics,
)


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
    summary = summarize(candidate, {"base": baseline})

    assert summary["baselines"] == ["base"]
    assert summary["tasks"]["STSBenchmark"] == {
        "category": "STS",
        "main_score_name": "cosine_spearman",
        "candidate": 0.84,
        "baselines": {"base": 0.82},
        "deltas": {"base": pytest.approx(0.02)},
    }
    assert summary["tasks"]["EmotionClassification"]["deltas"]["base"] == pytest.approx(-0.01)

    # by hand: Classification = mean(0.82, 0.40) = 0.61 vs mean(0.80, 0.41) = 0.605; deltas +0.02, -0.01
    classification = summary["categories"]["Classification"]
    assert classification["tasks"] == ["Banking77Classification", "EmotionClassification"]
    assert classification["candidate"] == pytest.approx(0.61)
    assert classification["baselines"]["base"] == pytest.approx(0.605)
    assert classification["deltas"]["base"] == pytest.approx(0.005)
    sts = summary["categories"]["STS"]
    assert (sts["tasks"], sts["candidate"], sts["baselines"]) == (["STSBenchmark"], 0.84, {"base": 0.82})
    assert sts["deltas"]["base"] == pytest.approx(0.02)

    # overall: unweighted over the three tasks (not over categories)
    overall = summary["overall"]
    assert overall["tasks"] == ["STSBenchmark", "Banking77Classification", "EmotionClassification"]
    assert overall["candidate"] == pytest.approx((0.84 + 0.82 + 0.40) / 3)
    assert overall["baselines"]["base"] == pytest.approx((0.82 + 0.80 + 0.41) / 3)
    assert overall["deltas"]["base"] == pytest.approx((0.02 + 0.02 - 0.01) / 3)

    # and MTEB's "Mean (TaskType)": the mean of the two category means
    by_type = summary["overall_by_category"]
    assert by_type["categories"] == ["Classification", "STS"]
    assert by_type["candidate"] == pytest.approx((0.61 + 0.84) / 2)
    assert by_type["baselines"]["base"] == pytest.approx((0.605 + 0.82) / 2)
    assert by_type["deltas"]["base"] == pytest.approx((0.005 + 0.02) / 2)


@pytest.fixture
def five_categories() -> tuple[dict[str, TaskScore], dict[str, TaskScore], dict[str, TaskScore]]:
    """Candidate, base and champion on six tasks of five MTEB types (hand-made numbers)."""
    rows = [  # task, type, main score, candidate, base, champion
        ("STSBenchmark", "STS", "cosine_spearman", 0.84, 0.82, 0.83),
        ("SICK-R", "STS", "cosine_spearman", 0.80, 0.78, 0.81),
        ("Banking77Classification", "Classification", "accuracy", 0.82, 0.80, 0.80),
        ("SciFact", "Retrieval", "ndcg_at_10", 0.66, 0.645, 0.67),
        ("TwentyNewsgroupsClustering", "Clustering", "v_measure", 0.47, 0.46, 0.46),
        ("SprintDuplicateQuestions", "PairClassification", "max_ap", 0.94, 0.95, 0.94),
    ]
    out: tuple[dict[str, TaskScore], ...] = ({}, {}, {})
    for task, category, main, *values in rows:
        for scores, value in zip(out, values, strict=True):
            scores[task] = score(task, value, category, main)
    return out  # type: ignore[return-value]


def test_category_means_against_base_and_champion(five_categories) -> None:
    candidate, base, champion = five_categories
    summary = summarize(candidate, {"base": base, "champion": champion})

    assert summary["baselines"] == ["base", "champion"]
    assert list(summary["categories"]) == ["Classification", "Clustering", "PairClassification", "Retrieval", "STS"]
    sts = summary["categories"]["STS"]
    assert sts["tasks"] == ["STSBenchmark", "SICK-R"]
    assert sts["candidate"] == pytest.approx(0.82)  # (0.84 + 0.80) / 2
    assert sts["baselines"] == pytest.approx({"base": 0.80, "champion": 0.82})
    assert sts["deltas"] == pytest.approx({"base": 0.02, "champion": 0.0})
    assert summary["categories"]["Retrieval"]["deltas"] == pytest.approx({"base": 0.015, "champion": -0.01})
    assert summary["categories"]["PairClassification"]["deltas"] == pytest.approx({"base": -0.01, "champion": 0.0})
    assert summary["tasks"]["SICK-R"]["deltas"] == pytest.approx({"base": 0.02, "champion": -0.01})

    overall = summary["overall"]  # six tasks, unweighted
    assert overall["candidate"] == pytest.approx((0.84 + 0.80 + 0.82 + 0.66 + 0.47 + 0.94) / 6)
    assert overall["deltas"]["champion"] == pytest.approx((0.01 - 0.01 + 0.02 - 0.01 + 0.01 + 0.0) / 6)
    by_type = summary["overall_by_category"]  # five category means, unweighted: STS counts once
    assert by_type["candidate"] == pytest.approx((0.82 + 0.82 + 0.94 + 0.66 + 0.47) / 5)
    assert by_type["deltas"]["base"] == pytest.approx((0.02 + 0.02 - 0.01 + 0.015 + 0.01) / 5)


def test_summary_metrics_names(five_categories) -> None:
    candidate, base, champion = five_categories
    metrics = summary_metrics(summarize(candidate, {"base": base, "champion": champion}))

    assert metrics["eval/STSBenchmark"] == 0.84
    assert metrics["base/STSBenchmark"] == 0.82
    assert metrics["champion/STSBenchmark"] == 0.83
    assert metrics["delta/STSBenchmark"] == pytest.approx(0.02)  # vs base, as before champions existed
    assert metrics["delta_champion/STSBenchmark"] == pytest.approx(0.01)
    assert metrics["eval/category/STS"] == pytest.approx(0.82)
    assert metrics["delta_champion/category/Retrieval"] == pytest.approx(-0.01)
    assert metrics["eval/overall"] == pytest.approx((0.84 + 0.80 + 0.82 + 0.66 + 0.47 + 0.94) / 6)
    assert "champion/overall_by_category" in metrics
    # 6 tasks + 5 categories + 2 overall means, each: eval, base, champion, delta, delta_champion
    assert len(metrics) == (6 + 5 + 2) * 5


def test_summary_markdown_table(five_categories) -> None:
    candidate, base, champion = five_categories
    text = summary_markdown(summarize(candidate, {"base": base, "champion": champion}), title="Run 7")

    lines = text.splitlines()
    assert lines[0] == "## Run 7"
    assert "| task | type | main score | candidate | base | Δ base | champion | Δ champion |" in lines
    assert "| SciFact | Retrieval | ndcg_at_10 | 0.6600 | 0.6450 | +0.0150 | 0.6700 | -0.0100 |" in lines
    assert any(line.startswith("| **STS mean** (2 tasks) | STS |") for line in lines)
    assert any(line.startswith("| **mean over types** (5) |") for line in lines)
    assert sum(line.startswith("| ") for line in lines) == 1 + 6 + 5 + 2  # header + rows


def test_plot_deltas_writes_a_png(five_categories, tmp_path) -> None:
    candidate, base, champion = five_categories
    path = plot_deltas(summarize(candidate, {"base": base, "champion": champion}), tmp_path / "out" / "deltas.png")

    assert path == tmp_path / "out" / "deltas.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000


def test_summary_is_json_serialisable(candidate: dict[str, TaskScore], baseline: dict[str, TaskScore]) -> None:
    summary = summarize(candidate, {"base": baseline, "champion": baseline})
    assert json.loads(json.dumps(summary)) == summary


def test_summarize_rejects_different_task_sets(candidate: dict[str, TaskScore], baseline: dict[str, TaskScore]) -> None:
    del baseline["EmotionClassification"]
    with pytest.raises(EvaluationError, match=r"only candidate \['EmotionClassification'\]"):
        summarize(candidate, {"base": baseline})


def test_summarize_rejects_nothing(baseline: dict[str, TaskScore]) -> None:
    with pytest.raises(EvaluationError, match="no tasks"):
        summarize({}, {"base": {}})
    with pytest.raises(EvaluationError, match="no baseline"):
        summarize(baseline, {})


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
    champion = dict(baseline)
    champion["Banking77Classification"] = replace(baseline["Banking77Classification"], **{field: value})
    # a mismatch with any baseline is an error, never a silent comparison
    with pytest.raises(EvaluationError, match=f"Banking77Classification: candidate and champion .*{field}"):
        summarize(candidate, {"base": baseline, "champion": champion})


def test_summarize_rejects_nan(candidate: dict[str, TaskScore], baseline: dict[str, TaskScore]) -> None:
    candidate["STSBenchmark"] = replace(candidate["STSBenchmark"], main_score=float("nan"))
    with pytest.raises(EvaluationError, match="STSBenchmark: main score is nan"):
        summarize(candidate, {"base": baseline})


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
    from gist_core.evaluation.evaluate import evaluate_model

    # checked before mteb is imported or the model is touched
    with pytest.raises(EvaluationError, match=message):
        evaluate_model(object(), model_name=name, model_revision=revision, tasks=[], cache_dir=tmp_path)  # type: ignore[arg-type]
