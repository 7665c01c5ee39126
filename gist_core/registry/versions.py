"""Model versions: registration with lineage, and reading versions and aliases back.

A model version is created in one call with all its lineage tags, its scores and its description,
after the model itself has been logged (with a signature and an input example): the registry never
holds a version without them. Registration is idempotent per run: the registration token is the run
id and the model's weights hash, so a lost response or a retried step finds the version this run
already created (``run_version``) instead of creating another. ``same_model_version`` finds a
version whose weights hash (``gist.model_fingerprint``) equals a candidate's, so an unchanged model
is never registered twice.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gist_core.errors import RegistryError
from gist_core.gate import Scorecard
from gist_core.models import ModelRef, load_sentence_transformer, model_fingerprint
from gist_core.registry.client import RegistryTarget, Store, client, fluent_uri, model_name, retry, target_of
from gist_core.registry.tags import (
    CATEGORIES_TAG,
    CHALLENGER,
    CHAMPION,
    EVAL_SETTINGS_TAG,
    FINGERPRINT_TAG,
    MTEB_VERSION_TAG,
    PROMOTION_TAG,
    REGISTRATION_TAG,
    SCORES_TAG,
    TASK_REVISIONS_TAG,
    json_tag,
    prefixed,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class VersionRecord:
    """A registered version as the gate and ``history`` see it."""

    name: str
    version: str
    run_id: str | None
    created: int  # ms since the epoch
    aliases: tuple[str, ...]
    tags: dict[str, str]
    description: str

    def scorecard(self, label: str = CHAMPION, metrics: dict[str, float] | None = None) -> Scorecard:
        """Its recorded scores and what they were computed with (task revisions, mteb, evaluation settings)."""
        scores = json_tag(self.tags, SCORES_TAG)
        if scores is None:  # registered before scores were tagged: fall back to the run's metrics
            scores = task_metrics(metrics or {})
        return Scorecard(
            label=label,
            scores={t: float(v) for t, v in scores.items()},
            task_revisions=json_tag(self.tags, TASK_REVISIONS_TAG),
            mteb_version=self.tags.get(MTEB_VERSION_TAG),
            version=self.version,
            eval_settings=json_tag(self.tags, EVAL_SETTINGS_TAG),
        )

    @property
    def fingerprint(self) -> str | None:
        """The weights hash recorded at registration (``gist.model_fingerprint``)."""
        return self.tags.get(FINGERPRINT_TAG)

    @property
    def pending(self) -> bool:
        """Registered, but its promotion was never finished (``gist.promotion=pending``)."""
        return self.tags.get(PROMOTION_TAG) == "pending"

    @property
    def categories(self) -> dict[str, str]:
        return json_tag(self.tags, CATEGORIES_TAG) or {}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Aggregates ``summary_metrics`` logs beside the per-task ``eval/<task>`` metrics: not tasks.
_AGGREGATE_METRICS = frozenset({"overall", "overall_by_category"})


def task_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Per-task scores from a run's ``eval/*`` metrics, without ``eval/overall*`` and ``eval/category/*``."""
    out = {}
    for key, value in metrics.items():
        if not key.startswith("eval/"):
            continue
        task = key[len("eval/") :]
        if "/" in task or task in _AGGREGATE_METRICS:
            continue
        out[task] = value
    return out


def _pip_requirements() -> list[str]:
    """The serving requirements, pinned to what is installed.

    Given explicitly because MLflow's inference loads the model again in a subprocess (tens of
    seconds on a small CPU machine) only to find these.
    """
    reqs = []
    for dist in ("mlflow", "sentence-transformers", "transformers", "torch"):
        try:
            reqs.append(f"{dist}=={package_version(dist).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return reqs


def register_model(
    store: Store,
    run_id: str,
    model_dir: Path,
    tags: dict[str, Any],
    description: str,
) -> RegisteredVersion:
    """Log the checkpoint with the sentence_transformers flavour and create a registry version.

    The model is logged with a signature (text in, one float vector per text out) and an input
    example. The version is created in one call with ``tags`` (plus ``gist.promotion=pending``
    until ``promote`` applies a decision) and ``description``; nothing is registered when an
    earlier step fails. The registration token is ``<run id>:<weights hash>`` (``tags`` must hold
    ``model_fingerprint``, else the model folder is hashed): a second call for the same run and
    model returns the version the first one created.

    Raises:
        RegistryError: MLflow stayed unreachable through every retry, or refused the model.
    """
    # deferred: mlflow takes seconds to import
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import infer_signature

    target = target_of(store)
    name = target.conf.model_name
    mlc = client(target)
    ref = ModelRef(str(model_dir), "path", str(model_dir))
    if not tags.get("model_fingerprint"):  # the caller hashed the weights already, as a rule
        tags = {**tags, "model_fingerprint": model_fingerprint(ref)}
    token = f"{run_id}:{tags['model_fingerprint']}"
    found = retry(target, f"looking up {name!r} versions of run {run_id}", _find_token, mlc, name, token)
    if found is not None:
        log.info("run %s already registered this model as %s version %s", run_id, name, found.version)
        return RegisteredVersion(name, str(found.version), run_id, (), f"models:/{name}/{found.version}")
    model = load_sentence_transformer(ref)
    signature = infer_signature(INPUT_EXAMPLE, model.encode(INPUT_EXAMPLE))
    version_tags = prefixed({**tags, "registration_id": token, "promotion": "pending"})
    try:
        run_info = retry(target, f"reading run {run_id}", mlc.get_run, run_id).info
        with fluent_uri(target, run_info.experiment_id):
            info = retry(
                target,
                # where the files go, so a failing artifact store is named (an S3 bucket, or the server's store)
                f"storing the model's files of run {run_id} in the artifact store {run_info.artifact_uri}",
                mlflow.sentence_transformers.log_model,
                model,
                name="model",
                signature=signature,
                input_example=INPUT_EXAMPLE,
                pip_requirements=_pip_requirements(),
                tags=prefixed(tags),
                run_id=run_id,
            )
            _ensure_registered_model(target, mlc, name)
            # models:/<model_id> sources are resolved through the fluent tracking URI: keep it set.
            version = retry(
                target,
                f"registering a version of {name!r}",
                _create_version_once,
                mlc,
                name,
                token,
                source=info.model_uri,
                run_id=run_id,
                tags=version_tags,
                description=description,
                model_id=info.model_id,
            )
    except MlflowException as err:
        raise RegistryError(f"registering {model_dir} as {name!r} in {target.uri} failed: {err}") from err
    return RegisteredVersion(name, str(version.version), run_id, (), f"models:/{name}/{version.version}")


def _ensure_registered_model(target: RegistryTarget, mlc: MlflowClient, name: str) -> None:
    # deferred: mlflow takes seconds to import
    from mlflow.exceptions import MlflowException

    try:
        retry(
            target,
            f"creating registered model {name!r}",
            mlc.create_registered_model,
            name,
            description="GISTEmbed fine-tuned sentence embedding models",
        )
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _find_token(mlc: MlflowClient, name: str, token: str) -> Any:
    found = mlc.search_model_versions(f"name = '{name}' and tags.`{REGISTRATION_TAG}` = '{token}'")
    return min(found, key=lambda mv: int(mv.version)) if found else None


def _create_version_once(mlc: MlflowClient, name: str, token: str, **kwargs: Any) -> Any:
    """create_model_version, unless an earlier attempt whose answer was lost already created it."""
    found = _find_token(mlc, name, token)
    if found is not None:
        return found
    return mlc.create_model_version(name, **kwargs)


def _search(store: Store, what: str, name: str, condition: str) -> list[VersionRecord]:
    """Versions of ``name`` matching an MLflow filter condition, oldest first."""
    target = target_of(store)
    found = retry(target, what, client(target).search_model_versions, f"name = '{name}' and {condition}")
    return sorted((_record(mv) for mv in found), key=lambda r: int(r.version))


def run_version(store: Store, run_id: str, name: str | None = None) -> VersionRecord | None:
    """The version the MLflow run ``run_id`` registered (its first, if an old run made several), or None."""
    name = model_name(store, name)
    found = _search(store, f"looking up the {name!r} version of run {run_id}", name, f"run_id = '{run_id}'")
    return found[0] if found else None


def same_model_version(store: Store, fingerprint: str, name: str | None = None) -> VersionRecord | None:
    """The first completed version whose weights hash is ``fingerprint`` (None: a model never registered).

    Versions whose promotion never finished (``gist.promotion=pending``, left by a crash) do not
    count: ``gist registry cleanup-pending`` removes them.
    """
    name = model_name(store, name)
    found = _search(
        store, f"looking up {name!r} versions by weights hash", name, f"tags.`{FINGERPRINT_TAG}` = '{fingerprint}'"
    )
    record = next((r for r in found if not r.pending), None)
    return None if record is None else replace(record, aliases=version_aliases(store, record.version, name))


def discard_version(store: Store, version: RegisteredVersion) -> None:
    """Delete a version whose registration did not complete."""
    try:
        retry(
            store, "deleting an incomplete version", client(store).delete_model_version, version.name, version.version
        )
    except Exception:  # noqa: BLE001 - best effort: report the original failure
        log.exception("could not delete incomplete model version %s/%s", version.name, version.version)


def alias_holder(store: Store, mlc: MlflowClient, name: str, alias: str) -> str | None:
    """The version number holding ``alias``, or None."""
    # deferred: mlflow takes seconds to import
    from mlflow.exceptions import MlflowException

    try:
        mv = retry(store, f"reading alias {alias} of {name!r}", mlc.get_model_version_by_alias, name, alias)
    except MlflowException:  # no such alias (or no such model)
        return None
    return str(mv.version)


def version_aliases(store: Store, version: str, name: str | None = None) -> tuple[str, ...]:
    """The aliases (challenger, champion) that point at ``version`` now."""
    target, name = target_of(store), model_name(store, name)
    mlc = client(target)
    return tuple(a for a in (CHALLENGER, CHAMPION) if alias_holder(target, mlc, name, a) == str(version))


def champion_version(store: Store, name: str | None = None) -> str | None:
    """The version that holds ``champion``, or None."""
    return alias_holder(store, client(store), model_name(store, name), CHAMPION)


def _record(mv: Any) -> VersionRecord:
    return VersionRecord(
        name=mv.name,
        version=str(mv.version),
        run_id=mv.run_id,
        created=int(mv.creation_timestamp or 0),
        aliases=tuple(sorted(getattr(mv, "aliases", None) or ())),
        tags=dict(mv.tags or {}),
        description=mv.description or "",
    )


def get_version(store: Store, version: str, name: str | None = None) -> VersionRecord:
    # deferred: mlflow takes seconds to import
    from mlflow.exceptions import MlflowException

    target, name = target_of(store), model_name(store, name)
    try:
        mv = retry(target, f"reading {name} version {version}", client(target).get_model_version, name, str(version))
    except MlflowException as err:
        raise RegistryError(f"{name} version {version} not found in {target.uri}: {err.message}") from err
    return _record(mv)


def version_tags(store: Store, version: str, name: str | None = None) -> dict[str, str]:
    return get_version(store, version, name).tags


def current_champion(store: Store, name: str | None = None) -> VersionRecord | None:
    """The champion's registry record (with its recorded scores), or None when there is none."""
    number = champion_version(store, name)
    return get_version(store, number, name) if number else None


def champion_scorecard(store: Store, record: VersionRecord) -> Scorecard:
    """The recorded scores of a version, falling back to its run's ``eval/*`` metrics."""
    metrics = None
    if SCORES_TAG not in record.tags and record.run_id:  # registered before scores were tagged
        run = retry(store, f"reading run {record.run_id}", client(store).get_run, record.run_id)
        metrics = dict(run.data.metrics)
    return record.scorecard(CHAMPION, metrics)


def list_versions(store: Store, name: str | None = None) -> list[VersionRecord]:
    target, name = target_of(store), model_name(store, name)
    mlc = client(target)
    found = retry(target, f"listing versions of {name!r}", mlc.search_model_versions, f"name = '{name}'")
    if not found:
        return []
    # search results do not carry aliases on every store: take them from the registered model
    aliases: dict[str, list[str]] = {}
    model = retry(target, f"reading {name!r}", mlc.get_registered_model, name)
    for alias, number in (model.aliases or {}).items():
        aliases.setdefault(str(number), []).append(alias)
    records = (replace(_record(mv), aliases=tuple(sorted(aliases.get(str(mv.version), [])))) for mv in found)
    return sorted(records, key=lambda r: int(r.version))
