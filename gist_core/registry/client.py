"""Where the registry is and how every call to it is made: the one MLflow client and the one retry layer.

A store is ``Settings`` (``registry.*`` and the tracking URI), or a bare tracking URI for consumers
without a params.yaml. Every MLflow call goes through ``retry``: transient failures (connection
refused, 5xx, a locked SQLite database) are retried with exponential backoff
(``registry.retry_attempts``/``retry_backoff_seconds``), then raised as one ``RegistryError`` line.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from gist_core.config import SQLITE_PREFIX, RegistrySettings, Settings, normalize_tracking_uri
from gist_core.errors import RegistryError

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

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
class RegistryTarget:
    uri: str
    conf: RegistrySettings
    root: Path

    def path(self, relative: str) -> Path:
        p = Path(relative)
        return p if p.is_absolute() else self.root / p


Store = Settings | str | RegistryTarget


def target_of(store: Store) -> RegistryTarget:
    """Settings, or a bare tracking URI (consumers without a params.yaml)."""
    if isinstance(store, RegistryTarget):
        return store
    if isinstance(store, Settings):
        return RegistryTarget(store.tracking_uri, store.registry, store.root)
    uri = normalize_tracking_uri(store, Path.cwd())
    return RegistryTarget(uri, RegistrySettings(tracking_uri=uri), Path.cwd())


def model_name(store: Store, name: str | None) -> str:
    """``name``, or the store's ``registry.model_name``."""
    return name or target_of(store).conf.model_name


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def client(store: Store) -> MlflowClient:
    """A client bound to the configured tracking and registry URI."""
    # deferred: mlflow takes seconds to import
    from mlflow import MlflowClient

    uri = target_of(store).uri
    if uri.startswith(SQLITE_PREFIX):
        Path(uri[len(SQLITE_PREFIX) :]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextmanager
def fluent_uri(store: Store, experiment_id: str | None = None) -> Iterator[None]:
    """Point MLflow's fluent API (log_model, load_model) at our store and experiment for one block.

    ``mlflow.set_tracking_uri`` also writes MLFLOW_TRACKING_URI into the environment, which would
    leak into every later Settings in this process; restore everything afterwards. Logged models
    land in the fluent experiment, so it is passed through MLFLOW_EXPERIMENT_ID for the block.
    """
    # deferred: mlflow takes seconds to import
    import mlflow

    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID")}
    saved = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    uri = target_of(store).uri
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


def is_transient(err: BaseException) -> bool:
    """An error a retry may fix: an MLflow error other than a permanent one, or network I/O."""
    # deferred: mlflow takes seconds to import
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        return err.error_code not in _PERMANENT_CODES
    return isinstance(err, OSError | TimeoutError)  # requests' errors are OSErrors


def retry(store: Store, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``fn``; retry transient failures with exponential backoff, then raise RegistryError.

    Permanent MLflow errors (a missing alias, an existing name) are raised unchanged at once, so
    callers can handle the ones they expect.
    """
    target = target_of(store)
    attempts, delay = target.conf.retry_attempts, target.conf.retry_backoff_seconds
    for attempt in range(1, attempts + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - classified below
            if not is_transient(err):
                raise
            if attempt == attempts:
                raise RegistryError(
                    f"{what}: MLflow at {target.uri} failed {attempts} time(s){diagnosis(err)}; "
                    f"last error: {short_error(err)}"
                ) from err
            wait = delay * 2 ** (attempt - 1)
            log.warning(
                "%s failed (attempt %d/%d), retrying in %.1f s: %s", what, attempt, attempts, wait, short_error(err)
            )
            time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


def diagnosis(err: BaseException) -> str:
    """What a transient failure says about the service, for the one-line error (or "")."""
    text = str(err)
    if "503" in text:
        return " (the server answers 503 Service Unavailable: is its database up?)"
    if "500" in text:
        return " (the server answers 500: its log says why; an artifact store it cannot reach, for one)"
    if "Connection refused" in text or "Failed to establish a new connection" in text:
        return " (nothing answers at that address: is the server running?)"
    return ""


def short_error(err: BaseException) -> str:
    """The error on one line, cut to 400 characters."""
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) < 400 else text[:400] + "..."
