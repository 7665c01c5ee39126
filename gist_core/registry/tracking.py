"""MLflow runs: creating and ending them, params, metrics, artifacts, and links to them for people.

Runs are addressed by id through ``MlflowClient`` (no global active run), so Prefect tasks in other
threads can log to the same run.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gist_core.errors import RegistryError
from gist_core.registry.client import Store, client, is_server, retry, target_of
from gist_core.registry.tags import prefixed

if TYPE_CHECKING:
    from mlflow import MlflowClient


def _experiment_id(store: Store, mlc: MlflowClient) -> str:
    target = target_of(store)
    name = target.conf.experiment
    exp = retry(target, "reading the experiment", mlc.get_experiment_by_name, name)
    if exp is not None:
        return exp.experiment_id
    location = target.conf.artifact_location
    if "://" in location:
        artifact_uri: str | None = location
    elif is_server(target.uri):
        artifact_uri = None  # a server stores (or proxies) artifacts itself; a client path means nothing to it
    else:
        artifact_uri = target.path(location).resolve().as_uri()
    try:
        return retry(target, "creating the experiment", mlc.create_experiment, name, artifact_location=artifact_uri)
    except Exception:  # noqa: BLE001 - lost a creation race: the experiment now exists
        exp = mlc.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def start_run(store: Store, run_name: str, tags: dict[str, str] | None = None) -> str:
    """Create a run in the configured experiment and return its id."""
    target = target_of(store)
    mlc = client(target)
    try:
        experiment_id = _experiment_id(target, mlc)
        run = retry(
            target, "creating a run", mlc.create_run, experiment_id, run_name=run_name, tags=prefixed(tags or {})
        )
    except RegistryError:
        raise
    except Exception as err:  # noqa: BLE001
        raise RegistryError(f"MLflow at {target.uri} refused to create a run: {err}") from err
    return run.info.run_id


def end_run(store: Store, run_id: str, status: str = "FINISHED") -> None:
    retry(store, f"ending run {run_id}", client(store).set_terminated, run_id, status=status)


def set_tags(store: Store, run_id: str, tags: dict[str, Any]) -> None:
    # deferred: mlflow takes seconds to import
    from mlflow.entities import RunTag

    items = [RunTag(k, v) for k, v in prefixed(tags).items()]
    mlc = client(store)
    for start in range(0, len(items), 100):
        retry(store, f"tagging run {run_id}", mlc.log_batch, run_id, tags=items[start : start + 100])


def log_params(store: Store, run_id: str, params: dict[str, Any]) -> None:
    # deferred: mlflow takes seconds to import
    from mlflow.entities import Param

    mlc = client(store)
    items = [Param(k, json.dumps(v) if isinstance(v, list | dict) else str(v)) for k, v in sorted(params.items())]
    for start in range(0, len(items), 100):
        retry(store, f"logging params of run {run_id}", mlc.log_batch, run_id, params=items[start : start + 100])


def log_metrics(store: Store, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    # deferred: mlflow takes seconds to import
    from mlflow.entities import Metric

    mlc = client(store)
    now = int(time.time() * 1000)
    items = [Metric(_metric_key(k), float(v), now, step or 0) for k, v in sorted(metrics.items())]
    if items:
        retry(store, f"logging metrics of run {run_id}", mlc.log_batch, run_id, metrics=items)


def _metric_key(key: str) -> str:
    # MLflow metric names allow alphanumerics, _ - . / and space.
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


def metric_logger(store: Store, run_id: str, prefix: str = "train/") -> Callable[[dict[str, float], int], None]:
    """A callback for the trainer: logs each step's numbers under ``prefix``."""
    # deferred: mlflow takes seconds to import
    from mlflow.entities import Metric

    mlc = client(store)

    def _log(values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        mlc.log_batch(run_id, metrics=[Metric(_metric_key(prefix + k), v, now, step) for k, v in values.items()])

    return _log


def log_artifact_dict(store: Store, run_id: str, payload: dict[str, Any], artifact_file: str) -> None:
    retry(store, f"writing {artifact_file}", client(store).log_dict, run_id, payload, artifact_file)


def log_artifact_text(store: Store, run_id: str, text: str, artifact_file: str) -> None:
    retry(store, f"writing {artifact_file}", client(store).log_text, run_id, text, artifact_file)


def log_artifact_file(store: Store, run_id: str, local_path: Path, artifact_file: str) -> None:
    """Upload a local file to the run as ``artifact_file`` (a path inside the run's artifacts)."""
    target = Path(artifact_file)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / target.name
        shutil.copyfile(local_path, staged)
        folder = str(target.parent) if str(target.parent) != "." else None
        retry(store, f"writing {artifact_file}", client(store).log_artifact, run_id, str(staged), folder)


def ui_run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The MLflow UI page of a run on a tracking server."""
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def ui_version_url(tracking_uri: str, name: str, version: str) -> str:
    """The MLflow UI page of a model version on a tracking server."""
    return f"{tracking_uri.rstrip('/')}/#/models/{name}/versions/{version}"


def run_url(store: Store, run_id: str) -> str:
    """A link to the run for people: the UI URL for a server, the store URI otherwise."""
    target = target_of(store)
    exp_id = retry(target, f"reading run {run_id}", client(target).get_run, run_id).info.experiment_id
    if is_server(target.uri):
        return ui_run_url(target.uri, exp_id, run_id)
    return f"{target.uri} (experiment {exp_id}, run {run_id})"


def version_url(store: Store, name: str, version: str) -> str:
    """A link to the model version for people: the UI URL for a server, the ``models:/`` URI otherwise."""
    target = target_of(store)
    if is_server(target.uri):
        return ui_version_url(target.uri, name, version)
    return f"models:/{name}/{version} in {target.uri}"


@contextmanager
def failing_run_marks_failed(store: Store, run_id: str, finish: bool = True) -> Iterator[None]:
    """Mark the run FAILED when the block raises; FINISHED when it does not (unless ``finish`` is False).

    The one way every caller ends a run it started: CLI commands, the Prefect flows, the ablation.
    """
    try:
        yield
    except BaseException:
        end_run(store, run_id, "FAILED")
        raise
    if finish:
        end_run(store, run_id, "FINISHED")
