"""The only module that talks to MLflow: runs, metrics, model registration, promotion and history.

Runs are addressed by id through ``MlflowClient`` (no global active run), so Prefect tasks in other
threads can log to the same run.

Registration. A model version is created in one call with all its lineage tags, its scores and
its description, after the model itself has been logged (with a signature and an input example):
the registry never holds a version without them. Every call is retried with exponential backoff
while MLflow is unreachable (``registry.retry_attempts``/``retry_backoff_seconds``), then fails
with ``RegistryError``. Creating the version is idempotent across retries (a registration token
tag), so a lost response does not register the model twice.

Promotion (``promote``). A candidate first gets ``challenger``; if the gate passes, ``champion``
moves to it; if not, ``champion`` stays and ``challenger`` is taken back. The move is a
compare-and-set: under a lock shared by every process on this host (a file next to the SQLite
database, or in the temp folder for a server), the champion alias is read again, and if it moved
since the decision was made, the decision is made again against the new champion's recorded
scores. Two promotions racing for one model name therefore end with one champion, the one that
passed against the latest champion. Across hosts sharing one tracking server the lock does not
reach; there the re-read shrinks the window to the alias write, and a re-read after the write
reports a lost race (MLflow has no atomic alias compare-and-set).

Audit. Each decision is written as run artifacts ``gate/decision.json`` and ``gate/decision.md``,
as ``gist.gate.*`` tags and in the version's description. Every champion move is an event: a
registered-model tag ``gist.event.<ns>`` holding JSON (time, kind, version, previous, run, detail),
plus ``gist.champion_since``/``gist.champion_until`` on the versions; ``history`` rebuilds who held
champion when from these, and ``rollback`` uses them to find the previous champion.

Consumers: ``load_champion`` (a SentenceTransformer), ``encode`` (embeddings as lists).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from hashlib import sha256
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from gist_core.config import RegistrySettings, Settings
from gist_core.errors import RegistryError
from gist_core.gate import GateDecision, Scorecard

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
TAG_PREFIX = "gist."
EVENT_PREFIX = TAG_PREFIX + "event."
SCORES_TAG = TAG_PREFIX + "scores"
CATEGORIES_TAG = TAG_PREFIX + "categories"
TASK_REVISIONS_TAG = TAG_PREFIX + "task_revisions"
MTEB_VERSION_TAG = TAG_PREFIX + "mteb_version"
PROMOTION_TAG = TAG_PREFIX + "promotion"  # pending until the decision is applied, then done
REGISTRATION_TAG = TAG_PREFIX + "registration_id"
SINCE_TAG = TAG_PREFIX + "champion_since"
UNTIL_TAG = TAG_PREFIX + "champion_until"
ROLLED_BACK_TAG = TAG_PREFIX + "gate.rolled_back"
INPUT_EXAMPLE = ["A man is playing a guitar.", "How do I reset my card PIN?"]
# MLflow error codes that no retry can fix; anything else (connection refused, 5xx, a locked
# SQLite database) is treated as transient.
_PERMANENT_CODES = frozenset(
    {
        "RESOURCE_DOES_NOT_EXIST",
        "RESOURCE_ALREADY_EXISTS",
        "INVALID_PARAMETER_VALUE",
        "INVALID_STATE",
        "BAD_REQUEST",
        "NOT_FOUND",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "FEATURE_DISABLED",
    }
)

T = TypeVar("T")


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
        """Its recorded scores and the task revisions / mteb version they were computed with."""
        scores = _json_tag(self.tags, SCORES_TAG)
        if scores is None:  # registered before scores were tagged: fall back to the run's metrics
            scores = {k[len("eval/") :]: v for k, v in (metrics or {}).items() if k.startswith("eval/")}
        return Scorecard(
            label=label,
            scores={t: float(v) for t, v in scores.items()},
            task_revisions=_json_tag(self.tags, TASK_REVISIONS_TAG),
            mteb_version=self.tags.get(MTEB_VERSION_TAG),
            version=self.version,
        )

    @property
    def categories(self) -> dict[str, str]:
        return _json_tag(self.tags, CATEGORIES_TAG) or {}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ChampionEvent:
    """One move of the champion alias, as recorded on the registered model."""

    time: str
    kind: str  # promote | rollback | revoke
    version: str | None  # the new champion (None: alias removed)
    previous: str | None
    run_id: str | None = None
    detail: str = ""
    key: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Tenure:
    version: str
    since: str
    until: str | None  # None: still champion
    kind: str  # how it became champion


@dataclass(frozen=True)
class History:
    name: str
    champion: str | None
    versions: tuple[VersionRecord, ...]
    events: tuple[ChampionEvent, ...]

    def tenures(self) -> list[Tenure]:
        return champion_tenures(self.events)

    def to_dict(self) -> dict[str, Any]:
        tenures = self.tenures()
        return {
            "name": self.name,
            "champion": self.champion,
            "versions": [
                {
                    "version": v.version,
                    "created": _iso(v.created / 1000),
                    "run_id": v.run_id,
                    "aliases": list(v.aliases),
                    "verdict": v.tags.get(TAG_PREFIX + "gate.verdict"),
                    "mode": v.tags.get(TAG_PREFIX + "gate.mode"),
                    "baseline": v.tags.get(TAG_PREFIX + "gate.baseline"),
                    "summary": v.tags.get(TAG_PREFIX + "gate.summary"),
                    "promotion": v.tags.get(PROMOTION_TAG),
                    "champion_periods": [asdict(t) for t in tenures if t.version == v.version],
                }
                for v in self.versions
            ],
            "events": [e.to_dict() for e in self.events],
        }

    def lines(self) -> list[str]:
        """A plain-text report: one line per version, then the champion's moves."""
        data = self.to_dict()
        out = [f"{self.name}: champion {('version ' + self.champion) if self.champion else 'none'}", ""]
        out.append(f"{'version':>7}  {'created':<20}  {'verdict':<8}  {'aliases':<20}  decision")
        for v in data["versions"]:
            out.append(
                f"{v['version']:>7}  {v['created'][:19] + 'Z':<20}  {v['verdict'] or '-':<8}  "
                f"{','.join(v['aliases']) or '-':<20}  {v['summary'] or v['promotion'] or ''}"
            )
        out += ["", "champion held:"]
        for t in self.tenures():
            until = t.until[:19] + "Z" if t.until else "now"
            out.append(f"  version {t.version:>4}  {t.since[:19]}Z -> {until:<20}  ({t.kind})")
        if not self.events:
            out.append("  never")
        return out


@dataclass(frozen=True)
class Promotion:
    """What ``promote`` did: the final decision (re-made if the champion moved) and the aliases."""

    version: RegisteredVersion
    decision: GateDecision
    expected_champion: str | None  # champion when the decision was first made
    previous_champion: str | None  # champion right before the move (read under the lock)
    redecided: bool
    extra: dict[str, Any] = field(default_factory=dict)


# -- where the store is -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    uri: str
    conf: RegistrySettings
    root: Path

    def path(self, relative: str) -> Path:
        p = Path(relative)
        return p if p.is_absolute() else self.root / p


Store = Settings | str | _Target


def _target(store: Store) -> _Target:
    """Settings, or a bare tracking URI (consumers without a params.yaml)."""
    if isinstance(store, _Target):
        return store
    if isinstance(store, Settings):
        return _Target(store.tracking_uri, store.registry, store.root)
    uri, prefix = store, "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(uri[len(prefix) :]).resolve())
    return _Target(uri, RegistrySettings(tracking_uri=uri), Path.cwd())


def _is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def client(store: Store) -> MlflowClient:
    """A client bound to the configured tracking and registry URI."""
    from mlflow import MlflowClient

    uri = _target(store).uri
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextmanager
def _fluent_uri(store: Store, experiment_id: str | None = None) -> Iterator[None]:
    """Point MLflow's fluent API (log_model, load_model) at our store and experiment for one block.

    ``mlflow.set_tracking_uri`` also writes MLFLOW_TRACKING_URI into the environment, which would
    leak into every later Settings in this process; restore everything afterwards. Logged models
    land in the fluent experiment, so it is passed through MLFLOW_EXPERIMENT_ID for the block.
    """
    import mlflow

    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID")}
    saved = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    uri = _target(store).uri
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


# -- retries ------------------------------------------------------------------------------------


def _transient(err: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        return err.error_code not in _PERMANENT_CODES
    return isinstance(err, OSError | TimeoutError)  # requests' errors are OSErrors


def _retry(store: Store, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``fn``; retry transient failures with exponential backoff, then raise RegistryError.

    Permanent MLflow errors (a missing alias, an existing name) are raised unchanged at once, so
    callers can handle the ones they expect.
    """
    target = _target(store)
    attempts, delay = target.conf.retry_attempts, target.conf.retry_backoff_seconds
    for attempt in range(1, attempts + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - classified below
            if not _transient(err):
                raise
            if attempt == attempts:
                raise RegistryError(
                    f"{what}: MLflow at {target.uri} failed {attempts} time(s); last error: {_short(err)}"
                ) from err
            wait = delay * 2 ** (attempt - 1)
            log.warning("%s failed (attempt %d/%d), retrying in %.1f s: %s", what, attempt, attempts, wait, _short(err))
            time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


def _short(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}"
    return text if len(text) < 400 else text[:400] + "..."


# -- runs ---------------------------------------------------------------------------------------


def _experiment_id(store: Store, mlc: MlflowClient) -> str:
    target = _target(store)
    name = target.conf.experiment
    exp = _retry(target, "reading the experiment", mlc.get_experiment_by_name, name)
    if exp is not None:
        return exp.experiment_id
    location = target.conf.artifact_location
    if "://" in location:
        artifact_uri: str | None = location
    elif _is_server(target.uri):
        artifact_uri = None  # a server stores (or proxies) artifacts itself; a client path means nothing to it
    else:
        artifact_uri = target.path(location).resolve().as_uri()
    try:
        return _retry(target, "creating the experiment", mlc.create_experiment, name, artifact_location=artifact_uri)
    except Exception:  # noqa: BLE001 - lost a creation race: the experiment now exists
        exp = mlc.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def start_run(store: Store, run_name: str, tags: dict[str, str] | None = None) -> str:
    """Create a run in the configured experiment and return its id."""
    target = _target(store)
    mlc = client(target)
    try:
        experiment_id = _experiment_id(target, mlc)
        run = _retry(
            target, "creating a run", mlc.create_run, experiment_id, run_name=run_name, tags=_prefixed(tags or {})
        )
    except RegistryError:
        raise
    except Exception as err:  # noqa: BLE001
        raise RegistryError(f"MLflow at {target.uri} refused to create a run: {err}") from err
    return run.info.run_id


def end_run(store: Store, run_id: str, status: str = "FINISHED") -> None:
    _retry(store, f"ending run {run_id}", client(store).set_terminated, run_id, status=status)


def _prefixed(tags: dict[str, Any]) -> dict[str, str]:
    return {k if k.startswith(("mlflow.", TAG_PREFIX)) else TAG_PREFIX + k: str(v) for k, v in tags.items()}


def set_tags(store: Store, run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(k, v) for k, v in _prefixed(tags).items()]
    mlc = client(store)
    for start in range(0, len(items), 100):
        _retry(store, f"tagging run {run_id}", mlc.log_batch, run_id, tags=items[start : start + 100])


def log_params(store: Store, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    mlc = client(store)
    items = [Param(k, json.dumps(v) if isinstance(v, list | dict) else str(v)) for k, v in sorted(params.items())]
    for start in range(0, len(items), 100):
        _retry(store, f"logging params of run {run_id}", mlc.log_batch, run_id, params=items[start : start + 100])


def log_metrics(store: Store, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    from mlflow.entities import Metric

    mlc = client(store)
    now = int(time.time() * 1000)
    items = [Metric(_metric_key(k), float(v), now, step or 0) for k, v in sorted(metrics.items())]
    if items:
        _retry(store, f"logging metrics of run {run_id}", mlc.log_batch, run_id, metrics=items)


def _metric_key(key: str) -> str:
    # MLflow metric names allow alphanumerics, _ - . / and space.
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


def metric_logger(store: Store, run_id: str, prefix: str = "train/"):
    """A callback for the trainer: logs each step's numbers under ``prefix``."""
    mlc = client(store)

    def _log(values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        mlc.log_batch(run_id, metrics=[Metric(_metric_key(prefix + k), v, now, step) for k, v in values.items()])

    return _log


def log_artifact_dict(store: Store, run_id: str, payload: dict[str, Any], artifact_file: str) -> None:
    _retry(store, f"writing {artifact_file}", client(store).log_dict, run_id, payload, artifact_file)


def log_artifact_text(store: Store, run_id: str, text: str, artifact_file: str) -> None:
    _retry(store, f"writing {artifact_file}", client(store).log_text, run_id, text, artifact_file)


def log_artifact_file(store: Store, run_id: str, local_path: Path, artifact_file: str) -> None:
    """Upload a local file to the run as ``artifact_file`` (a path inside the run's artifacts)."""
    target = Path(artifact_file)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / target.name
        shutil.copyfile(local_path, staged)
        folder = str(target.parent) if str(target.parent) != "." else None
        _retry(store, f"writing {artifact_file}", client(store).log_artifact, run_id, str(staged), folder)


def run_url(store: Store, run_id: str) -> str:
    """A link to the run for people: the UI URL for a server, the store URI otherwise."""
    target = _target(store)
    exp_id = _retry(target, f"reading run {run_id}", client(target).get_run, run_id).info.experiment_id
    if _is_server(target.uri):
        return f"{target.uri.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}"
    return f"{target.uri} (experiment {exp_id}, run {run_id})"


def version_url(store: Store, name: str, version: str) -> str:
    target = _target(store)
    if _is_server(target.uri):
        return f"{target.uri.rstrip('/')}/#/models/{name}/versions/{version}"
    return f"models:/{name}/{version} in {target.uri}"


@contextmanager
def failing_run_marks_failed(store: Store, run_id: str) -> Iterator[None]:
    """Mark the run FAILED when the block raises, FINISHED otherwise."""
    try:
        yield
    except BaseException:
        end_run(store, run_id, "FAILED")
        raise
    end_run(store, run_id, "FINISHED")


# -- registration -------------------------------------------------------------------------------


def _pip_requirements() -> list[str]:
    """The serving requirements, pinned to what is installed.

    Given explicitly because MLflow's inference loads the model again in a subprocess (tens of
    seconds on a small CPU machine) only to find these.
    """
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in ("mlflow", "sentence-transformers", "transformers", "torch"):
        try:
            reqs.append(f"{dist}=={version(dist).split('+')[0]}")
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
    earlier step fails.

    Raises:
        RegistryError: MLflow stayed unreachable through every retry, or refused the model.
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import infer_signature

    from gist_core.models import ModelRef, load_sentence_transformer

    target = _target(store)
    name = target.conf.model_name
    mlc = client(target)
    model = load_sentence_transformer(ModelRef(str(model_dir), "path", str(model_dir)))
    signature = infer_signature(INPUT_EXAMPLE, model.encode(INPUT_EXAMPLE))
    token = uuid.uuid4().hex
    version_tags = _prefixed({**tags, "registration_id": token, "promotion": "pending"})
    try:
        experiment_id = _retry(target, f"reading run {run_id}", mlc.get_run, run_id).info.experiment_id
        with _fluent_uri(target, experiment_id):
            info = _retry(
                target,
                f"logging the model of run {run_id}",
                mlflow.sentence_transformers.log_model,
                model,
                name="model",
                signature=signature,
                input_example=INPUT_EXAMPLE,
                pip_requirements=_pip_requirements(),
                tags=_prefixed(tags),
                run_id=run_id,
            )
            _ensure_registered_model(target, mlc, name)
            # models:/<model_id> sources are resolved through the fluent tracking URI: keep it set.
            version = _retry(
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


def _ensure_registered_model(target: _Target, mlc: MlflowClient, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        _retry(
            target,
            f"creating registered model {name!r}",
            mlc.create_registered_model,
            name,
            description="GISTEmbed fine-tuned sentence embedding models",
        )
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _create_version_once(mlc: MlflowClient, name: str, token: str, **kwargs: Any) -> Any:
    """create_model_version, unless an earlier attempt whose answer was lost already created it."""
    found = mlc.search_model_versions(f"name = '{name}' and tags.`{REGISTRATION_TAG}` = '{token}'")
    if found:
        return found[0]
    return mlc.create_model_version(name, **kwargs)


def discard_version(store: Store, version: RegisteredVersion) -> None:
    """Delete a version whose registration did not complete."""
    try:
        _retry(
            store, "deleting an incomplete version", client(store).delete_model_version, version.name, version.version
        )
    except Exception:  # noqa: BLE001 - best effort: report the original failure
        log.exception("could not delete incomplete model version %s/%s", version.name, version.version)


# -- reading the registry -----------------------------------------------------------------------


def _name(store: Store, name: str | None) -> str:
    return name or _target(store).conf.model_name


def _alias_holder(store: Store, mlc: MlflowClient, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        mv = _retry(store, f"reading alias {alias} of {name!r}", mlc.get_model_version_by_alias, name, alias)
    except MlflowException:  # no such alias (or no such model)
        return None
    return str(mv.version)


def champion_version(store: Store, name: str | None = None) -> str | None:
    """The version that holds ``champion``, or None."""
    return _alias_holder(store, client(store), _name(store, name), CHAMPION)


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
    from mlflow.exceptions import MlflowException

    target, name = _target(store), _name(store, name)
    try:
        mv = _retry(target, f"reading {name} version {version}", client(target).get_model_version, name, str(version))
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
    if SCORES_TAG not in record.tags and record.run_id:
        run = _retry(store, f"reading run {record.run_id}", client(store).get_run, record.run_id)
        metrics = dict(run.data.metrics)
    return record.scorecard(CHAMPION, metrics)


def list_versions(store: Store, name: str | None = None) -> list[VersionRecord]:
    target, name = _target(store), _name(store, name)
    mlc = client(target)
    found = _retry(target, f"listing versions of {name!r}", mlc.search_model_versions, f"name = '{name}'")
    if not found:
        return []
    # search results do not carry aliases on every store: take them from the registered model
    aliases: dict[str, list[str]] = {}
    model = _retry(target, f"reading {name!r}", mlc.get_registered_model, name)
    for alias, number in (model.aliases or {}).items():
        aliases.setdefault(str(number), []).append(alias)
    records = (replace(_record(mv), aliases=tuple(sorted(aliases.get(str(mv.version), [])))) for mv in found)
    return sorted(records, key=lambda r: int(r.version))


def champion_events(store: Store, name: str | None = None) -> list[ChampionEvent]:
    """Every recorded move of the champion alias, oldest first."""
    from mlflow.exceptions import MlflowException

    target, name = _target(store), _name(store, name)
    try:
        model = _retry(target, f"reading {name!r}", client(target).get_registered_model, name)
    except MlflowException:
        return []
    events = []
    for key, value in sorted((model.tags or {}).items()):
        if key.startswith(EVENT_PREFIX):
            raw = json.loads(value)
            events.append(
                ChampionEvent(
                    time=raw["time"],
                    kind=raw["kind"],
                    version=raw.get("version"),
                    previous=raw.get("previous"),
                    run_id=raw.get("run_id"),
                    detail=raw.get("detail", ""),
                    key=key,
                )
            )
    return events


def history(store: Store, name: str | None = None) -> History:
    """Versions, their decisions, and who held champion when."""
    name = _name(store, name)
    versions = list_versions(store, name)
    if not versions and not champion_events(store, name):
        raise RegistryError(f"no registered model {name!r} in {_target(store).uri}")
    return History(name, champion_version(store, name), tuple(versions), tuple(champion_events(store, name)))


def champion_tenures(events: Sequence[ChampionEvent]) -> list[Tenure]:
    """Who held champion from when to when, from the event log."""
    tenures: list[Tenure] = []
    for event in events:
        if tenures and tenures[-1].until is None:
            last = tenures[-1]
            tenures[-1] = Tenure(last.version, last.since, event.time, last.kind)
        if event.version is not None:
            tenures.append(Tenure(event.version, event.time, None, event.kind))
    return tenures


def previous_champion(events: Sequence[ChampionEvent], current: str) -> str | None:
    """The version a rollback from ``current`` returns to.

    Promotions push onto a stack and rollbacks pop it, so rolling back twice walks back two
    promotions rather than toggling between the last two champions.
    """
    stack: list[str] = []
    for event in events:
        if event.kind == "promote" and event.version is not None:
            stack.append(event.version)
        elif event.version is None:
            stack.clear()
        else:  # rollback / revoke to an earlier champion
            while stack and stack[-1] != event.version:
                stack.pop()
            if not stack:
                stack.append(event.version)
    if current in stack:
        index = len(stack) - 1 - stack[::-1].index(current)
        return stack[index - 1] if index > 0 else None
    # the alias was moved outside these tools: fall back to what the last move recorded
    for event in reversed(events):
        if event.version == current:
            return event.previous
    return None


# -- promotion ----------------------------------------------------------------------------------


def lock_path(store: Store, name: str | None = None) -> Path:
    """The file that serialises alias moves of one model on this host.

    Next to the database for SQLite; for a server, in ``$GIST_REGISTRY_LOCK_DIR`` (default: the
    temp folder), keyed by server URI and model name.
    """
    target, name = _target(store), _name(store, name)
    if target.uri.startswith("sqlite:///"):
        db = Path(target.uri[len("sqlite:///") :])
        return db.with_name(f"{db.name}.{name}.lock")
    folder = Path(os.environ.get("GIST_REGISTRY_LOCK_DIR") or Path(tempfile.gettempdir()) / "gist-registry-locks")
    return folder / f"{sha256(f'{target.uri}|{name}'.encode()).hexdigest()[:24]}.lock"


@contextmanager
def promotion_lock(store: Store, name: str | None = None) -> Iterator[Path]:
    """An exclusive lock (across processes on this host) for moving aliases of one model."""
    import fcntl

    target = _target(store)
    path = lock_path(target, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    deadline = time.monotonic() + target.conf.lock_timeout_seconds
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RegistryError(
                        f"another promotion of {_name(target, name)!r} held {path} for more than "
                        f"{target.conf.lock_timeout_seconds:.0f} s"
                    ) from None
                time.sleep(0.05)
        yield path
    finally:
        os.close(fd)  # closing releases the lock


def _now() -> tuple[str, int]:
    ns = time.time_ns()
    return _iso(ns / 1e9), ns


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _move_champion(
    target: _Target,
    mlc: MlflowClient,
    name: str,
    new: str | None,
    previous: str | None,
    kind: str,
    run_id: str | None,
    detail: str,
) -> ChampionEvent:
    """Point champion at ``new`` (None: remove it) and record the move. Call under the lock."""
    when, ns = _now()
    if new is None:
        _retry(target, "removing the champion alias", mlc.delete_registered_model_alias, name, CHAMPION)
    else:
        _retry(target, f"moving champion to version {new}", mlc.set_registered_model_alias, name, CHAMPION, new)
    event = ChampionEvent(when, kind, new, previous, run_id, detail[:2000], key=f"{EVENT_PREFIX}{ns:020d}")
    payload = {k: v for k, v in event.to_dict().items() if k != "key"}
    _retry(target, "recording the champion move", mlc.set_registered_model_tag, name, event.key, json.dumps(payload))
    if new is not None:
        _retry(target, "tagging the new champion", mlc.set_model_version_tag, name, new, SINCE_TAG, when)
    if previous is not None and previous != new:
        _retry(target, "tagging the old champion", mlc.set_model_version_tag, name, previous, UNTIL_TAG, when)
    return event


Redecide = Callable[[VersionRecord | None], GateDecision]


def promote(
    store: Store,
    version: RegisteredVersion,
    decision: GateDecision,
    *,
    expected_champion: str | None,
    redecide: Redecide | None = None,
) -> Promotion:
    """Apply the gate's decision to a registered version, as a compare-and-set on ``champion``.

    ``expected_champion`` is the champion the decision was made against (None: there was none).
    Under ``promotion_lock`` the alias is read again; if it moved, ``redecide`` is called with the
    new champion's record (or None) and its decision is the one applied. A dry run moves no alias.
    The decision is then recorded (tags, description, run artifacts).
    """
    target = _target(store)
    mlc = client(target)
    name, number = version.name, version.version
    previous = expected_champion
    redecided = False
    aliases: list[str] = []
    if decision.mode != "dry_run":
        with promotion_lock(target, name):
            # under the lock too, so racing candidates cannot leave challenger on a superseded one
            _retry(target, "setting challenger", mlc.set_registered_model_alias, name, CHALLENGER, number)
            previous = _alias_holder(target, mlc, name, CHAMPION)
            if previous != expected_champion and redecide is not None and decision.mode == "enabled":
                log.warning(
                    "champion of %s moved from %s to %s since the decision: deciding again",
                    name,
                    expected_champion,
                    previous,
                )
                decision = redecide(get_version(target, previous, name) if previous else None)
                redecided = True
            if decision.promote:
                _move_champion(target, mlc, name, number, previous, "promote", version.run_id, decision.summary())
            else:
                # a blocked candidate is no longer the challenger
                if _alias_holder(target, mlc, name, CHALLENGER) == number:
                    _retry(target, "removing challenger", mlc.delete_registered_model_alias, name, CHALLENGER)
    extra: dict[str, Any] = {}
    if decision.promote:
        aliases = [CHALLENGER, CHAMPION]
        holder = _alias_holder(target, mlc, name, CHAMPION)
        if holder != number:  # only possible across hosts sharing a server (see the module doc)
            log.error(
                "%s: champion moved to version %s right after this promotion of version %s: another host "
                "promoted concurrently; run the gate again",
                name,
                holder,
                number,
            )
            extra["lost_race_to"] = holder
            aliases = [a for a in aliases if _alias_holder(target, mlc, name, a) == number]
    promoted = RegisteredVersion(name, number, version.run_id, tuple(aliases), version.model_uri)
    result = Promotion(promoted, decision, expected_champion, previous, redecided, extra)
    record_decision(target, result)
    return result


def record_decision(store: Store, promotion: Promotion) -> dict[str, Any]:
    """Write the audit trail of a decision: version tags, description, run artifacts. Returns the JSON."""
    target = _target(store)
    mlc = client(target)
    version, decision = promotion.version, promotion.decision
    name, number = version.name, version.version
    when, _ = _now()
    links = {"model": version_url(target, name, number), "model_uri": version.model_uri}
    if version.run_id:
        links["run"] = run_url(target, version.run_id)
    payload = {
        "time": when,
        "model": name,
        "version": number,
        "aliases": list(version.aliases),
        "champion_before": promotion.previous_champion,
        "champion_when_decided": promotion.expected_champion,
        "redecided_after_champion_moved": promotion.redecided,
        "links": links,
        **decision.to_dict(),
        **promotion.extra,
    }
    if decision.mode == "dry_run":
        moved = "dry run: no alias moved"
    else:
        moved = "moved champion to this version" if CHAMPION in version.aliases else "left champion where it was"
    link_lines = "\n".join(f"- {k}: {v}" for k, v in links.items())
    note = (
        f"\n\nChampion moved from version {promotion.expected_champion} to {promotion.previous_champion} "
        "while deciding; decided again against the new champion."
        if promotion.redecided
        else ""
    )
    markdown = (
        f"# {name} version {number}: {decision.summary()}\n\nThe decision {moved} "
        f"(champion before: {promotion.previous_champion or 'none'}).{note}\n\n{decision.markdown()}\n\n{link_lines}"
    )
    tags = {
        "gate.verdict": decision.verdict,
        "gate.mode": decision.mode,
        "gate.baseline": decision.baseline_label,
        "gate.reasons": "; ".join(decision.reasons) or "all rules passed",
        "gate.summary": decision.summary(),
        "gate.thresholds": json.dumps(decision.thresholds, sort_keys=True),
        "gate.decided_at": when,
    }
    for key, value in _prefixed(tags).items():
        _retry(target, "recording the decision", mlc.set_model_version_tag, name, number, key, value)
    current = _retry(target, "reading the version", mlc.get_model_version, name, number).description or ""
    head = current.split("\n\n## Promotion decision")[0]
    _retry(
        target,
        "describing the version",
        mlc.update_model_version,
        name,
        number,
        description=f"{head}\n\n## Promotion decision\n\n{decision.markdown()}\n\n{moved}.{note}\n\n{link_lines}",
    )
    if version.run_id:
        log_artifact_dict(target, version.run_id, payload, "gate/decision.json")
        log_artifact_text(target, version.run_id, markdown, "gate/decision.md")
    _retry(target, "finishing the promotion", mlc.set_model_version_tag, name, number, PROMOTION_TAG, "done")
    return payload


def rollback(store: Store, name: str | None = None, reason: str = "") -> ChampionEvent:
    """Point champion back at the previous champion; recorded like a gate decision (event + run).

    Raises:
        RegistryError: there is no champion, or no earlier champion to return to.
    """
    target, name = _target(store), _name(store, name)
    mlc = client(target)
    with promotion_lock(target, name):
        current = _alias_holder(target, mlc, name, CHAMPION)
        if current is None:
            raise RegistryError(f"{name!r} has no champion to roll back")
        events = champion_events(target, name)
        back_to = previous_champion(events, current)
        if back_to is None:
            raise RegistryError(f"{name!r}: version {current} has no previous champion to roll back to")
        get_version(target, back_to, name)  # fails clearly if it was deleted
        run_id = start_run(target, "gist-rollback", tags={"rollback.model": name, "rollback.from": current})
        detail = f"rollback from version {current} to {back_to}" + (f": {reason}" if reason else "")
        event = _move_champion(target, mlc, name, back_to, current, "rollback", run_id, detail)
    record = {"kind": "rollback", "model": name, "from": current, "to": back_to, "reason": reason, **event.to_dict()}
    log_artifact_dict(target, run_id, record, "gate/decision.json")
    log_artifact_text(
        target,
        run_id,
        f"# {name}: champion rolled back from version {current} to {back_to}\n\n"
        f"- time: {event.time}\n- reason: {reason or 'not given'}\n- run: {run_url(target, run_id)}\n",
        "gate/decision.md",
    )
    for number, tag in ((current, "rolled_back_from"), (back_to, "rolled_back_to")):
        _retry(target, "tagging", mlc.set_model_version_tag, name, number, TAG_PREFIX + tag, f"{event.time} {detail}")
    end_run(target, run_id)
    return event


def revoke_promotion(store: Store, version: RegisteredVersion, previous_champion: str | None, reason: str) -> list[str]:
    """Take back the aliases a promotion gave ``version`` (a later step of its run failed).

    ``champion`` returns to ``previous_champion`` (or is removed) only if ``version`` still holds
    it; the move is recorded as a ``revoke`` event. Returns what was done, for the log.
    """
    target = _target(store)
    mlc = client(target)
    name, number = version.name, version.version
    done: list[str] = []
    with promotion_lock(target, name):
        if _alias_holder(target, mlc, name, CHALLENGER) == number:
            _retry(target, "removing challenger", mlc.delete_registered_model_alias, name, CHALLENGER)
            done.append("challenger removed")
        if _alias_holder(target, mlc, name, CHAMPION) == number:
            restore = previous_champion if previous_champion != number else None
            _move_champion(target, mlc, name, restore, number, "revoke", version.run_id, reason)
            done.append(f"champion -> version {restore}" if restore else "champion removed")
    _retry(target, "tagging", mlc.set_model_version_tag, name, number, ROLLED_BACK_TAG, reason or "a later step failed")
    return done


# -- the champion's model -----------------------------------------------------------------------


def download_version(store: Store, version: str, dest: Path, name: str | None = None) -> Path:
    """Download a version's sentence-transformers folder to ``dest`` (replaced in one rename)."""
    import mlflow
    from mlflow.sentence_transformers import SENTENCE_TRANSFORMERS_DATA_PATH

    target, name = _target(store), _name(store, name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        with _fluent_uri(target):
            local = _retry(
                target,
                f"downloading {name} version {version}",
                mlflow.artifacts.download_artifacts,
                artifact_uri=f"models:/{name}/{version}",
                dst_path=str(scratch / "mlflow-model"),
            )
        folder = Path(local) / SENTENCE_TRANSFORMERS_DATA_PATH
        if not (folder / "modules.json").is_file():
            raise RegistryError(f"models:/{name}/{version} is not a sentence-transformers model")
        old = scratch / "old"
        if dest.exists():
            dest.rename(old)
        folder.rename(dest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return dest


def load_model(store: Store, alias_or_version: str = CHAMPION, name: str | None = None) -> SentenceTransformer:
    """Load a registered version (by alias or number) as a SentenceTransformer."""
    import mlflow

    target, name = _target(store), _name(store, name)
    sep = "/" if alias_or_version.isdigit() else "@"
    uri = f"models:/{name}{sep}{alias_or_version}"
    try:
        with _fluent_uri(target):
            return _retry(target, f"loading {uri}", mlflow.sentence_transformers.load_model, uri)
    except RegistryError:
        raise
    except Exception as err:  # noqa: BLE001
        raise RegistryError(f"could not load {uri} from {target.uri}: {err}") from err


def load_champion(settings_or_uri: Settings | str, name: str | None = None) -> SentenceTransformer:
    """``models:/NAME@champion`` as a SentenceTransformer.

    Args:
        settings_or_uri: Settings (``registry.tracking_uri``), or a tracking URI such as
            ``sqlite:///mlflow.db`` or ``http://127.0.0.1:5000``.
        name: the registered model name (default ``registry.model_name``).
    """
    return load_model(settings_or_uri, CHAMPION, name)


def encode(
    settings_or_uri: Settings | str, texts: Iterable[str], name: str | None = None, alias: str = CHAMPION
) -> dict[str, Any]:
    """Embed ``texts`` with a registered version: ``{model_uri, version, dimension, embeddings}``."""
    target, name = _target(settings_or_uri), _name(settings_or_uri, name)
    texts = list(texts)
    number = alias if alias.isdigit() else _alias_holder(target, client(target), name, alias)
    if number is None:
        raise RegistryError(f"{name!r} has no version with alias {alias!r} in {target.uri}")
    model = load_model(target, number, name)
    vectors = model.encode(texts, convert_to_numpy=True)
    return {
        "model_uri": f"models:/{name}/{number}",
        "version": number,
        "dimension": int(vectors.shape[1]) if vectors.ndim == 2 and len(texts) else None,
        "embeddings": [[float(x) for x in row] for row in vectors],
    }


# -- helpers ------------------------------------------------------------------------------------


def _json_tag(tags: dict[str, str], key: str) -> Any:
    try:
        return json.loads(tags[key]) if key in tags else None
    except ValueError:
        return None


def flatten_scores(prefix: str, scores: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}{task}": value for task, value in scores.items()}


def describe(parts: Iterable[str]) -> str:
    return "\n".join(parts)
