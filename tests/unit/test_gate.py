from __future__ import annotations

import pytest

from gist_core.config import GateSettings
from gist_core.gate import decide

BASE = {"STSBenchmark": 0.82, "Banking77Classification": 0.80}


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
        # mean up, but one task regresses by more than allowed
        ({"STSBenchmark": 0.90, "Banking77Classification": 0.78}, {}, False, ["max_task_regression"]),
        # a regression exactly at the limit is allowed
        (
            {"STSBenchmark": 0.84, "Banking77Classification": 0.79},
            {"max_task_regression": 0.01 + 1e-12},
            True,
            [],
        ),
        # a missing task blocks, and so does a missing required task
        ({"STSBenchmark": 0.90}, {}, False, ["complete"]),
        (
            {"STSBenchmark": 0.90},
            {"required_tasks": ["Banking77Classification"]},
            False,
            ["required_tasks", "complete"],
        ),
        ({}, {}, False, ["complete"]),
    ],
)
def test_rules(candidate, kw, passed, failed_rules) -> None:
    decision = decide(candidate, BASE, policy(**kw), "base")
    assert decision.passed is passed
    assert [r.rule for r in decision.rules if not r.passed] == failed_rules
    assert decision.promote is passed
    assert decision.verdict == ("passed" if passed else "blocked")
    if not passed:
        assert decision.reasons and "blocked" in decision.summary()


def test_dry_run_decides_but_never_promotes() -> None:
    good = {"STSBenchmark": 0.9, "Banking77Classification": 0.9}
    decision = decide(good, BASE, policy(mode="dry_run"))
    assert decision.passed and not decision.promote
    assert decision.to_dict()["promote"] is False


def test_disabled_promotes_without_rules() -> None:
    decision = decide({"STSBenchmark": 0.1}, BASE, policy(mode="disabled"))
    assert decision.passed and decision.promote and decision.rules == ()


def test_deltas_recorded() -> None:
    decision = decide({"STSBenchmark": 0.85, "Banking77Classification": 0.80}, BASE, policy())
    assert decision.deltas == pytest.approx({"STSBenchmark": 0.03, "Banking77Classification": 0.0})
    mean_rule = next(r for r in decision.rules if r.rule == "min_mean_delta")
    assert mean_rule.observed == pytest.approx(0.015)
