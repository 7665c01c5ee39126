"""Registration, promotion, audit trail, history and rollback against a real MLflow SQLite store.

A tiny random model keeps each registration to a couple of seconds. The same flows against a real
``mlflow server`` (and two processes racing) are in tests/integration/test_registry_server.py.
"""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from gist_core import stages
from gist_core.config import GateSettings
from gist_core.errors import RegistryError
from gist_core.gate import Scorecard, decide
from gist_core.registry import client, history, locks, promotion, serving, tracking, versions
from gist_core.registry.history import ChampionEvent, champion_tenures, previous_champion
from tests.support.mlflow_store import copy_db, migrated_sqlite_db
from tests.support.registry import DATA, REVS, evaluation, make_settings, register


@pytest.fixture(scope="session")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return migrated_sqlite_db(tmp_path_factory.mktemp("mlflow-template") / "mlflow.db")


@pytest.fixture(autouse=True)
def _store(tmp_path: Path, template_db: Path) -> None:
    """Each test's store starts as a copy of a migrated database (creating one takes seconds)."""
    copy_db(template_db, tmp_path / "store" / "mlflow.db")


@pytest.fixture
def settings(tmp_path: Path, repo_root: Path):
    return make_settings(tmp_path, repo_root)


def test_lifecycle_pass_block_pass_history_rollback(settings, tiny_model_dir: Path, tmp_path: Path) -> None:
    mlc = client.client(settings)
    name = settings.registry.model_name

    # 1. no champion yet: compared with the base model, passes, becomes challenger then champion
    run1, v1, d1 = register(settings, tiny_model_dir, 0.80)
    assert d1.passed and d1.baseline == "base" and v1.aliases == ("challenger", "champion")
    tags = versions.version_tags(settings, v1.version)
    assert tags["gist.params_hash"] == settings.params_hash() and len(tags["gist.params_hash"]) == 64
    assert tags["gist.data_version"] == DATA.md5 and tags["gist.git_commit"] == "unknown"
    assert tags["gist.student"] == settings.base.student and tags["gist.guide"] == settings.base.guide
    assert json.loads(tags["gist.task_revisions"]) == REVS and tags["gist.mteb_version"] == "2.26.24"
    assert json.loads(tags["gist.scores"]) == {"STSBenchmark": 0.80}
    assert tags["gist.gate.verdict"] == "passed" and tags["gist.promotion"] == "done"
    assert "gist.champion_since" in tags
    assert (tmp_path / "artifacts").is_dir(), "artifacts must go to the configured location"

    # logged with a signature (text in, 32-d vectors out) and an input example
    from mlflow.models import Model

    with client.fluent_uri(settings):
        mlmodel = Model.load(f"models:/{name}/{v1.version}")
    assert mlmodel.signature.inputs.to_dict() == [{"type": "string", "required": True}]
    assert mlmodel.signature.outputs.inputs[0].shape == (-1, 32)
    assert mlmodel.saved_input_example_info is not None

    # the description says what it was trained on, how it scored, and the decision
    desc = mlc.get_model_version(name, v1.version).description
    assert settings.base.student in desc and DATA.md5 in desc and settings.params_hash() in desc
    assert "STSBenchmark: 0.8000 / 0.7000" in desc and "## Promotion decision" in desc
    assert "| STSBenchmark | STS | 0.8000 | 0.7000 | +0.1000 |" in desc and f"run {run1})" in desc

    # the audit trail on the run
    decision_json = mlc.download_artifacts(run1, "gate/decision.json", str(tmp_path / "dl1"))
    record = json.loads(Path(decision_json).read_text())
    assert record["verdict"] == "passed" and record["aliases"] == ["challenger", "champion"]
    assert record["thresholds"]["max_task_regression"] == 0.01 and record["table"][0]["task"] == "STSBenchmark"
    assert {r["rule"] for r in record["rules"]} >= {"required_tasks", "complete", "comparable", "min_mean_delta"}
    assert record["links"]["run"].endswith(f"run {run1})") and record["champion_before"] is None
    md = Path(mlc.download_artifacts(run1, "gate/decision.md", str(tmp_path / "dl1"))).read_text()
    assert "| STSBenchmark | STS | 0.8000 | 0.7000 | +0.1000 |" in md

    # 2. compared with champion v1 (not the base model): 0.79 < 0.80 is blocked; champion stays
    run2, v2, d2 = register(settings, tiny_model_dir, 0.79, base=0.50)
    assert not d2.passed and d2.baseline_label == "champion v1" and v2.aliases == ()
    assert versions.champion_version(settings) == v1.version
    tags2 = versions.version_tags(settings, v2.version)
    assert tags2["gist.gate.verdict"] == "blocked" and "mean delta -0.0100" in tags2["gist.gate.reasons"]
    assert tags2["gist.gate.baseline"] == "champion v1"
    aliases = {k: str(v) for k, v in mlc.get_registered_model(name).aliases.items()}
    assert aliases == {"champion": v1.version}, "challenger is taken back"
    assert mlc.get_run(run2).data.tags["gist.gate.verdict"] == "blocked"
    assert mlc.get_run(run2).data.metrics["gate/passed"] == 0.0

    # 3. evaluated on other task data than the champion: refused even though it scores higher
    _, v3, d3 = register(settings, tiny_model_dir, 0.95, revs={"STSBenchmark": "rev-sts-2"})
    assert not d3.passed and [r.rule for r in d3.rules if not r.passed] == ["comparable"]
    assert versions.champion_version(settings) == v1.version

    # 4. better than the champion on the same protocol: champion moves
    _, v4, d4 = register(settings, tiny_model_dir, 0.83)
    assert d4.passed and d4.baseline_label == "champion v1" and versions.champion_version(settings) == v4.version
    assert "gist.champion_until" in versions.version_tags(settings, v1.version)

    hist = history.history(settings)
    assert [v.version for v in hist.versions] == ["1", "2", "3", "4"] and hist.champion == v4.version
    assert [(t.version, t.until is None) for t in hist.tenures()] == [("1", False), ("4", True)]

    # 5. rollback: back to v1, recorded as an event with its own run and decision artifacts
    event = promotion.rollback(settings, reason="bad answers in production")
    assert (event.kind, event.version, event.previous) == ("rollback", v1.version, v4.version)
    assert versions.champion_version(settings) == v1.version
    rb = json.loads(Path(mlc.download_artifacts(event.run_id, "gate/decision.json", str(tmp_path / "rb"))).read_text())
    assert rb["from"] == v4.version and rb["to"] == v1.version and rb["reason"] == "bad answers in production"
    with pytest.raises(RegistryError, match="no previous champion"):
        promotion.rollback(settings)

    # the CLI on the same store
    runner = CliRunner()
    out = runner.invoke(app, ["registry", "history", name, "--root", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert "champion version 1" in out.output and "blocked" in out.output
    assert "(rollback)" in out.output and "(promote)" in out.output
    as_json = runner.invoke(app, ["registry", "history", name, "--root", str(tmp_path), "--json"])
    data = json.loads(as_json.stdout)
    assert [e["kind"] for e in data["events"]] == ["promote", "promote", "rollback"]
    assert data["versions"][3]["champion_periods"][0]["until"] is not None
    assert data["versions"][0]["aliases"] == ["champion"] and data["versions"][3]["aliases"] == ["challenger"]
    uri = settings.tracking_uri
    enc = runner.invoke(app, ["registry", "encode", name, "first text", "second", "--tracking-uri", uri])
    assert enc.exit_code == 0, enc.output
    payload = json.loads(enc.stdout.strip().splitlines()[-1])
    assert payload["version"] == v1.version and payload["dimension"] == 32
    assert len(payload["embeddings"]) == 2 and len(payload["embeddings"][0]) == 32
    again = runner.invoke(app, ["registry", "rollback", name, "--root", str(tmp_path)])
    assert again.exit_code == 1 and again.output.startswith("error: ") and "no previous champion" in again.output

    champion = serving.load_champion(settings.tracking_uri, name)
    assert champion.encode(["two", "texts"]).shape == (2, 32)


def test_champion_moved_during_decision_is_decided_again(settings, tiny_model_dir: Path) -> None:
    """The compare-and-set: a decision made against v1 is re-made against whoever is champion now."""
    _, v1, _ = register(settings, tiny_model_dir, 0.80)
    run_x = tracking.start_run(settings, "x")
    x = versions.register_model(settings, run_x, tiny_model_dir, {"scores": json.dumps({"STSBenchmark": 0.82})}, "x")
    cand = Scorecard("candidate", {"STSBenchmark": 0.82})
    policy = GateSettings(required_tasks=["STSBenchmark"])
    first = decide(cand, Scorecard("champion", {"STSBenchmark": 0.80}, version="1"), policy)
    assert first.passed
    _, v_y, _ = register(settings, tiny_model_dir, 0.83)  # promoted meanwhile by another run
    assert versions.champion_version(settings) == v_y.version

    seen = []

    def redecide(record):
        seen.append(record.version)
        return decide(cand, record.scorecard(), policy)

    result = promotion.promote(settings, x, first, expected_champion=v1.version, redecide=redecide)
    assert seen == [v_y.version] and result.redecided and not result.decision.passed
    assert result.decision.baseline_label == f"champion v{v_y.version}"
    assert versions.champion_version(settings) == v_y.version
    tags = versions.version_tags(settings, x.version)
    assert tags["gist.gate.verdict"] == "blocked" and tags["gist.promotion"] == "done"


def test_dry_run_records_but_moves_no_alias(tmp_path: Path, repo_root: Path, tiny_model_dir: Path) -> None:
    settings = make_settings(tmp_path, repo_root, mode="dry_run")
    run_id, version, decision = register(settings, tiny_model_dir, 0.9)
    assert decision.passed and not decision.promote and version.aliases == ()
    assert versions.champion_version(settings) is None
    assert client.client(settings).get_registered_model("gist-test").aliases == {}
    tags = versions.version_tags(settings, version.version)
    assert tags["gist.gate.mode"] == "dry_run" and tags["gist.gate.verdict"] == "passed"


def test_disabled_gate_promotes_without_checks(tmp_path: Path, repo_root: Path, tiny_model_dir: Path) -> None:
    settings = make_settings(tmp_path, repo_root, mode="disabled")
    _, version, decision = register(settings, tiny_model_dir, 0.1)
    assert decision.rules == () and version.aliases == ("challenger", "champion")
    assert [e.kind for e in history.champion_events(settings)] == ["promote"]


def test_lost_answer_does_not_register_twice(settings, tiny_model_dir: Path, monkeypatch, caplog) -> None:
    """create_model_version succeeded but its answer was lost: the retry finds the version by its token."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    real = MlflowClient.create_model_version
    calls = []

    def flaky(self, *args, **kwargs):
        calls.append(1)
        created = real(self, *args, **kwargs)
        if len(calls) == 1:
            raise MlflowException("connection reset by peer", error_code="TEMPORARILY_UNAVAILABLE")
        return created

    monkeypatch.setattr(MlflowClient, "create_model_version", flaky)
    run_id = tracking.start_run(settings, "flaky")
    version = versions.register_model(settings, run_id, tiny_model_dir, {"data_version": "abc"}, "d")
    assert len(calls) == 1 and "retrying" in caplog.text
    listed = versions.list_versions(settings)
    assert [v.version for v in listed] == [version.version]
    assert listed[0].tags["gist.data_version"] == "abc" and listed[0].tags["gist.promotion"] == "pending"


def test_discard_version_and_failed_run(settings, tiny_model_dir: Path) -> None:
    run_id = tracking.start_run(settings, "to-discard")
    version = versions.register_model(settings, run_id, tiny_model_dir, {}, "d")
    versions.discard_version(settings, version)
    assert versions.list_versions(settings) == []
    with pytest.raises(RuntimeError), tracking.failing_run_marks_failed(settings, run_id):
        raise RuntimeError("boom")
    assert client.client(settings).get_run(run_id).info.status == "FAILED"


def test_fetch_champion_downloads_a_loadable_folder(settings, tiny_model_dir: Path) -> None:
    from sentence_transformers import SentenceTransformer

    assert stages.run_fetch_champion(settings) is None
    _, v1, _ = register(settings, tiny_model_dir, 0.8)
    folder = stages.run_fetch_champion(settings)
    assert folder == settings.path(settings.registry.champion_dir)
    marker = json.loads(folder.with_name(folder.name + ".json").read_text())
    assert marker["version"] == v1.version and len(marker["revision"]) >= 16
    assert SentenceTransformer(str(folder)).encode(["a"]).shape == (1, 32)
    # an evaluation that scored this folder as "champion" is used as the baseline, not the tags
    ev = evaluation(0.81)
    ev.baselines["champion"] = {"STSBenchmark": 0.85}
    ev.models = {"champion": {"ref": "champion", "name": "x", "revision": marker["revision"] + "-len64"}}
    decision = stages.gate_decision(settings, ev, versions.current_champion(settings))
    assert decision.baseline_label == "champion v1" and decision.deltas["STSBenchmark"] == pytest.approx(-0.04)
    # a bfloat16 evaluation of the same folder (revision <hash>-bf16-lib<...>) is recognised too
    ev.models["champion"] = {"name": "x", "revision": marker["revision"] + "-bf16-lib0123", "fingerprint": ""}
    assert stages.gate_decision(settings, ev, versions.current_champion(settings)).deltas["STSBenchmark"] == (
        pytest.approx(-0.04)
    )
    ev.models["champion"] = {"name": "x", "revision": "x-len64", "fingerprint": marker["revision"]}
    assert stages.gate_decision(settings, ev, versions.current_champion(settings)).baseline_label == "champion v1"
    ev.models["champion"] = {"ref": "champion", "name": "x", "revision": "another-folder"}
    decision = stages.gate_decision(settings, ev, versions.current_champion(settings))
    assert decision.deltas["STSBenchmark"] == pytest.approx(0.01), "unknown folder: the recorded scores"


def test_lock_is_a_file_next_to_the_db_and_excludes_others(settings, monkeypatch) -> None:
    monkeypatch.setattr(locks, "_outer_locks", [])  # the registry's own lock, whatever flows registered above it
    import fcntl

    path = locks.lock_path(settings)
    assert path.parent == settings.path("store") and path.name == "mlflow.db.gist-test.lock"
    assert fnmatch.fnmatch("/" + path.name, "/mlflow.db*"), "the .gitignore pattern of the default database covers it"
    quick = settings.model_copy(update={"registry": settings.registry.model_copy(update={"lock_timeout_seconds": 0.2})})
    with locks.promotion_lock(settings):
        fd = os.open(path, os.O_RDWR)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
        with pytest.raises(RegistryError, match="another promotion"), locks.promotion_lock(quick):
            pass
    with locks.promotion_lock(quick):
        pass


def test_unreachable_server_is_retried_then_a_clear_error(tmp_path, repo_root, monkeypatch, caplog) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    settings = make_settings(tmp_path, repo_root)
    settings = settings.model_copy(
        update={"registry": settings.registry.model_copy(update={"tracking_uri": f"http://127.0.0.1:{port}"})}
    )
    with pytest.raises(RegistryError, match=r"failed 2 time\(s\)"):
        tracking.start_run(settings, "down")
    with pytest.raises(RegistryError, match="127.0.0.1"):
        stages.run_register(settings, "no-run", tmp_path, evaluation(0.9), DATA)
    assert "retrying" in caplog.text


def ev(kind, version, previous, t):
    return ChampionEvent(f"2026-01-0{t}T00:00:00Z", kind, version, previous)


@pytest.mark.parametrize(
    ("events", "current", "expected"),
    [
        ([], "1", None),
        ([ev("promote", "1", None, 1)], "1", None),
        ([ev("promote", "1", None, 1), ev("promote", "3", "1", 2)], "3", "1"),
        # rollbacks walk back the promotions one by one
        ([ev("promote", "1", None, 1), ev("promote", "2", "1", 2), ev("promote", "3", "2", 3)], "3", "2"),
        (
            [ev("promote", "1", None, 1), ev("promote", "2", "1", 2), ev("promote", "3", "2", 3)]
            + [ev("rollback", "2", "3", 4)],
            "2",
            "1",
        ),
        # a revoked promotion is undone like a rollback
        ([ev("promote", "1", None, 1), ev("promote", "2", "1", 2), ev("revoke", "1", "2", 3)], "1", None),
        # alias moved by hand to a version the log never saw as champion
        ([ev("promote", "1", None, 1)], "7", None),
    ],
)
def test_previous_champion(events, current, expected) -> None:
    assert previous_champion(events, current) == expected


def test_champion_tenures() -> None:
    events = [ev("promote", "1", None, 1), ev("promote", "2", "1", 2), ev("rollback", "1", "2", 3)]
    tenures = champion_tenures(events)
    assert [(t.version, t.since[:10], t.until and t.until[:10], t.kind) for t in tenures] == [
        ("1", "2026-01-01", "2026-01-02", "promote"),
        ("2", "2026-01-02", "2026-01-03", "promote"),
        ("1", "2026-01-03", None, "rollback"),
    ]
