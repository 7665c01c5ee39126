"""The promotion gate: a pure decision from per-task scores and a policy. No I/O.

Scores are MTEB main scores on mteb's 0-1 scale, so thresholds are in the same units
(0.01 = one point). Each rule's outcome is kept so the decision can be audited.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from statistics import fmean
from typing import Any, Literal

from gist_core.config import GateSettings

Mode = Literal["enabled", "dry_run", "disabled"]


@dataclass(frozen=True)
class RuleOutcome:
    rule: str
    passed: bool
    detail: str
    observed: float | None = None
    threshold: float | None = None


@dataclass(frozen=True)
class GateDecision:
    mode: Mode
    passed: bool
    baseline: str
    rules: tuple[RuleOutcome, ...]
    deltas: dict[str, float]

    @property
    def promote(self) -> bool:
        """Aliases move only when the gate is enabled (or off) and the candidate passed."""
        return self.passed and self.mode != "dry_run"

    @property
    def verdict(self) -> str:
        return "passed" if self.passed else "blocked"

    @property
    def reasons(self) -> list[str]:
        return [r.detail for r in self.rules if not r.passed]

    def summary(self) -> str:
        if self.mode == "disabled":
            return "gate disabled: promoted without checks"
        head = f"gate {self.verdict} (mode {self.mode}, baseline {self.baseline})"
        return head if self.passed else f"{head}: " + "; ".join(self.reasons)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "passed": self.passed,
            "verdict": self.verdict,
            "promote": self.promote,
            "baseline": self.baseline,
            "rules": [asdict(r) for r in self.rules],
            "deltas": dict(self.deltas),
        }


def decide(
    candidate: dict[str, float], baseline: dict[str, float], policy: GateSettings, baseline_name: str = "base"
) -> GateDecision:
    """Apply every rule of the policy; the candidate passes only if all rules pass."""
    if policy.mode == "disabled":
        return GateDecision("disabled", True, baseline_name, (), {})

    rules: list[RuleOutcome] = []
    missing_required = [t for t in policy.required_tasks if t not in candidate or t not in baseline]
    rules.append(
        RuleOutcome(
            "required_tasks",
            not missing_required,
            f"required tasks missing: {missing_required}" if missing_required else "all required tasks scored",
        )
    )
    missing = sorted(set(baseline) - set(candidate))
    rules.append(
        RuleOutcome(
            "complete",
            not missing and bool(candidate),
            f"tasks scored for the baseline but not the candidate: {missing}"
            if missing
            else ("no task scored" if not candidate else "candidate scored on every baseline task"),
        )
    )
    deltas = {t: candidate[t] - baseline[t] for t in sorted(candidate) if t in baseline}
    if deltas:
        mean_delta = fmean(deltas.values())
        rules.append(
            RuleOutcome(
                "min_mean_delta",
                mean_delta >= policy.min_mean_delta,
                f"mean delta {mean_delta:+.4f} vs minimum {policy.min_mean_delta:+.4f}",
                mean_delta,
                policy.min_mean_delta,
            )
        )
        worst_task = min(deltas, key=deltas.__getitem__)
        worst = deltas[worst_task]
        rules.append(
            RuleOutcome(
                "max_task_regression",
                worst >= -policy.max_task_regression,
                f"worst task {worst_task} {worst:+.4f} vs allowed regression -{policy.max_task_regression:.4f}",
                worst,
                -policy.max_task_regression,
            )
        )
    passed = all(r.passed for r in rules)
    return GateDecision(policy.mode, passed, baseline_name, tuple(rules), deltas)
