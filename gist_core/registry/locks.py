"""Serialising the promotions of one model: every process that moves its aliases, on any host, takes one lock.

What the lock is depends on where the registry lives:

- **a SQLite file** (the embedded default, one host): a file lock beside the database,
  ``<db>.<model>.lock`` (git-ignored with the database);
- **an MLflow tracking server**: a lease kept in the server's own database. Taking it creates a
  registered model named ``<model>.promotion-lock``; MLflow refuses to create a name twice
  (``RESOURCE_ALREADY_EXISTS``, a unique key in its database), so exactly one process holds it,
  whatever host it runs on and whichever URI (``localhost`` or ``127.0.0.1``) it uses. Releasing
  deletes it. A lease older than ``registry.lock_lease_seconds`` (its holder crashed) is broken.

Above either, hooks registered with ``register_outer_lock`` are taken first: the Prefect layer
registers Prefect's global concurrency limit named after the model when a Prefect API is
configured, so waiting promotions show in the Prefect UI. The inner lock is always taken, so a
process without Prefect (a rollback from the command line) is still serialised with the flows.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock, Timeout

from gist_core.config import SQLITE_PREFIX
from gist_core.errors import RegistryError
from gist_core.registry.client import RegistryTarget, Store, client, is_server, model_name, retry, target_of
from gist_core.registry.tags import TAG_PREFIX

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".promotion-lock"
OWNER_TAG = TAG_PREFIX + "lock.owner"
EXPIRES_TAG = TAG_PREFIX + "lock.expires"
_POLL_SECONDS = 0.2

# An outer lock for a model name and a timeout in seconds (e.g. Prefect's global concurrency limit).
OuterLock = Callable[[str, float], AbstractContextManager[object]]
_outer_locks: list[OuterLock] = []


def register_outer_lock(factory: OuterLock) -> None:
    """Take ``factory(model_name, timeout_seconds)`` around every promotion lock (registered once)."""
    if factory not in _outer_locks:
        _outer_locks.append(factory)


def lock_path(store: Store, name: str | None = None) -> Path:
    """The lock file of a SQLite store: beside the database, ``<db>.<model>.lock``."""
    target = target_of(store)
    if not target.uri.startswith(SQLITE_PREFIX):
        raise RegistryError(f"{target.uri}: only a SQLite store is locked with a file")
    db = Path(target.uri[len(SQLITE_PREFIX) :])
    return db.with_name(f"{db.name}.{model_name(target, name)}.lock")


@contextmanager
def promotion_lock(store: Store, name: str | None = None) -> Iterator[str]:
    """Hold the lock of ``name``'s aliases for the block; yields what was locked (for the log).

    Raises:
        RegistryError: another promotion held it for longer than ``registry.lock_timeout_seconds``.
    """
    target = target_of(store)
    name = model_name(target, name)
    timeout = target.conf.lock_timeout_seconds
    with ExitStack() as stack:
        for factory in _outer_locks:
            stack.enter_context(factory(name, timeout))
        if is_server(target.uri):
            yield stack.enter_context(_server_lease(target, name))
        elif target.uri.startswith(SQLITE_PREFIX):
            yield stack.enter_context(_file_lock(target, name))
        else:
            raise RegistryError(f"{target.uri}: cannot lock promotions on this kind of store (SQLite or a server)")


@contextmanager
def _file_lock(target: RegistryTarget, name: str) -> Iterator[str]:
    path = lock_path(target, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(path, timeout=target.conf.lock_timeout_seconds):
            yield str(path)
    except Timeout:
        raise RegistryError(
            f"another promotion of {name!r} held {path} for more than {target.conf.lock_timeout_seconds:.0f} s"
        ) from None


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


@contextmanager
def _server_lease(target: RegistryTarget, name: str) -> Iterator[str]:
    """The lease ``<name>.promotion-lock`` in the tracking server's database, for the block."""
    mlc = client(target)
    lock_name = name + LOCK_SUFFIX
    owner = _owner()
    deadline = time.monotonic() + target.conf.lock_timeout_seconds
    waited = False
    while not _try_create(target, mlc, lock_name, name, owner):
        if not waited:
            log.info("%s: waiting for another promotion to finish (lock %s on %s)", name, lock_name, target.uri)
            waited = True
        if time.monotonic() > deadline:
            holder = _holder(target, mlc, lock_name)
            raise RegistryError(
                f"another promotion of {name!r} held the lock {lock_name!r} on {target.uri} for more than "
                f"{target.conf.lock_timeout_seconds:.0f} s (holder {holder or 'unknown'})"
            )
        time.sleep(_POLL_SECONDS)
    try:
        yield f"{lock_name} on {target.uri}"
    finally:
        _release(target, mlc, lock_name, owner)


def _try_create(target: RegistryTarget, mlc: MlflowClient, lock_name: str, name: str, owner: str) -> bool:
    """Take the lease (True), or find it held (False), breaking it first if it has expired."""
    # deferred: mlflow takes seconds to import
    from mlflow.exceptions import MlflowException

    expires = time.time() + target.conf.lock_lease_seconds
    try:
        retry(
            target,
            f"taking the promotion lock of {name!r}",
            mlc.create_registered_model,
            lock_name,
            tags={OWNER_TAG: owner, EXPIRES_TAG: f"{expires:.3f}"},
            description=f"Held while a promotion of {name} moves its aliases; deleted when it is done.",
        )
        return True
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise RegistryError(f"taking the promotion lock of {name!r} on {target.uri} failed: {err}") from err
    tags = _lock_tags(target, mlc, lock_name)
    if tags is not None and tags.get(OWNER_TAG) == owner:
        return True  # an earlier attempt created it and its answer was lost
    if tags is not None and float(tags.get(EXPIRES_TAG, "inf")) < time.time():
        log.warning("%s: breaking an expired promotion lock held by %s", name, tags.get(OWNER_TAG))
        _release(target, mlc, lock_name, tags.get(OWNER_TAG, ""))
    return False


def _lock_tags(target: RegistryTarget, mlc: MlflowClient, lock_name: str) -> dict[str, str] | None:
    # deferred: mlflow takes seconds to import
    from mlflow.exceptions import MlflowException

    try:
        model = retry(target, f"reading {lock_name!r}", mlc.get_registered_model, lock_name)
    except MlflowException:
        return None  # released meanwhile
    return dict(model.tags or {})


def _holder(target: RegistryTarget, mlc: MlflowClient, lock_name: str) -> str | None:
    tags = _lock_tags(target, mlc, lock_name)
    return None if tags is None else tags.get(OWNER_TAG)


def _release(target: RegistryTarget, mlc: MlflowClient, lock_name: str, owner: str) -> None:
    """Delete the lease if ``owner`` still holds it (a broken lease may have a new holder by now)."""
    # deferred: mlflow takes seconds to import
    from mlflow.exceptions import MlflowException

    tags = _lock_tags(target, mlc, lock_name)
    if tags is None or tags.get(OWNER_TAG) != owner:
        return
    try:
        retry(target, f"releasing {lock_name!r}", mlc.delete_registered_model, lock_name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
