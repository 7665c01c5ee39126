"""Who held champion when: the event log on the registered model, tenures, and where a rollback goes.

Every champion move is an event: a registered-model tag ``gist.event.<ns>`` holding JSON (time,
kind, version, previous, run, detail, state), plus ``gist.champion_since``/``gist.champion_until``
on the versions; ``history`` rebuilds who held champion when from these.

The event is written *before* the alias moves, as ``intended``, and marked ``done`` right after, so
a crash between the two never leaves a move the log does not know about. An ``intended`` event
counts only if its move took effect (the alias holds its version now, or a later event moved the
alias away from it); otherwise the move never happened and the event is ignored (and marked
``abandoned`` when the promotion is retried or cleaned up). ``effective_events`` applies this rule
for ``history`` and ``rollback``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from gist_core.errors import RegistryError
from gist_core.registry.client import Store, client, model_name, retry, target_of
from gist_core.registry.tags import EVENT_PREFIX, PROMOTION_TAG, TAG_PREFIX
from gist_core.registry.versions import VersionRecord, champion_version, list_versions

INTENDED, DONE, ABANDONED = "intended", "done", "abandoned"


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
    state: str = DONE  # intended (written before the alias moved) | done | abandoned (the move never happened)

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
    events: tuple[ChampionEvent, ...]  # the moves that took effect (``effective_events``)

    def tenures(self) -> list[Tenure]:
        return champion_tenures(self.events)

    @property
    def pending(self) -> list[VersionRecord]:
        """Versions whose promotion never finished (a crash or an unreachable registry mid-promotion)."""
        return [v for v in self.versions if v.pending]

    def to_dict(self) -> dict[str, Any]:
        tenures = self.tenures()
        return {
            "name": self.name,
            "champion": self.champion,
            "versions": [
                {
                    "version": v.version,
                    "created": iso(v.created / 1000),
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
            "pending": [v.version for v in self.pending],
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
        if self.pending:
            numbers = ", ".join(v.version for v in self.pending)
            out += [
                "",
                f"pending (registered, promotion never finished): version(s) {numbers}",
                f"  finish them with a retry of their run, or remove them: gist registry cleanup-pending {self.name}",
            ]
        return out


def champion_events(store: Store, name: str | None = None) -> list[ChampionEvent]:
    """Every recorded move of the champion alias, oldest first."""
    # deferred: mlflow takes seconds to import
    from mlflow.exceptions import MlflowException

    target, name = target_of(store), model_name(store, name)
    try:
        model = retry(target, f"reading {name!r}", client(target).get_registered_model, name)
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
                    state=raw.get("state", DONE),  # events written before states existed were done
                )
            )
    return events


def move_took_effect(events: Sequence[ChampionEvent], index: int, champion: str | None) -> bool:
    """Whether the move of ``events[index]`` happened: the alias holds its version now, or a later move left it."""
    event = events[index]
    later = [e for e in events[index + 1 :] if e.state != ABANDONED]
    if any(e.previous == event.version for e in later):
        return True
    return not later and champion == event.version


def effective_events(events: Sequence[ChampionEvent], champion: str | None) -> list[ChampionEvent]:
    """The moves that took effect: done events, and intended ones whose alias move happened."""
    return [
        e
        for i, e in enumerate(events)
        if e.state == DONE or (e.state == INTENDED and move_took_effect(events, i, champion))
    ]


def history(store: Store, name: str | None = None) -> History:
    """Versions, their decisions, who held champion when, and the versions left pending."""
    name = model_name(store, name)
    versions = list_versions(store, name)
    events = champion_events(store, name)
    if not versions and not events:
        raise RegistryError(f"no registered model {name!r} in {target_of(store).uri}")
    champion = champion_version(store, name)
    return History(name, champion, tuple(versions), tuple(effective_events(events, champion)))


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


def now() -> tuple[str, int]:
    ns = time.time_ns()
    return iso(ns / 1e9), ns


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
