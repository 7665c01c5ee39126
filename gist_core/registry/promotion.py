"""Promotion: the gate's decision applied to the aliases, as a compare-and-set, with its audit trail.

A candidate first gets ``challenger``; if the gate passes, ``champion`` moves to it; if not,
``champion`` stays and ``challenger`` is taken back. The move is a compare-and-set: under a lock
shared by every host (``gist_core.registry.locks``) the champion alias is read again, and if it
moved since the decision was made, the decision is made again against the new champion's recorded
scores. Two promotions racing for
one model name therefore end with one champion, the one that passed against the latest champion.

Each decision is written as run artifacts ``gate/decision.json`` and ``gate/decision.md``, as
``gist.gate.*`` tags and in the version's description; each champion move is an event
(``gist_core.registry.history``), written as ``intended`` before the alias moves and marked
``done`` after, so a crash between the two leaves a log that ``rollback`` can follow. ``promote``
called again for a version whose move already happened (a retried step) finishes its record
instead of moving anything; ``cleanup_pending`` removes versions a crash left
``gist.promotion=pending``. ``rollback`` walks back one promotion; ``revoke_promotion`` takes back
a promotion whose run failed later.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from gist_core.errors import RegistryError
from gist_core.gate import GateDecision
from gist_core.registry.client import RegistryTarget, Store, client, model_name, retry, target_of
from gist_core.registry.history import (
    ABANDONED,
    DONE,
    INTENDED,
    ChampionEvent,
    champion_events,
    effective_events,
    move_took_effect,
    now,
    previous_champion,
)
from gist_core.registry.locks import promotion_lock
from gist_core.registry.tags import (
    CHALLENGER,
    CHAMPION,
    EVENT_PREFIX,
    GATE_BASELINE_VERSION_TAG,
    PROMOTION_TAG,
    ROLLED_BACK_TAG,
    SINCE_TAG,
    TAG_PREFIX,
    UNTIL_TAG,
    prefixed,
)
from gist_core.registry.tracking import end_run, log_artifact_dict, log_artifact_text, run_url, start_run, version_url
from gist_core.registry.versions import RegisteredVersion, VersionRecord, alias_holder, get_version, list_versions

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Promotion:
    """What ``promote`` did: the final decision (re-made if the champion moved) and the aliases."""

    version: RegisteredVersion
    decision: GateDecision
    expected_champion: str | None  # champion when the decision was first made
    previous_champion: str | None  # champion right before the move (read under the lock)
    redecided: bool
    extra: dict[str, Any] = field(default_factory=dict)


def _move_champion(
    target: RegistryTarget,
    mlc: MlflowClient,
    name: str,
    new: str | None,
    previous: str | None,
    kind: str,
    run_id: str | None,
    detail: str,
) -> ChampionEvent:
    """Point champion at ``new`` (None: remove it) and record the move. Call under the lock.

    The event is written first (``intended``), then the alias moves, then the event is marked
    ``done``: whichever step a crash interrupts, the log never misses a move that happened.
    """
    when, ns = now()
    event = ChampionEvent(when, kind, new, previous, run_id, detail[:2000], key=f"{EVENT_PREFIX}{ns:020d}")
    event = replace(event, state=INTENDED)
    _write_event(target, mlc, name, event)
    if new is None:
        retry(target, "removing the champion alias", mlc.delete_registered_model_alias, name, CHAMPION)
    else:
        retry(target, f"moving champion to version {new}", mlc.set_registered_model_alias, name, CHAMPION, new)
    return _finish_move(target, mlc, name, event)


def _write_event(target: RegistryTarget, mlc: MlflowClient, name: str, event: ChampionEvent) -> None:
    payload = {k: v for k, v in event.to_dict().items() if k != "key"}
    what = f"recording the champion move ({event.state})"
    retry(target, what, mlc.set_registered_model_tag, name, event.key, json.dumps(payload))


def _finish_move(target: RegistryTarget, mlc: MlflowClient, name: str, event: ChampionEvent) -> ChampionEvent:
    """Mark a move that happened ``done`` and tag the versions with when their tenure started and ended."""
    done = replace(event, state=DONE)
    if event.state != DONE:
        _write_event(target, mlc, name, done)
    if done.version is not None:
        retry(target, "tagging the new champion", mlc.set_model_version_tag, name, done.version, SINCE_TAG, done.time)
    if done.previous is not None and done.previous != done.version:
        retry(target, "tagging the old champion", mlc.set_model_version_tag, name, done.previous, UNTIL_TAG, done.time)
    return done


def _applied_promotion(
    target: RegistryTarget, mlc: MlflowClient, name: str, number: str, champion: str | None
) -> ChampionEvent | None:
    """The promote event of ``number`` whose move took effect (a retried promotion), or None.

    An ``intended`` event of ``number`` whose move never happened is marked ``abandoned`` on the way.
    """
    events = champion_events(target, name)
    for index in reversed(range(len(events))):
        event = events[index]
        if event.kind != "promote" or event.version != number or event.state == ABANDONED:
            continue
        if move_took_effect(events, index, champion) or event.state == DONE:
            return event
        _write_event(target, mlc, name, replace(event, state=ABANDONED))
    return None


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

    Called again for a version whose promotion already moved champion (the step was retried after
    a failure), nothing moves: the decision is made again against the champion it replaced (the
    event's ``previous``), the event is marked done and the decision recorded.
    """
    target = target_of(store)
    mlc = client(target)
    name, number = version.name, version.version
    previous = expected_champion
    redecided = False
    aliases: list[str] = []
    applied: ChampionEvent | None = None
    if decision.mode != "dry_run":
        with promotion_lock(target, name):
            # under the lock too, so racing candidates cannot leave challenger on a superseded one
            retry(target, "setting challenger", mlc.set_registered_model_alias, name, CHALLENGER, number)
            previous = alias_holder(target, mlc, name, CHAMPION)
            applied = _applied_promotion(target, mlc, name, number, previous)
            if applied is not None:
                log.warning("%s version %s: its promotion already moved champion; finishing its record", name, number)
                previous = expected_champion = applied.previous
                if redecide is not None:
                    decision = redecide(get_version(target, previous, name) if previous else None)
                _finish_move(target, mlc, name, applied)
            else:
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
                # a blocked candidate is no longer the challenger
                elif alias_holder(target, mlc, name, CHALLENGER) == number:
                    retry(target, "removing challenger", mlc.delete_registered_model_alias, name, CHALLENGER)
    extra: dict[str, Any] = {"resumed": True} if applied is not None else {}
    if decision.promote or applied is not None:
        aliases = [CHALLENGER, CHAMPION]
        holder = alias_holder(target, mlc, name, CHAMPION)
        if holder != number:  # only possible across hosts sharing a server (see the module doc)
            log.error(
                "%s: champion moved to version %s right after this promotion of version %s: another host "
                "promoted concurrently; run the gate again",
                name,
                holder,
                number,
            )
            extra["lost_race_to"] = holder
            aliases = [a for a in aliases if alias_holder(target, mlc, name, a) == number]
    promoted = RegisteredVersion(name, number, version.run_id, tuple(aliases), version.model_uri)
    result = Promotion(promoted, decision, expected_champion, previous, redecided, extra)
    record_decision(target, result)
    return result


def record_decision(store: Store, promotion: Promotion) -> dict[str, Any]:
    """Write the audit trail of a decision: version tags, description, run artifacts. Returns the JSON."""
    target = target_of(store)
    mlc = client(target)
    version, decision = promotion.version, promotion.decision
    name, number = version.name, version.version
    when, _ = now()
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
        GATE_BASELINE_VERSION_TAG: decision.baseline_version or "",
    }
    for key, value in prefixed(tags).items():
        retry(target, "recording the decision", mlc.set_model_version_tag, name, number, key, value)
    current = retry(target, "reading the version", mlc.get_model_version, name, number).description or ""
    head = current.split("\n\n## Promotion decision")[0]
    retry(
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
    retry(target, "finishing the promotion", mlc.set_model_version_tag, name, number, PROMOTION_TAG, "done")
    return payload


def rollback(store: Store, name: str | None = None, reason: str = "") -> ChampionEvent:
    """Point champion back at the previous champion; recorded like a gate decision (event + run).

    Raises:
        RegistryError: there is no champion, or no earlier champion to return to.
    """
    target, name = target_of(store), model_name(store, name)
    mlc = client(target)
    with promotion_lock(target, name):
        current = alias_holder(target, mlc, name, CHAMPION)
        if current is None:
            raise RegistryError(f"{name!r} has no champion to roll back")
        events = effective_events(champion_events(target, name), current)
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
        retry(target, "tagging", mlc.set_model_version_tag, name, number, TAG_PREFIX + tag, f"{event.time} {detail}")
    end_run(target, run_id)
    return event


def revoke_promotion(store: Store, version: RegisteredVersion, previous_champion: str | None, reason: str) -> list[str]:
    """Take back the aliases a promotion gave ``version`` (a later step of its run failed).

    ``champion`` returns to ``previous_champion`` (or is removed) only if ``version`` still holds
    it; the move is recorded as a ``revoke`` event. Returns what was done, for the log.
    """
    target = target_of(store)
    mlc = client(target)
    name, number = version.name, version.version
    done: list[str] = []
    with promotion_lock(target, name):
        if alias_holder(target, mlc, name, CHALLENGER) == number:
            retry(target, "removing challenger", mlc.delete_registered_model_alias, name, CHALLENGER)
            done.append("challenger removed")
        if alias_holder(target, mlc, name, CHAMPION) == number:
            restore = previous_champion if previous_champion != number else None
            _move_champion(target, mlc, name, restore, number, "revoke", version.run_id, reason)
            done.append(f"champion -> version {restore}" if restore else "champion removed")
    retry(target, "tagging", mlc.set_model_version_tag, name, number, ROLLED_BACK_TAG, reason or "a later step failed")
    return done


@dataclass(frozen=True)
class Cleanup:
    """What ``cleanup_pending`` found and did, one line per version or event."""

    removed: tuple[str, ...] = ()  # deleted pending versions
    completed: tuple[str, ...] = ()  # pending versions that hold champion: marked ``incomplete``
    skipped: tuple[str, ...] = ()  # younger than the minimum age (a registration may still be running)
    abandoned_events: tuple[str, ...] = ()  # intended moves that never happened

    def lines(self) -> list[str]:
        out = [f"removed version {v} (promotion never finished, no alias)" for v in self.removed]
        out += [
            f"version {v} holds champion but its decision was never recorded: kept, tagged "
            f"{PROMOTION_TAG}=incomplete (roll back with `gist registry rollback` if unwanted)"
            for v in self.completed
        ]
        out += [f"version {v} is pending but recent: left alone (--min-age-minutes)" for v in self.skipped]
        out += [f"event {k}: its champion move never happened; marked abandoned" for k in self.abandoned_events]
        return out or ["nothing pending"]


def cleanup_pending(
    store: Store, name: str | None = None, min_age_seconds: float = 3600.0, dry_run: bool = False
) -> Cleanup:
    """Clean what crashed promotions left: versions tagged ``gist.promotion=pending`` and intended events.

    A pending version older than ``min_age_seconds`` is deleted (its aliases go with it), unless it
    holds champion: then its promotion happened and only its record is missing, so it is kept and
    tagged ``gist.promotion=incomplete``. Intended champion moves older than ``min_age_seconds`` that
    never took effect are marked ``abandoned``. ``dry_run`` reports without changing anything.
    """
    target, name = target_of(store), model_name(store, name)
    mlc = client(target)
    now_ms = now()[1] // 1_000_000
    removed, completed, skipped, abandoned = [], [], [], []
    with promotion_lock(target, name):
        champion = alias_holder(target, mlc, name, CHAMPION)
        events = champion_events(target, name)
        for index, event in enumerate(events):
            if event.state != INTENDED or move_took_effect(events, index, champion):
                continue
            if now_ms - int(event.key[len(EVENT_PREFIX) :]) // 1_000_000 < min_age_seconds * 1000:
                continue  # a promotion on another host may be between its event and its alias move
            abandoned.append(event.key)
            if not dry_run:
                _write_event(target, mlc, name, replace(event, state=ABANDONED))
        for record in list_versions(target, name):
            if not record.pending:
                continue
            if now_ms - record.created < min_age_seconds * 1000:
                skipped.append(record.version)
            elif record.version == champion:
                completed.append(record.version)
                if not dry_run:
                    tag = (name, record.version, PROMOTION_TAG, "incomplete")
                    retry(target, "tagging an incomplete promotion", mlc.set_model_version_tag, *tag)
            else:
                removed.append(record.version)
                if not dry_run:
                    retry(target, "deleting a pending version", mlc.delete_model_version, name, record.version)
    return Cleanup(tuple(removed), tuple(completed), tuple(skipped), tuple(abandoned))
