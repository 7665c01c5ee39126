"""UI-triggered runs against the Prefect server `gist serve --port N` starts, and the UI a person opens there.

What the UI's Run button does: create a flow run from the served `gist-pipeline/on-demand`
deployment with custom parameters, then wait for it. A tiny real project (git + DVC, MiniLM as
student and guide, two steps, STSBenchmark only); MLflow on SQLite. The UI at port N must call the
API at port N, and its run form must read as a form; where Chromium and playwright are installed
the page is loaded in a real headless browser.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import httpx
import psutil
import pytest

from flows.deployments import FLOW_NAME, ON_DEMAND, SCHEDULED, stop_process_group, wait_healthy
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
    """`gist serve --port N` for a tiny project, starting its own Prefect server; everything stopped on exit."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    tmp = tmp_path_factory.mktemp("deploy")
    params = tiny_params(models_dir, tmp)
    params["train"]["guide_cache"] = False  # the guide-cache DVC stage is covered by the e2e test
    project = make_project(tmp / "proj", params)
    env = _env(tmp)
    port = _free_port()
    serve_log = (tmp / "serve.log").open("wb")
    serving = subprocess.Popen(
        [sys.executable, "-m", "flows", "serve", "--root", str(project), "--port", str(port)],
        cwd=project,
        env=env,
        stdout=serve_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    api_url = f"http://127.0.0.1:{port}/api"
    try:
        wait_healthy(api_url, timeout=180, process=serving)
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            yield project, api_url, serving, tmp
    finally:
        children = psutil.Process(serving.pid).children(recursive=True) if serving.poll() is None else []
        stop_process_group(serving)
        for child in children:  # the server `gist serve` started runs in a process group of its own
            with suppress(psutil.NoSuchProcess):
                child.terminate()
        psutil.wait_procs(children, timeout=20)
        serve_log.close()


def _logs(tmp: Path) -> str:
    return "\n".join(
        f"--- {name}\n" + (tmp / name).read_text(errors="replace")[-4000:]
        for name in ("serve.log",)
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

    project, api_url, serving, tmp = served
    with get_client(sync_client=True) as client:
        deployments = _wait_for_deployments(client, serving, tmp)
        scheduled = deployments[SCHEDULED]
        assert [s.schedule.cron for s in scheduled.schedules] == ["0 3 * * 1"]
        assert deployments[ON_DEMAND].parameters == {}, "the served project is not a parameter"
        # the project has no upstream branch to pull: its scheduled retrain runs on the checkout as it is
        assert scheduled.parameters == {"params": {"update_checkout": False}}
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
            f"{api_url}/artifacts/filter",
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


def _form_schema(deployment) -> dict:
    """The run form's fields: the PipelineParameters definition of the deployment's parameter schema."""
    schema = deployment.parameter_openapi_schema
    assert set(schema["properties"]) == {"params"}, "the project folder is not a field of the form"
    definitions = schema.get("definitions") or schema.get("$defs") or {}
    return definitions["PipelineParameters"]


def test_the_served_ui_calls_its_own_api_and_the_run_form_reads_as_a_form(served) -> None:
    from prefect.client.orchestration import get_client

    project, api_url, serving, tmp = served
    settings = httpx.get(api_url.removesuffix("/api") + "/ui-settings", timeout=30).json()
    assert settings["api_url"] == "/api", "the UI calls the API beside it, on the port it was opened on"
    with get_client(sync_client=True) as client:
        form = _form_schema(_wait_for_deployments(client, serving, tmp)[ON_DEMAND])
    fields = form["properties"]
    assert not [name for name, prop in fields.items() if "anyOf" in prop], "no `X | None` toggles"
    assert fields["max_steps"] == {**fields["max_steps"], "type": "integer", "minimum": 1}
    assert "default" not in fields["max_steps"], "left empty, params.yaml's value applies"
    assert fields["max_steps"]["description"].endswith("(params.yaml: 3)"), "the current value is shown"
    assert fields["gate_mode"]["enum"] == ["enabled", "dry_run", "disabled"]


def _browser() -> str | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return None
    return chromium


@pytest.mark.skipif(_browser() is None, reason="no Chromium (Debian package chromium) or no playwright here")
def test_a_person_opening_the_ui_sees_the_deployment_and_its_form(served) -> None:
    """The page as a person sees it, in headless Chromium: connected to the API, the form's fields plain."""
    from playwright.sync_api import sync_playwright
    from prefect.client.orchestration import get_client

    project, api_url, serving, tmp = served
    with get_client(sync_client=True) as client:
        deployment = _wait_for_deployments(client, serving, tmp)[ON_DEMAND]
    base = api_url.removesuffix("/api")
    args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_browser(), headless=True, args=args)
        try:
            page = browser.new_page()
            page.goto(f"{base}/deployments/deployment/{deployment.id}/run", wait_until="load")
            page.get_by_text("Max Steps").first.wait_for(timeout=60_000)
            text = page.inner_text("body")
            page.screenshot(path=str(tmp / "run-form.png"), full_page=True)
        finally:
            browser.close()
    assert "Can't connect" not in text and "Unable to connect" not in text, text[:500]
    assert "Property is type None" not in text and "int | None" not in text, text[:2000]
    assert "(params.yaml: 3)" in text, "the form says params.yaml's current values"
