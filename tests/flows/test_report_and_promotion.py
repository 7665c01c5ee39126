"""What the UI shows for a run, and the gate's transaction: a failure after promotion rolls it back."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows import pipeline, report
from flows.parameters import PROJECT_ENV
from gist_core import stages
from gist_core.config import settings_from_dict, with_overrides
from gist_core.gate import GateDecision, RuleOutcome
from gist_core.registry import client, history, promotion, tags, versions
from gist_core.versioning import DataVersion
from tests.support.projects import REPO

EVALUATION = stages.EvalOutput(
    candidate={"STSBenchmark": 0.83, "Banking77Classification": 0.79},
    baseline={"STSBenchmark": 0.82, "Banking77Classification": 0.80},
    baseline_name="base",
    summary={},
    task_revisions={},
    mteb_version="2",
    path="reports/eval.json",
)
DECISION = GateDecision(
    "enabled",
    False,
    "base",
    (
        RuleOutcome("min_mean_delta", True, "mean delta +0.0000 >= 0.0000", 0.0, 0.0),
        RuleOutcome("max_task_regression", False, "Banking77Classification dropped 0.0100", 0.01, 0.005),
    ),
    {"STSBenchmark": 0.01, "Banking77Classification": -0.01},
)
DATA = DataVersion("data", "data/prepared/triplets.parquet", "abc123", "local /tmp/remote")


@pytest.fixture()
def settings(tmp_path: Path):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    return settings_from_dict(raw, tmp_path)


def test_score_and_rule_tables() -> None:
    rows = report.score_rows(EVALUATION)
    assert rows[1] == {"task": "Banking77Classification", "candidate": 0.79, "base": 0.8, "delta vs base": -0.01}
    with_champion = stages.EvalOutput(
        **{**EVALUATION.to_dict(), "baselines": {"base": EVALUATION.baseline, "champion": {"STSBenchmark": 0.84}}}
    )
    row = report.score_rows(with_champion)[0]
    assert row["champion"] == 0.84 and row["delta vs champion"] == -0.01 and row["delta vs base"] == 0.01
    assert report.score_rows(with_champion)[1]["champion"] is None
    rules = report.rule_rows(DECISION)
    assert [r["outcome"] for r in rules] == ["pass", "FAIL"]
    assert rules[1]["threshold"] == 0.005 and "dropped" in rules[1]["detail"]


def test_links_only_for_an_mlflow_server(settings) -> None:
    version = versions.RegisteredVersion("gist-embedding", "3", "r1", (), "models:/gist-embedding/3")
    assert report.mlflow_links(settings, version, "1") == {}
    server = with_overrides(settings, {"registry.tracking_uri": "http://mlflow:5000/"})
    assert report.mlflow_links(server, version, "7") == {
        report.RUN_LINK_KEY: "http://mlflow:5000/#/experiments/7/runs/r1",
        report.MODEL_LINK_KEY: "http://mlflow:5000/#/models/gist-embedding/versions/3",
    }
    markdown = report.report_markdown(
        server, "r1", EVALUATION, DECISION, version, DATA, report.mlflow_links(server, version, "7")
    )
    assert markdown.startswith("# gate blocked (mode enabled, baseline base): Banking77Classification dropped")
    assert "| task | candidate | base | delta vs base |" in markdown
    assert "| Banking77Classification | 0.7900 | 0.8000 | -0.0100 |" in markdown
    assert "| `max_task_regression` | FAIL |" in markdown
    assert (
        "Data version: `abc123`" in markdown and "(http://mlflow:5000/#/models/gist-embedding/versions/3)" in markdown
    )


def _versions(settings, count: int) -> list[versions.RegisteredVersion]:
    mlc = client.client(settings)
    mlc.create_registered_model("gist-embedding")
    out = []
    for _ in range(count):
        v = mlc.create_model_version("gist-embedding", source=str(settings.root / "model"))
        out.append(
            versions.RegisteredVersion("gist-embedding", str(v.version), "", (), f"models:/gist-embedding/{v.version}")
        )
    return out


def _aliases(settings) -> dict[str, str]:
    model = client.client(settings).get_registered_model("gist-embedding")
    return {alias: str(version) for alias, version in model.aliases.items()}


def test_a_failure_after_the_gate_rolls_the_promotion_back(settings, prefect_harness, monkeypatch) -> None:
    from prefect import flow

    first, second = _versions(settings, 2)
    passed = GateDecision("enabled", True, "base", (), {})
    promotion.promote(settings, first, passed, expected_champion=None)

    def register_through_the_gate(settings_, run_id, candidate_dir, evaluation, data):
        promoted = promotion.promote(settings_, second, passed, expected_champion=first.version)
        assert _aliases(settings) == {"challenger": "2", "champion": "2"}, "the promotion happened"
        return promoted.version, promoted.decision

    def broken_publish(*args, **kwargs):
        raise RuntimeError("artifact store unavailable")

    monkeypatch.setattr(stages, "run_register", register_through_the_gate)
    monkeypatch.setattr(report, "publish", broken_publish)

    @flow
    def gate_only() -> None:
        pipeline.register_and_publish(settings, "run", "candidate", EVALUATION, DATA)

    state = gate_only(return_state=True)
    assert state.is_failed() and "artifact store unavailable" in state.message
    assert _aliases(settings) == {"champion": "1"}, "challenger removed, champion back on the previous version"
    assert tags.ROLLED_BACK_TAG in versions.version_tags(settings, "2")
    events = history.champion_events(settings, "gist-embedding")
    assert [(e.kind, e.version, e.previous) for e in events] == [
        ("promote", "1", None),
        ("promote", "2", "1"),
        ("revoke", "1", "2"),
    ]


def test_bad_parameters_fail_the_run_before_any_work(prefect_harness, monkeypatch) -> None:
    monkeypatch.setenv(PROJECT_ENV, str(REPO))
    state = pipeline.gist_pipeline(params={"data_sources": ["MEDI"]}, return_state=True)
    assert state.is_failed()
    assert state.message.startswith("stage preflight failed: ConfigError: data_sources: unknown ['MEDI']")
    state = pipeline.gist_pipeline(params={"max_steps": 0}, return_state=True)
    assert state.is_failed() and "params.max_steps" in state.message and "greater than or equal to 1" in state.message
    state = pipeline.gist_pipeline(params={"epochs": -1}, return_state=True)
    assert state.is_failed() and "params.epochs" in state.message and "greater than 0" in state.message
    state = pipeline.gist_pipeline(params={"max_steps": 3, "epochs": 1}, return_state=True)
    assert state.is_failed() and "not both" in state.message


def test_parallel_evaluation_fans_out_one_task_per_entry(settings, prefect_harness, monkeypatch) -> None:
    from prefect import flow

    settings = with_overrides(
        settings,
        {
            "orchestration.parallel_evaluation": True,
            "evaluate.tasks": ["STSBenchmark", "Banking77Classification"],
            "gate.required_tasks": ["STSBenchmark"],
        },
    )
    calls = []

    def fake_evaluate(settings_, candidate_dir, run_id, champion_dir=None):
        calls.append((tuple(settings_.evaluate.tasks), settings_.evaluate.output, run_id, champion_dir))
        return EVALUATION

    monkeypatch.setattr(stages, "run_evaluate", fake_evaluate)
    monkeypatch.setattr(stages, "run_fetch_champion", lambda settings_: None)

    @flow
    def evaluate_only():
        return pipeline.evaluate_stage(settings, "outputs/candidate", "run-1")

    assert evaluate_only() == EVALUATION
    parts = sorted(c for c in calls if c[2] is None)
    assert parts == [
        (("Banking77Classification",), ".cache/mteb/parts/Banking77Classification.json", None, None),
        (("STSBenchmark",), ".cache/mteb/parts/STSBenchmark.json", None, None),
    ]
    assert calls[-1] == (("STSBenchmark", "Banking77Classification"), "reports/eval.json", "run-1", None)
    hub = pipeline.part_settings(settings, "mteb:MTEB(eng, v2)")
    assert hub.evaluate.output == ".cache/mteb/parts/mteb_MTEB_eng_v2_.json" and hub.gate.required_tasks == []


def test_a_busy_prefect_promotion_limit_is_a_clear_registry_error(settings, prefect_harness) -> None:
    """With a Prefect API, promotions of one model queue in its global concurrency limit; waiting too
    long is the same RegistryError as the registry's own lock, naming the limit."""
    from prefect.client.orchestration import get_client

    import flows.locks
    from gist_core.errors import RegistryError
    from gist_core.registry import locks

    assert flows.locks.prefect_promotion_limit in locks._outer_locks, "importing flows registers the limit"
    name = "gist-limit-test"
    with flows.locks.prefect_promotion_limit(name, 5):
        with get_client(sync_client=True) as c:
            limit = c.read_global_concurrency_limit_by_name(flows.locks.limit_name(name))
        assert limit.limit == 1 and limit.active_slots == 1
        busy = pytest.raises(RegistryError, match=f"another promotion of '{name}' held the Prefect concurrency limit")
        with busy, flows.locks.prefect_promotion_limit(name, 0.3):
            pass
    with flows.locks.prefect_promotion_limit(name, 5):  # released on exit
        pass


def test_an_unchanged_run_ends_in_its_own_completed_state(settings) -> None:
    record = versions.VersionRecord(
        name="gist-embedding",
        version="3",
        run_id="run-of-v3",
        created=0,
        aliases=("challenger", "champion"),
        tags={"gist.gate.verdict": "passed", "gist.model_fingerprint": "f" * 64},
        description="",
    )
    result = stages.UnchangedResult(DATA, "rerun", {"reused": True, "key": "k" * 16}, record)
    state = pipeline.final_state(result)
    assert state.is_completed() and state.name == pipeline.UNCHANGED_STATE == "Unchanged"
    assert state.message.startswith("unchanged: same model as version 3 (passed, challenger, champion); nothing")
    assert "(training reused)" in state.message
    markdown = report.unchanged_markdown(settings, result)
    assert markdown.startswith("# unchanged: same model as version 3") and "f" * 64 in markdown
    assert "the promotion gate was not asked" in markdown and "reused the kept model" in markdown
