"""Promotion: the gate's decision applied to the aliases, as a compare-and-set, with its audit trail.

A candidate first gets ``challenger``; if the gate passes, ``champion`` moves to it; if not,
``champion`` stays and ``challenger`` is taken back. The move is a compare-and-set: under a lock
shared by every host (``gist_core.registry.locks``) the champion alias is read again, and if it
moved since the decision was made, the decision is made again against the new champion's recorded
scores. Two promotions racing for
one model name therefore end with one champion, the one that passed against the latest champion.

Each decision is written as run artifacts ``gate/decision.json`` and ``gate/decision.md``, as
``gist.gate.*`` tags and in the version's description; each champion move is an event
(``gist_core.registry.history``). ``rollback`` walks back one promotion; ``revoke_promotion``
takes back a promotion whose run failed later.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gist_core.errors import RegistryError
from gist_core.gate import GateDecision
from gist_core.registry.client import RegistryTarget, Store, client, model_name, retry, target_of
from gist_core.registry.history import ChampionEvent, champion_events, now, previous_champion
from gist_core.registry.locks import promotion_lock
from gist_core.registry.tags import (
    CHALLENGER,
    CHAMPION,
    EVENT_PREFIX,
    PROMOTION_TAG,
    ROLLED_BACK_TAG,
    SINCE_TAG,
    TAG_PREFIX,
    UNTIL_TAG,
    prefixed,
)
from gist_core.registry.tracking import end_run, log_artifact_dict, log_artifact_text, run_url, start_run, version_url
from gist_core.registry.versions import RegisteredVersion, VersionRecord, alias_holder, get_version

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
    """Point champion at ``new`` (None: remove it) and record the move. Call under the lock."""
    when, ns = now()
    if new is None:
        retry(target, "removing the champion alias", mlc.delete_registered_model_alias, name, CHAMPION)
    else:
        retry(target, f"moving champion to version {new}", mlc.set_registered_model_alias, name, CHAMPION, new)
    event = ChampionEvent(when, kind, new, previous, run_id, detail[:2000], key=f"{EVENT_PREFIX}{ns:020d}")
    payload = {k: v for k, v in event.to_dict().items() if k != "key"}
    retry(target, "recording the champion move", mlc.set_registered_model_tag, name, event.key, json.dumps(payload))
    if new is not None:
        retry(target, "tagging the new champion", mlc.set_model_version_tag, name, new, SINCE_TAG, when)
    if previous is not None and previous != new:
        retry(target, "tagging the old champion", mlc.set_model_version_tag, name, previous, UNTIL_TAG, when)
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
    target = target_of(store)
    mlc = client(target)
    name, number = version.name, version.version
    previous = expected_champion
    redecided = False
    aliases: list[str] = []
    if decision.mode != "dry_run":
        with promotion_lock(target, name):
            # under the lock too, so racing candidates cannot leave challenger on a superseded one
            retry(target, "setting challenger", mlc.set_registered_model_alias, name, CHALLENGER, number)
            previous = alias_holder(target, mlc, name, CHAMPION)
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
                if alias_holder(target, mlc, name, CHALLENGER) == number:
                    retry(target, "removing challenger", mlc.delete_registered_model_alias, name, CHALLENGER)
    extra: dict[str, Any] = {}
    if decision.promote:
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
