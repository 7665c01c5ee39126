"""The promotion gate: a pure decision from per-task scores and a policy. No I/O.

Scores are MTEB main scores on mteb's 0-1 scale, so thresholds are in the same units
(0.01 = one point). Each rule's outcome is kept so the decision can be audited.

The candidate is compared with one baseline (``choose_baseline``): the current champion when
there is one and ``gate.baseline`` is ``champion``, else the base student scored in the same run.
Rules, in the order they are reported:

- ``required_tasks``: every ``gate.required_tasks`` entry is scored (and did not fail) for both;
- ``complete``: the candidate is scored on every task the baseline has, none failed, and the two
  have at least one task in common (a baseline with no comparable score never lets a candidate through);
- ``comparable``: the candidate was evaluated with the same mteb version, task revisions and
  evaluation settings (precision, ``evaluate.max_seq_length``, the sentence-transformers /
  transformers / torch versions: ``EVAL_SETTING_KEYS``) as the baseline (only checked when the
  candidate's are known; a baseline whose are unknown fails);
- ``min_mean_delta``: the mean of the per-task deltas is at least the threshold (a small positive
  default, so a tie, every task scoring the same as the baseline, blocks; the decision says "tie");
- ``min_category_delta[<category>]``: per MTEB task type (STS, Classification, ...), the mean delta
  of that category's tasks is at least its threshold; a category with no scored task is skipped
  (completeness is what ``required_tasks`` is for);
- ``max_task_regression``: no task drops by more than the threshold.

Comparisons allow ``EPSILON`` so a delta equal to a threshold passes: mteb stores scores to 6
decimals, and ``0.83 - 0.82`` is not exactly ``0.01`` in floating point. A candidate whose every
score equals the baseline's (within ``TIE_TOLERANCE``, half mteb's last stored decimal) is a *tie*.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from statistics import fmean
from typing import Any

from gist_core.config import GateMode, GateSettings
from gist_core.tables import markdown_table

EPSILON = 1e-9
TIE_TOLERANCE = 5e-7  # mteb stores scores to 6 decimals: closer than this is the same score
# What an evaluation was computed with, besides task revisions and the mteb version (``Scorecard.eval_settings``).
EVAL_SETTING_KEYS = ("precision", "max_seq_length", "libraries")


@dataclass(frozen=True)
class Scorecard:
    """One model's evaluation: per-task main scores and what they were computed with.

    ``task_revisions`` / ``mteb_version`` are None when not known (e.g. a champion registered
    before they were recorded). ``failed_tasks`` are tasks that were meant to be scored but were
    not. ``version`` is the registry version when the scorecard is a registered model's.
    ``eval_settings`` holds ``EVAL_SETTING_KEYS`` as strings (e.g. ``{"precision": "float32",
    "max_seq_length": "model", "libraries": "sentence-transformers==6.2.0 ..."}``); None: unknown.
    """

    label: str
    scores: Mapping[str, float]
    task_revisions: Mapping[str, str] | None = None
    mteb_version: str | None = None
    failed_tasks: tuple[str, ...] = ()
    version: str | None = None
    eval_settings: Mapping[str, str] | None = None

    @property
    def name(self) -> str:
        """``base``, or ``champion v3`` for a registered version."""
        return f"{self.label} v{self.version}" if self.version else self.label

    def scored(self) -> set[str]:
        return {t for t in self.scores if t not in self.failed_tasks}


@dataclass(frozen=True)
class RuleOutcome:
    rule: str
    passed: bool
    detail: str
    observed: float | None = None
    threshold: float | None = None


@dataclass(frozen=True)
class TaskRow:
    """One line of the candidate-vs-baseline table."""

    task: str
    category: str | None
    candidate: float | None
    baseline: float | None

    @property
    def delta(self) -> float | None:
        if self.candidate is None or self.baseline is None:
            return None
        return self.candidate - self.baseline


@dataclass(frozen=True)
class GateDecision:
    mode: GateMode
    passed: bool
    baseline: str
    rules: tuple[RuleOutcome, ...]
    deltas: dict[str, float]
    baseline_version: str | None = None
    thresholds: dict[str, Any] = field(default_factory=dict)
    table: tuple[TaskRow, ...] = ()

    @property
    def promote(self) -> bool:
        """Aliases move only when the gate is enabled (or off) and the candidate passed."""
        return self.passed and self.mode != "dry_run"

    @property
    def verdict(self) -> str:
        return "passed" if self.passed else "blocked"

    @property
    def baseline_label(self) -> str:
        return f"{self.baseline} v{self.baseline_version}" if self.baseline_version else self.baseline

    @property
    def reasons(self) -> list[str]:
        return [r.detail for r in self.rules if not r.passed]

    @property
    def tie(self) -> bool:
        """Every task the two share scores the same for the candidate and the baseline."""
        return is_tie(self.deltas)

    def summary(self) -> str:
        if self.mode == "disabled":
            return "gate disabled: promoted without checks"
        head = f"gate {self.verdict} (mode {self.mode}, baseline {self.baseline_label})"
        if not self.passed:
            return f"{head}: " + "; ".join(self.reasons)
        return f"{head}; {tie_text(self.baseline_label)}" if self.tie else head

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "passed": self.passed,
            "verdict": self.verdict,
            "promote": self.promote,
            "baseline": self.baseline,
            "baseline_version": self.baseline_version,
            "summary": self.summary(),
            "thresholds": dict(self.thresholds),
            "rules": [asdict(r) for r in self.rules],
            "table": [{**asdict(row), "delta": row.delta} for row in self.table],
            "deltas": dict(self.deltas),
        }

    def markdown(self) -> str:
        """The decision for people: outcome, thresholds, candidate-vs-baseline table, each rule."""
        lines = [f"## {self.summary()}", ""]
        lines += markdown_table(
            ["task", "category", "candidate", "baseline", "delta"],
            (
                [row.task, row.category or "?", _fmt(row.candidate), _fmt(row.baseline), _fmt(row.delta, signed=True)]
                for row in self.table
            ),
            align=["left", "left", "right", "right", "right"],
        )
        lines += ["", f"Baseline: {self.baseline_label}. Thresholds: `{_compact(self.thresholds)}`", ""]
        lines += [f"- {'pass' if r.passed else 'FAIL'} `{r.rule}`: {r.detail}" for r in self.rules]
        if not self.rules:
            lines.append("- no rules applied (gate disabled)")
        return "\n".join(lines)


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def _compact(thresholds: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in thresholds.items())


def is_tie(deltas: Mapping[str, float]) -> bool:
    """True when there are deltas and every one is zero at mteb's precision."""
    return bool(deltas) and all(abs(d) < TIE_TOLERANCE for d in deltas.values())


def tie_text(baseline: str) -> str:
    return f"tie: every task scores the same as {baseline}"


def thresholds(policy: GateSettings) -> dict[str, Any]:
    """The policy as recorded with every decision."""
    return policy.model_dump(mode="json")


def choose_baseline(base: Scorecard, champion: Scorecard | None, policy: GateSettings) -> Scorecard:
    """The champion when there is one and the policy compares against it, else the base model."""
    if policy.baseline == "champion" and champion is not None:
        return champion
    return base


def _as_scorecard(value: Scorecard | Mapping[str, float], label: str) -> Scorecard:
    return value if isinstance(value, Scorecard) else Scorecard(label, dict(value))


def _at_least(observed: float, threshold: float) -> bool:
    return observed >= threshold - EPSILON


def decide(
    candidate: Scorecard | Mapping[str, float],
    baseline: Scorecard | Mapping[str, float],
    policy: GateSettings,
    baseline_name: str = "base",
    *,
    categories: Mapping[str, str] | None = None,
) -> GateDecision:
    """Apply every rule of the policy; the candidate passes only if all rules pass.

    Args:
        candidate: the candidate's scores (a plain ``{task: score}`` or a Scorecard with provenance).
        baseline: the baseline's; a plain mapping is labelled ``baseline_name``.
        policy: ``params.yaml: gate``.
        categories: ``{task: MTEB type}`` for the per-category rule.
    """
    cand = _as_scorecard(candidate, "candidate")
    base = _as_scorecard(baseline, baseline_name)
    categories = dict(categories or {})
    scored_c, scored_b = cand.scored(), base.scored()
    common = sorted(scored_c & scored_b)
    deltas = {t: cand.scores[t] - base.scores[t] for t in common}
    table = tuple(
        TaskRow(t, categories.get(t), cand.scores.get(t), base.scores.get(t))
        for t in sorted(set(cand.scores) | set(base.scores))
    )
    common_fields = {
        "baseline": base.label,
        "baseline_version": base.version,
        "thresholds": thresholds(policy),
        "table": table,
    }
    if policy.mode == "disabled":
        return GateDecision("disabled", True, rules=(), deltas=deltas, **common_fields)

    rules = [
        _required_rule(policy, cand, base),
        _complete_rule(cand, base, common),
    ]
    if cand.task_revisions is not None or cand.mteb_version is not None or cand.eval_settings is not None:
        rules.append(_comparable_rule(cand, base, common))
    if deltas:
        mean_delta = fmean(deltas.values())
        detail = f"mean delta {mean_delta:+.4f} vs minimum {policy.min_mean_delta:+.4f}"
        if is_tie(deltas):
            detail = f"{tie_text(base.name)} ({detail})"
        rules.append(
            RuleOutcome(
                "min_mean_delta",
                _at_least(mean_delta, policy.min_mean_delta),
                detail,
                mean_delta,
                policy.min_mean_delta,
            )
        )
        rules += _category_rules(policy, deltas, categories)
        worst_task = min(deltas, key=deltas.__getitem__)
        worst = deltas[worst_task]
        rules.append(
            RuleOutcome(
                "max_task_regression",
                _at_least(worst, -policy.max_task_regression),
                f"worst task {worst_task} {worst:+.4f} vs allowed regression -{policy.max_task_regression:.4f}",
                worst,
                -policy.max_task_regression,
            )
        )
    passed = all(r.passed for r in rules)
    return GateDecision(policy.mode, passed, rules=tuple(rules), deltas=deltas, **common_fields)


def _required_rule(policy: GateSettings, cand: Scorecard, base: Scorecard) -> RuleOutcome:
    problems = []
    for side, card in (("candidate", cand), (base.name, base)):
        missing = [t for t in policy.required_tasks if t not in card.scores]
        failed = [t for t in policy.required_tasks if t in card.failed_tasks]
        if missing:
            problems.append(f"not scored for the {side}: {missing}")
        if failed:
            problems.append(f"failed for the {side}: {failed}")
    if problems:
        return RuleOutcome("required_tasks", False, "required tasks " + "; ".join(problems))
    return RuleOutcome("required_tasks", True, "all required tasks scored")


def _complete_rule(cand: Scorecard, base: Scorecard, common: list[str]) -> RuleOutcome:
    if not cand.scored():
        return RuleOutcome("complete", False, "no task scored for the candidate")
    if not common:
        held = sorted(base.scored())
        return RuleOutcome(
            "complete", False, f"no task in common with {base.name} (its scored tasks: {held or 'none'})"
        )
    problems = []
    if cand.failed_tasks:
        problems.append(f"tasks failed or not scored for the candidate: {sorted(cand.failed_tasks)}")
    missing = sorted(base.scored() - cand.scored() - set(cand.failed_tasks))
    if missing:
        problems.append(f"tasks scored for the baseline but not the candidate: {missing}")
    if problems:
        return RuleOutcome("complete", False, "; ".join(problems))
    return RuleOutcome("complete", True, "candidate scored on every baseline task")


def _comparable_rule(cand: Scorecard, base: Scorecard, common: list[str]) -> RuleOutcome:
    problems = []
    if cand.mteb_version != base.mteb_version:
        problems.append(f"mteb {cand.mteb_version} vs {base.mteb_version or 'unknown'} for {base.name}")
    if base.task_revisions is None:
        problems.append(f"task revisions unknown for {base.name}")
    else:
        cand_revs = cand.task_revisions or {}
        differ = [
            f"{t} {cand_revs.get(t)} vs {base.task_revisions.get(t)}"
            for t in common
            if cand_revs.get(t) != base.task_revisions.get(t)
        ]
        if differ:
            problems.append("task revisions differ: " + ", ".join(differ))
    if cand.eval_settings is not None:
        if base.eval_settings is None:
            problems.append(f"evaluation settings ({', '.join(EVAL_SETTING_KEYS)}) unknown for {base.name}")
        else:
            problems += [
                f"{key} {cand.eval_settings.get(key)} vs {base.eval_settings.get(key, 'unknown')}"
                for key in EVAL_SETTING_KEYS
                if cand.eval_settings.get(key) != base.eval_settings.get(key)
            ]
    if problems:
        return RuleOutcome("comparable", False, "not comparable with the baseline: " + "; ".join(problems))
    checked = "mteb version, task revisions" + (" and evaluation settings" if cand.eval_settings is not None else "")
    return RuleOutcome("comparable", True, f"same {checked} as {base.name}")


def _category_rules(policy: GateSettings, deltas: dict[str, float], categories: dict[str, str]) -> list[RuleOutcome]:
    if not policy.min_category_delta:
        return []
    unknown = [t for t in deltas if t not in categories]
    rules = []
    for category, minimum in sorted(policy.min_category_delta.items()):
        name = f"min_category_delta[{category}]"
        if unknown:
            rules.append(RuleOutcome(name, False, f"category unknown for tasks {unknown}", None, minimum))
            continue
        tasks = [t for t in deltas if categories[t] == category]
        if not tasks:
            rules.append(
                RuleOutcome(name, True, f"{category}: skipped, no task of this category scored", None, minimum)
            )
            continue
        mean = fmean(deltas[t] for t in tasks)
        rules.append(
            RuleOutcome(
                name,
                _at_least(mean, minimum),
                f"{category} mean delta {mean:+.4f} over {tasks} vs minimum {minimum:+.4f}",
                mean,
                minimum,
            )
        )
    return rules
