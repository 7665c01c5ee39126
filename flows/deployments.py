"""The pipeline's deployments, served from this checkout: what ``gist serve`` runs.

Two deployments of the ``gist-pipeline`` flow:
- ``gist-pipeline/on-demand``: started from the Prefect UI's Run button (or ``run_deployment``),
  with the typed parameters of ``flows.parameters.PipelineParameters``;
- ``gist-pipeline/scheduled-retrain``: on ``orchestration.schedule_cron``, pulls the checkout's
  upstream (``git pull --ff-only``, ``dvc pull``) when it has one and reruns the pipeline on that
  latest committed data version with params.yaml as is; the gate decides on promotion.

Both run in this process's machine, one run at a time (the runs share the checkout's outputs).
``infra/prefect.yaml`` declares the same two deployments for work pools (process, Kubernetes GPU).
A local Prefect server is started when PREFECT_API_URL is unset.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import serve
from prefect.schedules import Cron
from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings
from prefect.types.entrypoint import EntrypointType

from flows.parameters import PROJECT_ENV, PipelineParameters, showing_current_values
from flows.pipeline import gist_pipeline
from gist_core.config import Settings
from gist_core.errors import GistError

log = logging.getLogger(__name__)

FLOW_NAME = "gist-pipeline"
ON_DEMAND = "on-demand"
SCHEDULED = "scheduled-retrain"
TAGS = ["gist"]
UI_API_PATH = "/api"  # what a served UI calls: the API beside it, on whatever host and port it was opened


def build_deployments(settings: Settings, schedule: bool = True, update_checkout: bool | None = None) -> list[Any]:
    """RunnerDeployments for this checkout: on-demand, and scheduled-retrain unless ``schedule`` is False.

    The runs work on the checkout in ``$GIST_PROJECT_DIR`` (``serve_pipeline`` sets it): the project
    is not a parameter, so the run form cannot point a run at another folder. The form's fields say
    params.yaml's current values. The scheduled run first pulls the checkout's upstream (git and
    DVC) so it trains on the latest committed data version; ``update_checkout`` None does so when
    the checkout has an upstream branch.
    """
    root = str(settings.root.resolve())
    common: dict[str, Any] = {
        "tags": TAGS,
        # `flows` is an installed package: the served runs import it wherever they start.
        "entrypoint_type": EntrypointType.MODULE_PATH,
    }
    with showing_current_values(PipelineParameters.current_values(settings)):
        deployments = [
            gist_pipeline.to_deployment(
                name=ON_DEMAND,
                description=f"Fine-tune, evaluate and gate on {root}; the form's fields override params.yaml "
                "for one run (left empty, params.yaml applies).",
                **common,
            )
        ]
        if schedule:
            cfg = settings.orchestration
            if update_checkout is None:
                update_checkout = has_upstream(settings.root)
            which = "latest committed (git pull + dvc pull first)" if update_checkout else "current"
            deployments.append(
                gist_pipeline.to_deployment(
                    name=SCHEDULED,
                    description=f"Retrain on the {which} data version of {root} ({cfg.schedule_cron} "
                    f"{cfg.schedule_timezone}); the promotion gate decides.",
                    schedules=[Cron(cfg.schedule_cron, timezone=cfg.schedule_timezone)],
                    parameters={"params": {"update_checkout": update_checkout}},
                    **common,
                )
            )
    return deployments


def has_upstream(root: Path) -> bool:
    """Whether the checkout's current branch tracks a remote branch (then scheduled runs pull it first)."""
    proc = subprocess.run(
        ["git", "rev-parse", "--abbrev-ref", "--symbolic-full-name", "@{upstream}"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    return proc.returncode == 0 and bool(proc.stdout.strip())


@dataclass
class LocalServer:
    """A `prefect server start` child process in its own process group."""

    process: subprocess.Popen
    api_url: str

    @property
    def ui_url(self) -> str:
        return self.api_url.removesuffix("/api")

    def stop(self, timeout: float = 20) -> None:
        stop_process_group(self.process, timeout)


def stop_process_group(process: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the child's process group, then SIGKILL what is left after ``timeout`` seconds."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def wait_healthy(api_url: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Poll ``<api>/health`` until it answers 200; raise with the reason when it does not in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise GistError(f"the Prefect server exited with status {process.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise GistError(f"the Prefect API at {api_url} was not healthy after {timeout:.0f} s")


def start_local_server(
    port: int, host: str = "127.0.0.1", env: dict[str, str] | None = None, log_file: Path | None = None
) -> LocalServer:
    """Start `prefect server start` (its own process group) and wait until its API is healthy.

    The UI it serves calls the API on the same port: ``PREFECT_UI_API_URL`` is ``/api`` (relative to
    the page, so it holds whichever host name the browser used) unless the environment sets it.
    Without it Prefect's UI calls port 4200 whatever the port, and shows "Can't connect to Server API".
    """
    environment = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **(env or {})}
    environment.pop("PREFECT_API_URL", None)
    environment.setdefault("PREFECT_UI_API_URL", UI_API_PATH)
    out = log_file.open("ab") if log_file else subprocess.DEVNULL
    process = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
        env=environment,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = LocalServer(process, f"http://{host}:{port}/api")
    try:
        wait_healthy(server.api_url, timeout=120, process=process)
    except BaseException:
        server.stop()
        raise
    return server


@contextmanager
def prefect_api(port: int) -> Iterator[str]:
    """The Prefect API to serve against: PREFECT_API_URL when set, else a local server for the block."""
    configured = os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()
    if configured:
        yield configured
        return
    server = start_local_server(port)
    os.environ["PREFECT_API_URL"] = server.api_url  # the runner's flow-run processes inherit it
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


def ui_url(api_url: str) -> str:
    return PREFECT_UI_URL.value() or api_url.rstrip("/").removesuffix("/api")


def serve_pipeline(settings: Settings, port: int = 4200, schedule: bool = True, echo: Any = print) -> None:
    """Serve the deployments until interrupted (Ctrl-C), against PREFECT_API_URL or a local server.

    The runs work on this checkout (``$GIST_PROJECT_DIR``, inherited by the flow-run processes).
    """
    os.environ[PROJECT_ENV] = str(settings.root.resolve())
    with prefect_api(port) as api_url:
        deployments = build_deployments(settings, schedule=schedule)
        echo(f"Prefect UI: {ui_url(api_url)}")
        for deployment in deployments:
            echo(f"  deployment {FLOW_NAME}/{deployment.name}")
        example = json.dumps({"params": {"max_steps": 10}})
        echo(f"  run one from the UI, or: prefect deployment run '{FLOW_NAME}/{ON_DEMAND}' --params '{example}'")
        serve(*deployments, limit=1, print_starting_message=False)
