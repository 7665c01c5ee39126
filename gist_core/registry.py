"""The only module that talks to MLflow: runs, metrics, model registration and aliases.

Runs are addressed by id through ``MlflowClient`` (no global active run), so Prefect tasks in other
threads can log to the same run. A model version is created in one call with all its tags and
description; if anything after that fails, the version is deleted so the registry never holds a
version without its scores and lineage.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gist_core.config import Settings
from gist_core.errors import RegistryError
from gist_core.gate import GateDecision

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
TAG_PREFIX = "gist."
INPUT_EXAMPLE = ["A man is playing a guitar.", "How do I reset my card PIN?"]


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    run_id: str
    aliases: tuple[str, ...]
    model_uri: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "run_id": self.run_id,
            "aliases": list(self.aliases),
            "model_uri": self.model_uri,
        }


def client(settings: Settings) -> MlflowClient:
    """A client bound to the configured tracking and registry URI."""
    from mlflow import MlflowClient

    uri = settings.tracking_uri
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextmanager
def _fluent_uri(settings: Settings, experiment_id: str | None = None) -> Iterator[None]:
    """Point MLflow's fluent API (log_model, load_model) at our store and experiment for one block.

    ``mlflow.set_tracking_uri`` also writes MLFLOW_TRACKING_URI into the environment, which would
    leak into every later Settings in this process; restore everything afterwards. Logged models
    land in the fluent experiment, so it is passed through MLFLOW_EXPERIMENT_ID for the block.
    """
    import mlflow

    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID")}
    saved = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    uri = settings.tracking_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if experiment_id is not None:
        os.environ["MLFLOW_EXPERIMENT_ID"] = experiment_id
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])
        mlflow.set_registry_uri(saved[1])
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _experiment_id(settings: Settings, mlc: MlflowClient) -> str:
    exp = mlc.get_experiment_by_name(settings.registry.experiment)
    if exp is not None:
        return exp.experiment_id
    location = settings.path(settings.registry.artifact_location)
    artifact_uri = location.resolve().as_uri() if "://" not in settings.registry.artifact_location else None
    try:
        return mlc.create_experiment(settings.registry.experiment, artifact_location=artifact_uri)
    except Exception:  # noqa: BLE001 - lost a creation race: the experiment now exists
        exp = mlc.get_experiment_by_name(settings.registry.experiment)
        if exp is None:
            raise
        return exp.experiment_id


def start_run(settings: Settings, run_name: str, tags: dict[str, str] | None = None) -> str:
    """Create a run in the configured experiment and return its id."""
    mlc = client(settings)
    try:
        run = mlc.create_run(_experiment_id(settings, mlc), run_name=run_name, tags=_prefixed(tags or {}))
    except Exception as err:  # noqa: BLE001
        raise RegistryError(f"MLflow at {settings.tracking_uri} refused to create a run: {err}") from err
    return run.info.run_id


def end_run(settings: Settings, run_id: str, status: str = "FINISHED") -> None:
    client(settings).set_terminated(run_id, status=status)


def _prefixed(tags: dict[str, Any]) -> dict[str, str]:
    return {k if k.startswith(("mlflow.", TAG_PREFIX)) else TAG_PREFIX + k: str(v) for k, v in tags.items()}


def set_tags(settings: Settings, run_id: str, tags: dict[str, Any]) -> None:
    mlc = client(settings)
    for key, value in _prefixed(tags).items():
        mlc.set_tag(run_id, key, value)


def log_params(settings: Settings, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    mlc = client(settings)
    items = [Param(k, json.dumps(v) if isinstance(v, list | dict) else str(v)) for k, v in sorted(params.items())]
    for start in range(0, len(items), 100):
        mlc.log_batch(run_id, params=items[start : start + 100])


def log_metrics(settings: Settings, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    from mlflow.entities import Metric

    mlc = client(settings)
    now = int(time.time() * 1000)
    items = [Metric(_metric_key(k), float(v), now, step or 0) for k, v in sorted(metrics.items())]
    if items:
        mlc.log_batch(run_id, metrics=items)


def _metric_key(key: str) -> str:
    # MLflow metric names allow alphanumerics, _ - . / and space.
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


def metric_logger(settings: Settings, run_id: str, prefix: str = "train/"):
    """A callback for the trainer: logs each step's numbers under ``prefix``."""
    mlc = client(settings)

    def _log(values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        mlc.log_batch(run_id, metrics=[Metric(_metric_key(prefix + k), v, now, step) for k, v in values.items()])

    return _log


def log_artifact_dict(settings: Settings, run_id: str, payload: dict[str, Any], artifact_file: str) -> None:
    client(settings).log_dict(run_id, payload, artifact_file)


def log_artifact_text(settings: Settings, run_id: str, text: str, artifact_file: str) -> None:
    client(settings).log_text(run_id, text, artifact_file)


def run_url(settings: Settings, run_id: str) -> str:
    """A link to the run for people: the UI URL for a server, the store URI otherwise."""
    uri = settings.tracking_uri
    mlc = client(settings)
    exp_id = mlc.get_run(run_id).info.experiment_id
    if uri.startswith("http"):
        return f"{uri.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}"
    return f"{uri} (experiment {exp_id}, run {run_id})"


def register_model(
    settings: Settings,
    run_id: str,
    model_dir: Path,
    tags: dict[str, Any],
    description: str,
) -> RegisteredVersion:
    """Log the checkpoint with the sentence_transformers flavour and create a registry version.

    The version gets its tags and description in the creating call. Nothing is registered when
    logging the model fails; a version whose follow-up steps fail is deleted again by the caller
    through ``discard_version``.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from gist_core.models import ModelRef, load_sentence_transformer

    name = settings.registry.model_name
    mlc = client(settings)
    model = load_sentence_transformer(ModelRef(str(model_dir), "path", str(model_dir)))
    try:
        with _fluent_uri(settings, mlc.get_run(run_id).info.experiment_id):
            info = mlflow.sentence_transformers.log_model(
                model, name="model", input_example=INPUT_EXAMPLE, tags=_prefixed(tags), run_id=run_id
            )
            try:
                mlc.create_registered_model(name, description="GISTEmbed fine-tuned sentence embedding models")
            except MlflowException as err:
                if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
                    raise
            # models:/<model_id> sources are resolved through the fluent tracking URI: keep it set.
            version = mlc.create_model_version(
                name,
                source=info.model_uri,
                run_id=run_id,
                tags=_prefixed(tags),
                description=description,
                model_id=info.model_id,
            )
    except MlflowException as err:
        raise RegistryError(f"registering {model_dir} as {name!r} in {settings.tracking_uri} failed: {err}") from err
    return RegisteredVersion(name, str(version.version), run_id, (), f"models:/{name}/{version.version}")


def discard_version(settings: Settings, version: RegisteredVersion) -> None:
    """Delete a version whose registration did not complete."""
    try:
        client(settings).delete_model_version(version.name, version.version)
    except Exception:  # noqa: BLE001 - best effort: report the original failure
        log.exception("could not delete incomplete model version %s/%s", version.name, version.version)


def champion_version(settings: Settings) -> str | None:
    """The version that holds ``champion``, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client(settings).get_model_version_by_alias(settings.registry.model_name, CHAMPION).version)
    except MlflowException:
        return None


def apply_decision(settings: Settings, version: RegisteredVersion, decision: GateDecision) -> RegisteredVersion:
    """Record the gate's decision on the version; a promotable pass becomes challenger, then champion."""
    mlc = client(settings)
    name, number = version.name, version.version
    tags = {
        "gate.verdict": decision.verdict,
        "gate.mode": decision.mode,
        "gate.baseline": decision.baseline,
        "gate.reasons": "; ".join(decision.reasons) or "all rules passed",
        "gate.summary": decision.summary(),
    }
    for key, value in _prefixed(tags).items():
        mlc.set_model_version_tag(name, number, key, value)
    aliases: tuple[str, ...] = ()
    if decision.promote:
        mlc.set_registered_model_alias(name, CHALLENGER, number)
        mlc.set_registered_model_alias(name, CHAMPION, number)
        aliases = (CHALLENGER, CHAMPION)
    return RegisteredVersion(name, number, version.run_id, aliases, version.model_uri)


@contextmanager
def failing_run_marks_failed(settings: Settings, run_id: str) -> Iterator[None]:
    """Mark the run FAILED when the block raises, FINISHED otherwise."""
    try:
        yield
    except BaseException:
        end_run(settings, run_id, "FAILED")
        raise
    end_run(settings, run_id, "FINISHED")


def version_tags(settings: Settings, version: str) -> dict[str, str]:
    return dict(client(settings).get_model_version(settings.registry.model_name, version).tags)


def load_model(settings: Settings, alias_or_version: str = CHAMPION) -> Any:
    """Load a registered version (by alias or number) as a SentenceTransformer."""
    import mlflow

    sep = "/" if alias_or_version.isdigit() else "@"
    uri = f"models:/{settings.registry.model_name}{sep}{alias_or_version}"
    try:
        with _fluent_uri(settings):
            return mlflow.sentence_transformers.load_model(uri)
    except Exception as err:  # noqa: BLE001
        raise RegistryError(f"could not load {uri} from {settings.tracking_uri}: {err}") from err


def flatten_scores(prefix: str, scores: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}{task}": value for task, value in scores.items()}


def describe(parts: Iterable[str]) -> str:
    return "\n".join(parts)
