"""The registry against a real ``mlflow server`` on loopback and against SQLite: only the URI differs.

Also: two processes racing to promote on one store, the server stopping in the middle of a
registration, and ``mlflow models serve`` answering for the champion. A tiny random model keeps
each registration to a couple of seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from gist_core import stages
from gist_core.config import settings_from_dict
from gist_core.errors import RegistryError
from gist_core.registry import client, history, locks, promotion, serving, tracking, versions
from gist_core.stages import EvalOutput
from gist_core.versioning import DataVersion
from tests.support.mlflow_store import MlflowServer, copy_db, free_port, migrated_sqlite_db, stop_process_group
from tests.support.registry import variant

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REVS = {"STSBenchmark": "rev-sts-1"}
DATA = DataVersion("data", "data/prepared/triplets.parquet", "e" * 32, None)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return migrated_sqlite_db(tmp_path_factory.mktemp("mlflow-template") / "mlflow.db")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, template_db: Path):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), template_db).start().wait_healthy()
    yield srv
    srv.stop()


@pytest.fixture(params=["sqlite", "server"])
def store(request: pytest.FixtureRequest, tmp_path: Path, template_db: Path) -> str:
    """A tracking URI: a fresh SQLite store, or the module's mlflow server."""
    if request.param == "sqlite":
        return copy_db(template_db, tmp_path / "store" / "mlflow.db")
    return request.getfixturevalue("server").uri


@pytest.fixture(autouse=True)
def _fail_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # our own retries (registry.retry_*) are what is tested: no extra HTTP-level retries underneath
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")  # a loaded 2-core machine can be slow to answer


def make_settings(root: Path, uri: str, name: str):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["registry"].update(
        {
            "tracking_uri": uri,
            "artifact_location": "artifacts",
            "model_name": name,
            "retry_attempts": 3,
            "retry_backoff_seconds": 0.5,
        }
    )
    raw["evaluate"]["tasks"] = ["STSBenchmark"]
    raw["gate"].update({"required_tasks": ["STSBenchmark"], "min_mean_delta": 0.0, "max_task_regression": 0.01})
    return settings_from_dict(raw, root)


def model_name(request: pytest.FixtureRequest) -> str:
    """Tests share the module's server: each uses its own registered model."""
    return "gist-" + "".join(c if c.isalnum() else "-" for c in request.node.name)[:60]


def evaluation(score: float, base: float = 0.70) -> EvalOutput:
    return EvalOutput(
        candidate={"STSBenchmark": score},
        baseline={"STSBenchmark": base},
        baseline_name="base",
        summary={},
        task_revisions=dict(REVS),
        mteb_version="2.26.24",
        path="reports/eval.json",
        baselines={"base": {"STSBenchmark": base}},
        categories={"STSBenchmark": "STS"},
    )


def register(settings, model_dir: Path, score: float):
    """Register a new candidate (a copy with its own weights hash: the same weights are never registered twice)."""
    run_id = tracking.start_run(settings, "test")
    with tracking.failing_run_marks_failed(settings, run_id):
        return stages.run_register(settings, run_id, variant(model_dir, settings.root), evaluation(score), DATA)


def test_promote_block_rollback_and_consume(store, request, tmp_path: Path, tiny_model_dir: Path) -> None:
    settings = make_settings(tmp_path, store, model_name(request))
    v1, d1 = register(settings, tiny_model_dir, 0.80)
    v2, d2 = register(settings, tiny_model_dir, 0.82)
    v3, d3 = register(settings, tiny_model_dir, 0.81)
    assert (d1.passed, d1.baseline_label) == (True, "base")
    assert (d2.passed, d2.baseline_label) == (True, "champion v1")
    assert (d3.passed, d3.baseline_label) == (False, "champion v2") and v3.aliases == ()
    assert versions.champion_version(settings) == v2.version
    blocked = versions.version_tags(settings, v3.version)
    assert blocked["gist.gate.verdict"] == "blocked" and blocked["gist.promotion"] == "done"
    assert json.loads(blocked["gist.scores"]) == {"STSBenchmark": 0.81}

    hist = history.history(settings).to_dict()
    assert [e["version"] for e in hist["events"]] == ["1", "2"]
    assert [v["verdict"] for v in hist["versions"]] == ["passed", "passed", "blocked"]

    event = promotion.rollback(settings, reason="test")
    assert (event.previous, event.version) == (v2.version, v1.version)
    assert versions.champion_version(settings) == v1.version

    # consumers: the champion as a SentenceTransformer, embeddings as JSON, a local copy to score
    model = serving.load_champion(store, settings.registry.model_name)
    assert model.encode(["a", "b"]).shape == (2, 32)
    out = serving.encode(store, ["one", "two", "three"], settings.registry.model_name)
    assert out["version"] == v1.version and out["dimension"] == 32 and len(out["embeddings"]) == 3
    folder = stages.run_fetch_champion(settings)
    assert folder is not None and (folder / "modules.json").is_file()


RACER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path

    from gist_core.registry import client, history, promotion, serving, tracking, versions
    from gist_core.config import GateSettings
    from gist_core.gate import Scorecard, decide

    uri, name, number, run_id, score, expected, go, out = sys.argv[1:]
    policy = GateSettings(required_tasks=["STSBenchmark"])
    cand = Scorecard("candidate", {"STSBenchmark": float(score)}, {"STSBenchmark": "rev-sts-1"}, "2.26.24")

    def redecide(record):
        return decide(cand, record.scorecard(), policy)

    first = decide(cand, versions.get_version(uri, expected, name).scorecard(), policy)
    version = versions.RegisteredVersion(name, number, run_id, (), f"models:/{name}/{number}")
    Path(out + ".ready").touch()
    while not Path(go).exists():
        time.sleep(0.005)
    start = time.time()
    result = promotion.promote(uri, version, first, expected_champion=expected, redecide=redecide)
    Path(out).write_text(json.dumps({
        "version": number,
        "first_passed": first.passed,
        "passed": result.decision.passed,
        "baseline": result.decision.baseline_version,
        "previous": result.previous_champion,
        "redecided": result.redecided,
        "aliases": list(result.version.aliases),
        "start": start,
        "end": time.time(),
    }))
    """
)


def test_two_processes_racing_leave_one_champion(store, request, tmp_path: Path, tiny_model_dir: Path) -> None:
    """Both candidates pass against champion v1; only the one that also beats the other ends champion."""
    settings = make_settings(tmp_path, store, model_name(request))
    name = settings.registry.model_name
    v1, _ = register(settings, tiny_model_dir, 0.80)
    candidates = {}
    for label, score in (("a", 0.83), ("b", 0.81)):
        run_id = tracking.start_run(settings, f"racer-{label}")
        tags = {"scores": json.dumps({"STSBenchmark": score}), "task_revisions": json.dumps(REVS)}
        tags["mteb_version"] = "2.26.24"
        candidates[label] = (versions.register_model(settings, run_id, tiny_model_dir, tags, label), score)

    script = tmp_path / "racer.py"
    script.write_text(RACER)
    go = tmp_path / "go"
    # Two "hosts": each its own temp folder; on a server one says localhost, the other 127.0.0.1.
    uris = {"a": store.replace("127.0.0.1", "localhost"), "b": store}
    procs = {}
    for label, (version, score) in candidates.items():
        out = tmp_path / f"{label}.json"
        env = dict(os.environ, TMPDIR=str(tmp_path / f"tmp-{label}"))
        (tmp_path / f"tmp-{label}").mkdir()
        args = [uris[label], name, version.version, version.run_id, str(score), v1.version, str(go), str(out)]
        procs[label] = subprocess.Popen([sys.executable, str(script), *args], env=env, cwd=REPO, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"{label}.json.ready").exists() for label in procs):
        assert time.monotonic() < deadline, "racers did not get ready"
        for proc in procs.values():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        time.sleep(0.05)
    go.touch()  # both promote at once, each believing v1 is champion
    for proc in procs.values():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()[-3000:]
    results = {label: json.loads((tmp_path / f"{label}.json").read_text()) for label in procs}

    a, b = (candidates[label][0].version for label in ("a", "b"))
    assert all(r["first_passed"] for r in results.values()), "both passed against v1"
    assert versions.champion_version(settings) == a, results
    # exactly one of them found the champion moved under it and decided again
    assert sorted(r["redecided"] for r in results.values()) == [False, True], results
    for r in results.values():
        if r["passed"]:  # whoever moved champion passed against the champion it replaced
            assert r["baseline"] == r["previous"], r
    # the event log is a chain without lost updates: each move starts from the previous champion
    events = history.champion_events(settings)
    assert events[0].version == v1.version and events[-1].version == a
    assert all(later.previous == earlier.version for earlier, later in zip(events, events[1:], strict=False))
    mlc = client.client(settings)
    aliases = {k: str(v) for k, v in mlc.get_registered_model(name).aliases.items()}
    assert aliases.get("champion") == a and b not in aliases.values(), (aliases, results)
    # the one that waited decided again against the other's outcome, and its record says so
    (waited,) = [r for r in results.values() if r["redecided"]]
    other = next(r for r in results.values() if r is not waited)
    run_id = candidates["a" if waited["version"] == a else "b"][0].run_id
    decision = json.loads(Path(mlc.download_artifacts(run_id, "gate/decision.json", str(tmp_path))).read_text())
    assert decision["redecided_after_champion_moved"] is True and "lost_race_to" not in decision
    assert decision["champion_when_decided"] == v1.version
    assert decision["champion_before"] == (other["version"] if other["passed"] else v1.version), decision
    assert not [m.name for m in mlc.search_registered_models() if m.name.endswith(".promotion-lock")], "lock released"
    overlap = min(r["end"] for r in results.values()) - max(r["start"] for r in results.values())
    print(f"racers overlapped for {overlap:.3f} s; {results}")


def test_server_stopped_mid_registration_registers_nothing(
    tmp_path: Path, template_db: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model is logged, then the server goes away before the version is created: retried, then
    a clear error, and the registry holds no version without its tags and metrics."""
    import mlflow.sentence_transformers

    srv = MlflowServer(tmp_path / "srv", template_db).start().wait_healthy()
    try:
        settings = make_settings(tmp_path, srv.uri, "gist-failure")
        run_id = tracking.start_run(settings, "doomed")
        tracking.log_metrics(settings, run_id, {"eval/STSBenchmark": 0.9})
        real = mlflow.sentence_transformers.log_model

        def log_then_stop(*args, **kwargs):
            info = real(*args, **kwargs)
            srv.stop()
            return info

        monkeypatch.setattr(mlflow.sentence_transformers, "log_model", log_then_stop)
        started = time.monotonic()
        with pytest.raises(RegistryError, match=r"failed 3 time\(s\)"):
            stages.run_register(settings, run_id, tiny_model_dir, evaluation(0.9), DATA)
        assert time.monotonic() - started < 60
        # the server is down: a new registration fails cleanly from its first call
        with pytest.raises(RegistryError, match="127.0.0.1"):
            tracking.start_run(settings, "down")
    finally:
        srv.stop()
    # read what the server stored, straight from its database
    direct = make_settings(tmp_path, f"sqlite:///{srv.db}", "gist-failure")
    assert client.client(direct).search_model_versions("name = 'gist-failure'") == []
    assert client.client(direct).get_run(run_id).data.metrics["eval/STSBenchmark"] == 0.9


def test_mlflow_models_serve_answers_for_the_champion(server, request, tmp_path: Path, tiny_model_dir: Path) -> None:
    settings = make_settings(tmp_path, server.uri, model_name(request))
    version, _ = register(settings, tiny_model_dir, 0.80)
    port = free_port()
    # `mlflow models serve` execs `uvicorn` through a shell: the venv's scripts must be on PATH
    # whether or not the venv is activated (CI runs .venv/bin/pytest without activating it).
    path = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    env = dict(os.environ, MLFLOW_TRACKING_URI=server.uri, PATH=path)
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{settings.registry.model_name}@champion"]
    cmd += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        body = json.dumps({"inputs": ["How do I reset my PIN?", "A man is playing a guitar."]}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            answer = json.loads(resp.read())
    finally:
        stop_process_group(proc)
    vectors = answer["predictions"]
    assert len(vectors) == 2 and all(len(v) == 32 for v in vectors)
    expected = serving.encode(server.uri, ["How do I reset my PIN?"], settings.registry.model_name)["embeddings"][0]
    assert vectors[0] == pytest.approx(expected, abs=1e-5)
    assert version.aliases == ("challenger", "champion")


def test_a_server_lease_excludes_other_hosts_and_a_dead_holders_lease_is_broken(
    server, request, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(locks, "_outer_locks", [])  # the registry's own lease, whatever flows registered above it
    settings = make_settings(tmp_path, server.uri, model_name(request))
    name = settings.registry.model_name
    other_host = make_settings(tmp_path, server.uri.replace("127.0.0.1", "localhost"), name)
    impatient = other_host.model_copy(
        update={"registry": other_host.registry.model_copy(update={"lock_timeout_seconds": 0.5})}
    )
    with locks.promotion_lock(settings) as held:
        assert held == f"{name}.promotion-lock on {server.uri}"
        refused = pytest.raises(RegistryError, match=f"another promotion of '{name}' held the lock")
        with refused, locks.promotion_lock(impatient):
            pass
    with locks.promotion_lock(impatient):  # released: the other host gets it at once
        pass
    # a holder that died: its lease has expired, so the next promotion breaks it instead of waiting
    client.client(settings).create_registered_model(
        name + locks.LOCK_SUFFIX, tags={locks.OWNER_TAG: "dead-host:1:x", locks.EXPIRES_TAG: f"{time.time() - 1:.3f}"}
    )
    with locks.promotion_lock(impatient):
        pass
    assert not client.client(settings).search_registered_models(f"name = '{name}{locks.LOCK_SUFFIX}'")
