"""The promotion gate as a pure function: table-driven rules, ties, missing and failed tasks, provenance."""

from __future__ import annotations

import json

import pytest

from gist_core.config import GateSettings
from gist_core.gate import Scorecard, choose_baseline, decide

BASE = {"STSBenchmark": 0.82, "Banking77Classification": 0.80}
CATEGORIES = {"STSBenchmark": "STS", "Banking77Classification": "Classification", "SciFact": "Retrieval"}
REVS = {"STSBenchmark": "r-sts", "Banking77Classification": "r-b77"}


def policy(**kw) -> GateSettings:
    defaults = {"mode": "enabled", "min_mean_delta": 0.0, "max_task_regression": 0.01, "required_tasks": []}
    return GateSettings(**{**defaults, **kw})


@pytest.mark.parametrize(
    ("candidate", "kw", "passed", "failed_rules"),
    [
        ({"STSBenchmark": 0.83, "Banking77Classification": 0.81}, {}, True, []),
        # a tie on the mean passes a minimum of 0 (>=), fails a positive one
        ({"STSBenchmark": 0.82, "Banking77Classification": 0.80}, {}, True, []),
        (
            {"STSBenchmark": 0.82, "Banking77Classification": 0.80},
            {"min_mean_delta": 0.001},
            False,
            ["min_mean_delta"],
        ),
        # a tie exactly at a positive minimum passes despite floating point (0.83 - 0.82 != 0.01)
        ({"STSBenchmark": 0.83, "Banking77Classification": 0.81}, {"min_mean_delta": 0.01}, True, []),
        # mean up, but one task regresses by more than allowed
        ({"STSBenchmark": 0.90, "Banking77Classification": 0.78}, {}, False, ["max_task_regression"]),
        # a regression exactly at the limit is allowed (a tie), one point more is not
        ({"STSBenchmark": 0.84, "Banking77Classification": 0.79}, {}, True, []),
        ({"STSBenchmark": 0.84, "Banking77Classification": 0.789}, {}, False, ["max_task_regression"]),
        # a missing task blocks, and so does a missing required task
        ({"STSBenchmark": 0.90}, {}, False, ["complete"]),
        (
            {"STSBenchmark": 0.90},
            {"required_tasks": ["Banking77Classification"]},
            False,
            ["required_tasks", "complete"],
        ),
        ({}, {}, False, ["complete"]),
        # extra candidate tasks the baseline lacks are fine unless required
        ({"STSBenchmark": 0.83, "Banking77Classification": 0.81, "SciFact": 0.5}, {}, True, []),
        (
            {"STSBenchmark": 0.83, "Banking77Classification": 0.81, "SciFact": 0.5},
            {"required_tasks": ["SciFact"]},
            False,
            ["required_tasks"],
        ),
        # per category: STS may drop half a point, Classification must not drop
        (
            {"STSBenchmark": 0.815, "Banking77Classification": 0.81},
            {"min_category_delta": {"STS": -0.005, "Classification": 0.0}},
            True,
            [],
        ),
        (
            {"STSBenchmark": 0.814, "Banking77Classification": 0.81},
            {"min_category_delta": {"STS": -0.005, "Classification": 0.0}},
            False,
            ["min_category_delta[STS]"],
        ),
        (
            {"STSBenchmark": 0.85, "Banking77Classification": 0.7999},
            {"min_category_delta": {"STS": -0.005, "Classification": 0.0}},
            False,
            ["min_category_delta[Classification]"],
        ),
        # a category with no scored task is skipped (completeness is required_tasks' job)
        (
            {"STSBenchmark": 0.83, "Banking77Classification": 0.81},
            {"min_category_delta": {"Retrieval": 0.05}},
            True,
            [],
        ),
    ],
)
def test_rules(candidate, kw, passed, failed_rules) -> None:
    decision = decide(candidate, BASE, policy(**kw), "base", categories=CATEGORIES)
    assert decision.passed is passed
    assert [r.rule for r in decision.rules if not r.passed] == failed_rules
    assert decision.promote is passed
    assert decision.verdict == ("passed" if passed else "blocked")
    if not passed:
        assert decision.reasons and "blocked" in decision.summary()


def test_category_rule_needs_categories() -> None:
    decision = decide(
        {"STSBenchmark": 0.9, "Banking77Classification": 0.9}, BASE, policy(min_category_delta={"STS": 0.0})
    )
    rule = next(r for r in decision.rules if r.rule == "min_category_delta[STS]")
    assert not rule.passed and "category unknown" in rule.detail


def test_category_rule_records_mean_over_its_tasks() -> None:
    base = {**BASE, "STS22": 0.60}
    cand = {"STSBenchmark": 0.83, "Banking77Classification": 0.80, "STS22": 0.58}
    decision = decide(cand, base, policy(min_category_delta={"STS": -0.01}), categories={**CATEGORIES, "STS22": "STS"})
    rule = next(r for r in decision.rules if r.rule == "min_category_delta[STS]")
    assert rule.observed == pytest.approx(-0.005) and rule.threshold == -0.01 and rule.passed


def card(scores, revs=REVS, mteb="2.26.24", failed=(), label="candidate", version=None) -> Scorecard:
    return Scorecard(label, scores, revs, mteb, tuple(failed), version)


GOOD = {"STSBenchmark": 0.83, "Banking77Classification": 0.81}


@pytest.mark.parametrize(
    ("candidate", "baseline", "kw", "failed_rules", "detail"),
    [
        (card(GOOD), card(BASE, label="champion", version="3"), {}, [], None),
        # evaluated on other task data than the champion was
        (
            card(GOOD, revs={**REVS, "STSBenchmark": "r-new"}),
            card(BASE, label="champion", version="3"),
            {},
            ["comparable"],
            "STSBenchmark r-new vs r-sts",
        ),
        # another mteb version
        (card(GOOD, mteb="2.27.0"), card(BASE, label="champion", version="3"), {}, ["comparable"], "mteb 2.27.0"),
        # a champion registered without provenance cannot be compared with
        (
            card(GOOD),
            card(BASE, revs=None, mteb=None, label="champion", version="3"),
            {},
            ["comparable"],
            "unknown",
        ),
        # a required task that failed for the candidate blocks even if the baseline has it
        (
            card({"STSBenchmark": 0.83}, failed=["Banking77Classification"]),
            card(BASE, label="champion", version="3"),
            {"required_tasks": ["Banking77Classification"]},
            ["required_tasks", "complete"],
            "failed for the candidate",
        ),
        # a failed task that is not required still makes the evaluation incomplete
        (
            card({**GOOD, "SciFact": 0.1}, failed=["SciFact"]),
            card(BASE, label="champion", version="3"),
            {},
            ["complete"],
            "SciFact",
        ),
        # the champion lacks a required task (added since it was registered)
        (
            card({**GOOD, "SciFact": 0.6}, revs={**REVS, "SciFact": "r-sf"}),
            card(BASE, label="champion", version="3"),
            {"required_tasks": ["SciFact"]},
            ["required_tasks"],
            "not scored for the champion v3",
        ),
    ],
)
def test_evaluation_must_be_complete_and_comparable(candidate, baseline, kw, failed_rules, detail) -> None:
    decision = decide(candidate, baseline, policy(**kw))
    assert [r.rule for r in decision.rules if not r.passed] == failed_rules
    assert decision.passed is (not failed_rules)
    if detail:
        assert detail in decision.summary()
    assert decision.baseline == "champion" and decision.baseline_version == "3"
    assert "baseline champion v3" in decision.summary()


@pytest.mark.parametrize(
    ("mode", "champion", "expected"),
    [("champion", True, "champion"), ("champion", False, "base"), ("base", True, "base")],
)
def test_choose_baseline(mode, champion, expected) -> None:
    base = card(BASE, label="base")
    champ = card(BASE, label="champion", version="2") if champion else None
    assert choose_baseline(base, champ, policy(baseline=mode)).label == expected


def test_dry_run_decides_but_never_promotes() -> None:
    good = {"STSBenchmark": 0.9, "Banking77Classification": 0.9}
    decision = decide(good, BASE, policy(mode="dry_run"))
    assert decision.passed and not decision.promote
    assert decision.to_dict()["promote"] is False


def test_disabled_promotes_without_rules_but_keeps_the_table() -> None:
    decision = decide({"STSBenchmark": 0.1}, BASE, policy(mode="disabled"))
    assert decision.passed and decision.promote and decision.rules == ()
    assert {row.task for row in decision.table} == set(BASE)
    assert "no rules applied" in decision.markdown()


def test_deltas_recorded() -> None:
    decision = decide({"STSBenchmark": 0.85, "Banking77Classification": 0.80}, BASE, policy())
    assert decision.deltas == pytest.approx({"STSBenchmark": 0.03, "Banking77Classification": 0.0})
    mean_rule = next(r for r in decision.rules if r.rule == "min_mean_delta")
    assert mean_rule.observed == pytest.approx(0.015)


def test_audit_record_has_thresholds_table_and_rules() -> None:
    pol = policy(min_category_delta={"STS": -0.005}, required_tasks=["STSBenchmark"])
    decision = decide(
        card({"STSBenchmark": 0.80, "Banking77Classification": 0.81}),
        card(BASE, label="champion", version="4"),
        pol,
        categories=CATEGORIES,
    )
    record = json.loads(json.dumps(decision.to_dict()))  # JSON-able
    assert record["thresholds"]["min_category_delta"] == {"STS": -0.005}
    assert record["thresholds"]["max_task_regression"] == 0.01
    rows = {row["task"]: row for row in record["table"]}
    assert rows["STSBenchmark"]["delta"] == pytest.approx(-0.02) and rows["STSBenchmark"]["category"] == "STS"
    assert {r["rule"] for r in record["rules"]} >= {"required_tasks", "comparable", "min_category_delta[STS]"}
    assert record["verdict"] == "blocked" and record["baseline_version"] == "4"
    md = decision.markdown()
    assert "| STSBenchmark | STS | 0.8000 | 0.8200 | -0.0200 |" in md
    assert "FAIL `max_task_regression`" in md and "pass `comparable`" in md


def test_a_tie_blocks_by_default_and_the_decision_says_tie() -> None:
    """params.yaml's min_mean_delta is positive: a candidate that changes no score is not promoted."""
    default = GateSettings(required_tasks=[])
    assert default.min_mean_delta > 0
    same = dict(BASE)
    decision = decide(card(same), card(BASE, label="champion", version="1"), default)
    assert not decision.passed and decision.tie
    assert [r.rule for r in decision.rules if not r.passed] == ["min_mean_delta"]
    assert "tie: every task scores the same as champion v1" in decision.summary()
    # scores equal at mteb's 6 stored decimals are a tie even if float noise differs
    assert decide({"STSBenchmark": 0.82 + 1e-9, "Banking77Classification": 0.80}, BASE, default).tie
    # a tie that an explicit policy lets through still says so
    lenient = decide(card(same), card(BASE, label="champion", version="1"), policy(min_mean_delta=0.0))
    assert lenient.passed and lenient.summary().endswith("; tie: every task scores the same as champion v1")
    # not a tie: one task moved (and the default minimum is met)
    moved = decide({"STSBenchmark": 0.83, "Banking77Classification": 0.80}, BASE, default)
    assert moved.passed and not moved.tie and "tie" not in moved.summary()


def test_no_task_in_common_with_the_baseline_blocks() -> None:
    decision = decide(card({"SciFact": 0.7}, revs={"SciFact": "r"}), card({}, label="champion", version="2"), policy())
    assert not decision.passed and decision.deltas == {}
    assert [r.rule for r in decision.rules if not r.passed] == ["complete"]
    assert "no task in common with champion v2" in decision.summary()


F32 = {"precision": "float32", "max_seq_length": "model", "libraries": "sentence-transformers==6.2.0"}


@pytest.mark.parametrize(
    ("candidate", "baseline", "detail"),
    [
        ({**F32, "precision": "bfloat16"}, F32, "precision bfloat16 vs float32"),
        ({**F32, "max_seq_length": "128"}, F32, "max_seq_length 128 vs model"),
        ({**F32, "libraries": "sentence-transformers==6.3.0"}, F32, "libraries sentence-transformers==6.3.0 vs"),
        (F32, None, "evaluation settings (precision, max_seq_length, libraries) unknown for champion v3"),
    ],
)
def test_evaluation_settings_must_match(candidate, baseline, detail) -> None:
    cand = Scorecard("candidate", GOOD, REVS, "2.26.24", eval_settings=candidate)
    champ = Scorecard("champion", BASE, REVS, "2.26.24", version="3", eval_settings=baseline)
    decision = decide(cand, champ, policy())
    assert [r.rule for r in decision.rules if not r.passed] == ["comparable"]
    assert detail in decision.summary()
    same = decide(cand, Scorecard("champion", BASE, REVS, "2.26.24", version="3", eval_settings=candidate), policy())
    assert same.passed
    rule = next(r for r in same.rules if r.rule == "comparable")
    assert "evaluation settings" in rule.detail
