"""Row accounting and the data report: every input row ends in exactly one bucket, and a person can see why.

Buckets: kept, quarantined (bad input), degenerate (anchor equals its positive or negative),
duplicate (an exact copy of an earlier triplet), decontaminated (a text of the row appears in an
evaluation split) or not sampled (left out by a cap). ``SourceReport.check_identity`` asserts that
the buckets add up; the removed rows are written to the quarantine CSV with file, row and reason
(``gist_core.readers.write_skipped``). ``render_markdown`` is ``reports/data.md``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from gist_core.tables import markdown_table

BUCKETS = ("quarantined", "degenerate", "duplicates", "decontaminated", "not_sampled")


# ---------------------------------------------------------------- accounting


@dataclass
class SourceReport:
    """Row accounting for one input source (a classification file or a MEDI file)."""

    name: str
    kind: str  # "classification" | "medi"
    file: str
    input_rows: int = 0
    kept: int = 0
    quarantined: int = 0
    degenerate: int = 0
    duplicates: int = 0
    decontaminated: int = 0
    not_sampled: int = 0
    labels: int = 0
    # the guide's verdict on the kept rows: flagged = it scores query-negative >= query-positive
    guide_scored: int = 0
    guide_flagged: int = 0
    guide_pos_sim_mean: float | None = None
    guide_neg_sim_mean: float | None = None
    # mining only: the guide's mean similarity of an anchor to a random text of its label
    guide_random_same_label_sim_mean: float | None = None
    reasons: dict[str, int] = field(default_factory=dict)

    def count(self, bucket: str, reason: str, n: int = 1) -> None:
        """Move ``n`` rows into a removal bucket, recording why."""
        if bucket not in BUCKETS:
            raise ValueError(f"unknown bucket {bucket!r}")
        if n:
            setattr(self, bucket, getattr(self, bucket) + n)
            self.reasons[reason] = self.reasons.get(reason, 0) + n

    def check_identity(self) -> None:
        removed = sum(getattr(self, b) for b in BUCKETS)
        if self.kept + removed != self.input_rows or sum(self.reasons.values()) != removed:
            parts = " + ".join(f"{b} {getattr(self, b)}" for b in BUCKETS)
            raise AssertionError(
                f"{self.file}: row accounting broken: input {self.input_rows} != kept {self.kept} + {parts} "
                f"(reasons add up to {sum(self.reasons.values())})"
            )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SourceReport:
        return cls(**raw)


@dataclass
class DataReport:
    """The data stage's report: reports/data.json (DVC metrics) and reports/data.md."""

    sources: list[SourceReport]
    rows_per_task: dict[str, int] = field(default_factory=dict)
    contamination: dict[str, Any] = field(default_factory=dict)
    guide: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    flagged_examples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def totals(self) -> dict[str, int]:
        keys = ["input_rows", "kept", *BUCKETS, "guide_scored", "guide_flagged"]
        return {k: sum(getattr(s, k) for s in self.sources) for k in keys}

    def check_identity(self) -> None:
        for source in self.sources:
            source.check_identity()
        if sum(self.rows_per_task.values()) != self.totals["kept"]:
            raise AssertionError(
                f"rows per task add up to {sum(self.rows_per_task.values())}, kept is {self.totals['kept']}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "totals": self.totals,
            "sources": {s.name: asdict(s) for s in self.sources},
            "rows_per_task": dict(sorted(self.rows_per_task.items())),
            "contamination": self.contamination,
            "guide": self.guide,
            "settings": self.settings,
        }


def similarity_summary(report: SourceReport, pos_sim: np.ndarray, neg_sim: np.ndarray) -> None:
    """Record the guide's verdict on kept rows; NaN similarities (not scored) are left out."""
    scored = ~(np.isnan(pos_sim) | np.isnan(neg_sim))
    report.guide_scored = int(scored.sum())
    report.guide_flagged = int((neg_sim[scored] >= pos_sim[scored]).sum())
    report.guide_pos_sim_mean = _mean(pos_sim[scored])
    report.guide_neg_sim_mean = _mean(neg_sim[scored])


def _mean(values: np.ndarray) -> float | None:
    return round(float(np.mean(values)), 4) if len(values) else None


# ---------------------------------------------------------------- the readable report


def render_markdown(report: DataReport) -> str:
    """A person's view of the report: deterministic (no timestamps), so DVC sees no change on a rerun."""
    totals = report.totals
    lines = ["# Data report", ""]
    removed = " + ".join(f"{b} {totals[b]:,}" for b in BUCKETS)
    lines += [
        f"**{totals['kept']:,} triplets** from {totals['input_rows']:,} input rows "
        f"(input = kept {totals['kept']:,} + {removed}; checked per source).",
        "",
        "## Rows per source",
        "",
    ]
    lines += markdown_table(
        ["source", "file", "input", "kept", *BUCKETS, "labels"],
        (
            [s.name, s.file, s.input_rows, s.kept, *(getattr(s, b) for b in BUCKETS), s.labels or "-"]
            for s in report.sources
        ),
    )
    lines += ["", "## Rows per task (training draws one task per batch)", ""]
    lines += markdown_table(["task_name", "triplets"], sorted(report.rows_per_task.items()))
    reasons: Counter[str] = Counter()
    for s in report.sources:
        reasons.update(s.reasons)
    lines += ["", "## Why rows were removed", ""]
    lines += (
        markdown_table(["reason", "rows"], sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
        if reasons
        else ["No rows were removed."]
    )
    c = report.contamination
    lines += ["", "## Contamination with evaluation splits", ""]
    if c.get("tasks") is not None:
        lines.append(
            f"Exact match after lowercasing and collapsing whitespace, against {c.get('eval_texts', 0):,} distinct "
            f"texts of: {', '.join(c.get('tasks') or []) or 'none'}"
            + (f" (no local copy, not checked: {', '.join(c['not_checked'])})" if c.get("not_checked") else "")
            + f". Rows {'removed' if c.get('remove', True) else 'found (kept: data.contamination.remove is false)'}:"
            f" {c.get('rows', 0):,}."
        )
        by_split = c.get("by_split") or {}
        if by_split:
            lines += [""] + markdown_table(["evaluation split", "training rows matching"], sorted(by_split.items()))
    else:
        lines.append("Not checked.")
    g = report.guide
    lines += ["", "## The guide's verdict", ""]
    if totals["guide_scored"]:
        share = totals["guide_flagged"] / totals["guide_scored"]
        lines.append(
            f"Guide `{g.get('name')}` (fingerprint `{str(g.get('fingerprint'))[:16]}`). A row is flagged when the "
            f"guide scores query-negative at or above query-positive: {totals['guide_flagged']:,} of "
            f"{totals['guide_scored']:,} kept rows ({share:.1%}). Flagged rows stay in the data: they are the noise "
            "the GIST loss's guided masking is there to handle."
        )
        lines += [""] + markdown_table(
            ["source", "scored", "flagged", "mean sim(q, pos)", "mean sim(q, neg)", "mean sim(q, random same label)"],
            (
                [
                    s.name,
                    s.guide_scored,
                    s.guide_flagged,
                    s.guide_pos_sim_mean,
                    s.guide_neg_sim_mean,
                    s.guide_random_same_label_sim_mean,
                ]
                for s in report.sources
            ),
        )
        if report.flagged_examples:
            lines += ["", "Examples of flagged rows:", ""]
            lines += markdown_table(
                ["task", "anchor", "positive", "negative", "sim pos", "sim neg"],
                (
                    [
                        e["task_name"],
                        e["anchor"][:80],
                        e["positive"][:80],
                        e["negative"][:80],
                        e["guide_pos_sim"],
                        e["guide_neg_sim"],
                    ]
                    for e in report.flagged_examples
                ),
            )
    else:
        lines.append("Not computed (data.audit.guide_verdicts is false, or no guide was given).")
    if report.settings:
        lines += ["", "## Settings", ""]
        lines += markdown_table(["setting", "value"], sorted((k, v) for k, v in report.settings.items()))
    return "\n".join(lines) + "\n"
