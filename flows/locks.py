"""Prefect's global concurrency limit around every promotion of a model, when a Prefect API is configured.

Registered with ``gist_core.registry.locks.register_outer_lock`` when the ``flows`` package is
imported (the ``gist`` command and every flow run import it), so promotions wait in a limit named
``gist-promotion-<model>`` that the Prefect UI shows. The registry's own lock is still taken
inside it: promotions from processes without Prefect are serialised with these too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

LIMIT_PREFIX = "gist-promotion-"


def limit_name(model_name: str) -> str:
    return LIMIT_PREFIX + model_name


def _ensure_limit(name: str) -> None:
    """Create the limit (one slot) unless it exists; a concurrent creation by another host is fine."""
    # deferred: Prefect takes seconds to import; the stage commands never promote
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
                log.info("created Prefect global concurrency limit %s (1 slot)", name)
            except ObjectAlreadyExists:
                pass


@contextmanager
def prefect_promotion_limit(model_name: str, timeout_seconds: float) -> Iterator[None]:
    """Hold the model's promotion slot in Prefect for the block; nothing without a Prefect API URL."""
    # deferred: Prefect takes seconds to import; the stage commands never promote
    from prefect.concurrency.sync import concurrency
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():  # a temporary in-process server: nothing shared with other hosts
        yield
        return
    name = limit_name(model_name)
    _ensure_limit(name)
    with concurrency(name, occupy=1, timeout_seconds=timeout_seconds, strict=True):
        yield
