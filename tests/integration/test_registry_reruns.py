"""Reruns and retries change nothing: one version per run and per model, and a crash mid-promotion is recoverable.

Against a real MLflow SQLite store with a tiny random model. Failures are injected into the real
MLflow client at the step named, as an unreachable registry would fail (every retry fails too).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from gist_core import stages
from gist_core.errors import RegistryError
from gist_core.models import fingerprint
from gist_core.registry import card, client, history, promotion, tracking, versions
from gist_core.registry.tags import FINGERPRINT_TAG, PROMOTION_TAG
from tests.support.mlflow_store import copy_db, migrated_sqlite_db
from tests.support.registry import DATA, F32, evaluation, make_settings, register, variant


@pytest.fixture(scope="session")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return migrated_sqlite_db(tmp_path_factory.mktemp("mlflow-template") / "mlflow.db")


@pytest.fixture
def settings(tmp_path: Path, repo_root: Path, template_db: Path):
    copy_db(template_db, tmp_path / "store" / "mlflow.db")
    return make_settings(tmp_path, repo_root)


def _unavailable() -> Exception:
    from mlflow.exceptions import MlflowException

    return MlflowException("connection refused", error_code="TEMPORARILY_UNAVAILABLE")


def _fail_after_the_alias_moved(monkeypatch: pytest.MonkeyPatch, step: str) -> dict[str, int]:
    """Make one registry call fail for good, once champion has moved: ``step`` names which."""
    from mlflow import MlflowClient

    state = {"moved": 0, "failed": 0}
    real_alias, real_model_tag = MlflowClient.set_registered_model_alias, MlflowClient.set_registered_model_tag
    real_version_tag = MlflowClient.set_model_version_tag

    def alias(self, name, alias_name, version):
        real_alias(self, name, alias_name, version)
        if alias_name == "champion":
            state["moved"] += 1

    def model_tag(self, name, key, value):
        if step == "event" and state["moved"] and json.loads(value).get("state") == "done":
            state["failed"] += 1
            raise _unavailable()
        return real_model_tag(self, name, key, value)

    def version_tag(self, name, version, key, value):
        if step == "decision" and state["moved"] and key == "gist.gate.verdict":
            state["failed"] += 1
            raise _unavailable()
        return real_version_tag(self, name, version, key, value)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", alias)
    monkeypatch.setattr(MlflowClient, "set_registered_model_tag", model_tag)
    monkeypatch.setattr(MlflowClient, "set_model_version_tag", version_tag)
    return state


@pytest.mark.parametrize("step", ["event", "decision"])
def test_retried_register_finishes_the_same_version(settings, tiny_model_dir: Path, monkeypatch, step) -> None:
    """A registry failure after the alias moved; the step is retried: one version, one champion, one event."""
    model = variant(tiny_model_dir, settings.root)
    run_id = tracking.start_run(settings, "flaky")
    state = _fail_after_the_alias_moved(monkeypatch, step)
    with pytest.raises(RegistryError, match="failed 2 time"):
        stages.run_register(settings, run_id, model, evaluation(0.80), DATA)
    assert state["moved"] == 1 and state["failed"] == 2
    (pending,) = versions.list_versions(settings)
    assert pending.pending and versions.champion_version(settings) == pending.version
    monkeypatch.undo()  # the registry answers again; Prefect retries the task with the same inputs

    version, decision = stages.run_register(settings, run_id, model, evaluation(0.80), DATA)
    assert version.version == pending.version and decision.passed and decision.baseline == "base"
    assert version.aliases == ("challenger", "champion")
    listed = versions.list_versions(settings)
    assert [v.version for v in listed] == [version.version], "one version"
    assert listed[0].tags[PROMOTION_TAG] == "done" and listed[0].tags["gist.gate.verdict"] == "passed"
    assert versions.champion_version(settings) == version.version, "one champion"
    events = history.champion_events(settings)
    assert [(e.kind, e.version, e.state) for e in events] == [("promote", version.version, "done")], "one event"
    assert "# gist-test version 1" in card.read_card(settings, version.version)

    # a third call (the task retried once more) changes nothing either
    again, decision_again = stages.run_register(settings, run_id, model, evaluation(0.80), DATA)
    assert (again.version, again.aliases, decision_again.passed) == (version.version, version.aliases, True)
    assert len(versions.list_versions(settings)) == 1 and len(history.champion_events(settings)) == 1


def test_a_retry_decides_against_the_champion_it_replaced(settings, tiny_model_dir: Path, monkeypatch) -> None:
    """The retried promotion is recorded against v1 (what it replaced), not against itself (deltas 0)."""
    _, v1, _ = register(settings, tiny_model_dir, 0.80)
    model = variant(tiny_model_dir, settings.root)
    run_id = tracking.start_run(settings, "flaky")
    _fail_after_the_alias_moved(monkeypatch, "event")
    with pytest.raises(RegistryError):
        stages.run_register(settings, run_id, model, evaluation(0.83), DATA)
    monkeypatch.undo()
    version, decision = stages.run_register(settings, run_id, model, evaluation(0.83), DATA)
    assert decision.passed and decision.baseline_label == f"champion v{v1.version}"
    assert decision.deltas["STSBenchmark"] == pytest.approx(0.03)
    events = history.champion_events(settings)
    assert [(e.version, e.previous, e.state) for e in events] == [("1", None, "done"), ("2", "1", "done")]
    assert promotion.rollback(settings).version == v1.version


def test_a_crash_between_alias_and_event_leaves_rollback_working(settings, tiny_model_dir: Path, monkeypatch) -> None:
    _, v1, _ = register(settings, tiny_model_dir, 0.80)
    run_id = tracking.start_run(settings, "crashing")
    _fail_after_the_alias_moved(monkeypatch, "event")
    with pytest.raises(RegistryError):
        stages.run_register(settings, run_id, variant(tiny_model_dir, settings.root), evaluation(0.85), DATA)
    monkeypatch.undo()  # the run is gone: nobody retries it
    assert versions.champion_version(settings) == "2"
    assert [e.state for e in history.champion_events(settings)] == ["done", "intended"]
    hist = history.history(settings)
    assert [(t.version, t.until is None) for t in hist.tenures()] == [("1", False), ("2", True)]
    assert [v.version for v in hist.pending] == ["2"]
    event = promotion.rollback(settings, reason="crashed run")
    assert (event.version, event.previous) == (v1.version, "2")
    assert versions.champion_version(settings) == v1.version


def test_a_crash_before_the_alias_moved_is_ignored_then_cleaned(settings, tiny_model_dir: Path, monkeypatch) -> None:
    """Event written as intended, alias never moved: history ignores it; cleanup-pending removes the version."""
    from mlflow import MlflowClient

    _, v1, _ = register(settings, tiny_model_dir, 0.80)
    real = MlflowClient.set_registered_model_alias

    def refuse_champion(self, name, alias_name, version):
        if alias_name == "champion":
            raise _unavailable()
        return real(self, name, alias_name, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", refuse_champion)
    run_id = tracking.start_run(settings, "crashing")
    with pytest.raises(RegistryError):
        stages.run_register(settings, run_id, variant(tiny_model_dir, settings.root), evaluation(0.85), DATA)
    monkeypatch.undo()
    assert versions.champion_version(settings) == v1.version
    assert [e.state for e in history.champion_events(settings)] == ["done", "intended"]
    hist = history.history(settings)
    assert [e.version for e in hist.events] == [v1.version], "a move that never happened is not history"
    with pytest.raises(RegistryError, match="no previous champion"):
        promotion.rollback(settings)

    runner = CliRunner()
    root = str(settings.root)
    listed = runner.invoke(app, ["registry", "history", "gist-test", "--root", root])
    assert listed.exit_code == 0, listed.output
    assert "pending (registered, promotion never finished): version(s) 2" in listed.output
    assert "gist registry cleanup-pending gist-test" in listed.output
    young = runner.invoke(app, ["registry", "cleanup-pending", "gist-test", "--root", root])
    assert young.exit_code == 0 and "version 2 is pending but recent: left alone" in young.output
    dry = runner.invoke(
        app, ["registry", "cleanup-pending", "gist-test", "--root", root, "--min-age-minutes", "0", "--dry-run"]
    )
    assert "removed version 2" in dry.output and len(versions.list_versions(settings)) == 2
    done = runner.invoke(app, ["registry", "cleanup-pending", "gist-test", "--root", root, "--min-age-minutes", "0"])
    assert done.exit_code == 0, done.output
    assert "removed version 2" in done.output and "marked abandoned" in done.output
    assert [v.version for v in versions.list_versions(settings)] == [v1.version]
    assert {k: str(v) for k, v in client.client(settings).get_registered_model("gist-test").aliases.items()} == {
        "champion": v1.version
    }, "the removed version's challenger alias went with it"
    assert [e.state for e in history.champion_events(settings)] == ["done", "abandoned"]
    assert "pending" not in runner.invoke(app, ["registry", "history", "gist-test", "--root", root]).output


def test_the_same_weights_are_never_registered_twice(settings, tiny_model_dir: Path) -> None:
    model = variant(tiny_model_dir, settings.root)
    _, v1, _ = register(settings, model, 0.80, same_weights=True)
    assert (
        versions.version_tags(settings, v1.version)[FINGERPRINT_TAG] == versions.get_version(settings, "1").fingerprint
    )
    assert stages.unchanged_version(settings, model).version == v1.version
    (model / "README.md").write_text("a card is not weights")
    (model / "train_metrics.json").write_text('{"seconds": 123}')  # nor are a retrain's timings
    run_id = tracking.start_run(settings, "rerun")
    with pytest.raises(stages.UnchangedModelError, match="unchanged: same model as version 1 \\(passed") as caught:
        stages.run_register(settings, run_id, model, evaluation(0.80), DATA)
    assert caught.value.record.version == v1.version
    assert [v.version for v in versions.list_versions(settings)] == [v1.version]
    assert len(history.champion_events(settings)) == 1

    runner = CliRunner()
    (settings.root / "outputs").mkdir(exist_ok=True)
    (settings.root / "outputs" / "candidate").symlink_to(model)
    (settings.root / "reports").mkdir(exist_ok=True)
    (settings.root / "reports" / "eval.json").write_text(json.dumps(evaluation(0.8).to_dict()))
    out = runner.invoke(app, ["register", "--root", str(settings.root)])
    assert out.exit_code == 0, out.output
    assert "unchanged: same model as version 1 (passed, challenger, champion); nothing registered" in out.output
    assert len(versions.list_versions(settings)) == 1


def test_a_bf16_candidate_is_not_judged_against_float32_scores(settings, tiny_model_dir: Path) -> None:
    """The champion's recorded scores were computed in float32: a bfloat16 evaluation is not comparable."""
    _, v1, _ = register(settings, tiny_model_dir, 0.80, eval_settings=F32)
    assert json.loads(versions.version_tags(settings, v1.version)["gist.eval_settings"]) == F32
    bf16 = {**F32, "precision": "bfloat16"}
    _, v2, d2 = register(settings, tiny_model_dir, 0.85, eval_settings=bf16)
    assert not d2.passed and [r.rule for r in d2.rules if not r.passed] == ["comparable"]
    assert "precision bfloat16 vs float32" in d2.summary()
    # an unknown length setting on the champion blocks too; the same settings pass
    _, _, d3 = register(settings, tiny_model_dir, 0.86, eval_settings={**F32, "max_seq_length": "128"})
    assert not d3.passed and "max_seq_length 128 vs model" in d3.summary()
    _, _, d4 = register(settings, tiny_model_dir, 0.86, eval_settings=F32)
    assert d4.passed and versions.champion_version(settings) == "4"


def test_a_champion_without_scores_tag_is_read_from_task_metrics_only(settings, tiny_model_dir: Path) -> None:
    run_id = tracking.start_run(settings, "legacy")
    metrics = {
        "eval/STSBenchmark": 0.81,
        "eval/overall": 0.81,
        "eval/overall_by_category": 0.81,
        "eval/category/STS": 0.81,
        "base/STSBenchmark": 0.7,
    }
    tracking.log_metrics(settings, run_id, metrics)
    legacy = versions.register_model(settings, run_id, variant(tiny_model_dir, settings.root), {}, "legacy")
    scorecard = versions.champion_scorecard(settings, versions.get_version(settings, legacy.version))
    assert dict(scorecard.scores) == {"STSBenchmark": 0.81}


def test_cleanup_keeps_a_pending_champion(settings, tiny_model_dir: Path, monkeypatch) -> None:
    run_id = tracking.start_run(settings, "crashing")
    _fail_after_the_alias_moved(monkeypatch, "decision")
    with pytest.raises(RegistryError):
        stages.run_register(settings, run_id, variant(tiny_model_dir, settings.root), evaluation(0.85), DATA)
    monkeypatch.undo()
    time.sleep(0.01)
    result = promotion.cleanup_pending(settings, min_age_seconds=0)
    assert result.completed == ("1",) and result.removed == ()
    assert versions.get_version(settings, "1").tags[PROMOTION_TAG] == "incomplete"
    assert versions.champion_version(settings) == "1" and client.client(settings).get_registered_model("gist-test")


def test_cli_register_refuses_a_stale_evaluation_and_records_a_block(
    settings, tiny_model_dir: Path, repo_root: Path
) -> None:
    """`gist register` as a user runs it after `gist train` and `gist evaluate`, on a tiny model."""
    register(settings, tiny_model_dir, 0.80)
    root = settings.root
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["evaluate"]["data_dir"] = str(repo_root / "data" / "raw")  # the card reads the task definitions
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    candidate = variant(tiny_model_dir, root)
    (root / "outputs").mkdir(exist_ok=True)
    candidate.rename(root / "outputs" / "candidate")
    weights = fingerprint(root / "outputs" / "candidate")  # the weights hash of a model folder
    (root / "reports").mkdir(exist_ok=True)
    stale = evaluation(0.79)
    stale.models = {"candidate": {"name": "gist-local/model", "revision": "x", "fingerprint": "0" * 64}}
    (root / "reports" / "eval.json").write_text(json.dumps(stale.to_dict()))
    lock = {"stages": {"data": {"outs": [{"path": DATA.path, "md5": DATA.md5}]}}}
    (root / "dvc.lock").write_text(json.dumps(lock))  # the data version `gist register` records
    runner = CliRunner()
    refused = runner.invoke(app, ["register", "--root", str(root)])
    assert refused.exit_code == 1 and "run `gist evaluate` for this candidate first" in refused.output
    assert len(versions.list_versions(settings)) == 1

    fresh = evaluation(0.79)
    fresh.models = {"candidate": {"name": "gist-local/model", "revision": "x", "fingerprint": weights}}
    (root / "reports" / "eval.json").write_text(json.dumps(fresh.to_dict()))
    blocked = runner.invoke(app, ["register", "--root", str(root), "--set", "gate.min_mean_delta=0.5"])
    assert blocked.exit_code == 0, blocked.output
    assert "gate blocked" in blocked.output and "mean delta" in blocked.output
    assert "registered gist-test version 2 (no alias)" in blocked.output
    record = versions.get_version(settings, "2")
    assert record.tags["gist.gate.verdict"] == "blocked" and "mean delta" in record.tags["gist.gate.reasons"]
    assert record.fingerprint == weights and versions.champion_version(settings) == "1"
