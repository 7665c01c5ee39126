"""UI-triggered runs against a real Prefect server: `prefect server start`, `gist serve`, run_deployment.

What the UI's Run button does: create a flow run from the served `gist-pipeline/on-demand`
deployment with custom parameters, then wait for it. A tiny real project (git + DVC, MiniLM as
student and guide, two steps, STSBenchmark only); MLflow on SQLite.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from flows.deployments import FLOW_NAME, ON_DEMAND, SCHEDULED, start_local_server, stop_process_group
from flows.report import REPORT_KEY, RULES_KEY, SCORES_KEY
from gist_core.config import load_settings
from gist_core.registry.client import client as mlflow_client
from tests.support.projects import make_project, tiny_params

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PREFECT_HOME"] = str(tmp / "prefect-home")
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)
    return env


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, models_dir: Path):
    """A Prefect server and `gist serve` for a tiny project; both process groups stopped on exit."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    tmp = tmp_path_factory.mktemp("deploy")
    params = tiny_params(models_dir, tmp)
    params["train"]["guide_cache"] = False  # the guide-cache DVC stage is covered by the e2e test
    project = make_project(tmp / "proj", params)
    env = _env(tmp)
    server = start_local_server(_free_port(), env=env, log_file=tmp / "server.log")
    serve_log = (tmp / "serve.log").open("wb")
    serving = None
    try:
        serving = subprocess.Popen(
            [sys.executable, "-m", "flows", "serve", "--root", str(project)],
            cwd=project,
            env={**env, "PREFECT_API_URL": server.api_url},
            stdout=serve_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield project, server, serving, tmp
    finally:
        if serving is not None:
            stop_process_group(serving)
        server.stop()
        serve_log.close()


def _logs(tmp: Path) -> str:
    return "\n".join(
        f"--- {name}\n" + (tmp / name).read_text(errors="replace")[-4000:]
        for name in ("serve.log", "server.log")
        if (tmp / name).is_file()
    )


def _wait_for_deployments(client, serving: subprocess.Popen, tmp: Path, timeout: float = 180) -> dict:
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert serving.poll() is None, "gist serve exited:\n" + _logs(tmp)
        try:
            return {name: client.read_deployment_by_name(f"{FLOW_NAME}/{name}") for name in (ON_DEMAND, SCHEDULED)}
        except ObjectNotFound:
            time.sleep(1)
    raise AssertionError("deployments never appeared:\n" + _logs(tmp))


def test_ui_run_completes_with_artifacts_and_a_registered_version(served) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.objects import Artifact
    from prefect.client.schemas.sorting import FlowRunSort, TaskRunSort
    from prefect.deployments import run_deployment
    from prefect.exceptions import PrefectHTTPStatusError

    project, server, serving, tmp = served
    with get_client(sync_client=True) as client:
        deployments = _wait_for_deployments(client, serving, tmp)
        scheduled = deployments[SCHEDULED]
        assert [s.schedule.cron for s in scheduled.schedules] == ["0 3 * * 1"]
        assert deployments[ON_DEMAND].parameters == {"root": str(project.resolve())}
        # the project has no upstream branch to pull: its scheduled retrain runs on the checkout as it is
        assert scheduled.parameters == {"root": str(project.resolve()), "params": {"update_checkout": False}}
        assert deployments[ON_DEMAND].enforce_parameter_schema

        # An invalid run is refused when it is created: nothing is queued, nothing runs.
        before = len(client.read_flow_runs(limit=200, sort=FlowRunSort.ID_DESC))
        with pytest.raises(PrefectHTTPStatusError) as refused:
            run_deployment(f"{FLOW_NAME}/{ON_DEMAND}", parameters={"params": {"max_steps": 0}}, timeout=0)
        assert refused.value.response.status_code == 409
        assert "max_steps" in refused.value.response.text, refused.value.response.text
        with pytest.raises(PrefectHTTPStatusError, match="409"):
            run_deployment(f"{FLOW_NAME}/{ON_DEMAND}", parameters={"params": {"epochs": 0}}, timeout=0)
        assert len(client.read_flow_runs(limit=200, sort=FlowRunSort.ID_DESC)) == before

        params = {
            "max_steps": 2,
            "tasks": ["STSBenchmark"],
            "gate_mode": "enabled",
            "overrides": {"gate.min_mean_delta": -1.0, "gate.max_task_regression": 1.0},
        }
        flow_run = run_deployment(
            f"{FLOW_NAME}/{ON_DEMAND}", parameters={"params": params}, timeout=600, poll_interval=2
        )
        assert flow_run.state is not None and flow_run.state.is_completed(), f"{flow_run.state}\n" + _logs(tmp)
        assert flow_run.state.message.startswith("gate passed"), flow_run.state.message
        assert "registered gist-embedding version 1 (challenger, champion)" in flow_run.state.message

        this_run = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
        task_runs = client.read_task_runs(flow_run_filter=this_run, limit=50, sort=TaskRunSort.EXPECTED_START_TIME_DESC)
        names = sorted(t.name for t in task_runs)
        for stage in ("1-version-data", "2-fine-tune", "3-evaluate", "4-register-and-gate", "4-publish-decision"):
            assert any(n.startswith(stage + "-") for n in names), names

        # the sync client's read_artifacts sends nulls this server version refuses: ask the API directly
        response = httpx.post(
            f"{server.api_url}/artifacts/filter",
            json={"artifacts": {"flow_run_id": {"any_": [str(flow_run.id)]}}, "limit": 50},
            timeout=30,
        )
        response.raise_for_status()
        artifacts = [Artifact.model_validate(a) for a in response.json()]
        by_key = {a.key: a for a in artifacts}
        assert {SCORES_KEY, RULES_KEY, REPORT_KEY} <= set(by_key), sorted(by_key)
        assert "| STSBenchmark |" in by_key[REPORT_KEY].data and "Data version:" in by_key[REPORT_KEY].data
        assert "STSBenchmark" in str(by_key[SCORES_KEY].data)

    settings = load_settings(project)
    mlc = mlflow_client(settings)
    champion = mlc.get_model_version_by_alias("gist-embedding", "champion")
    assert str(champion.version) == "1"
    run = mlc.get_run(champion.run_id)
    assert run.data.params["train.max_steps"] == "2", "the UI's parameters reached training"
    assert run.info.status == "FINISHED"
