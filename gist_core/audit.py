"""The data audit: row validation, row accounting, evaluation-set contamination and the data report.

Every input row of every source ends in exactly one bucket: kept, quarantined (bad input),
degenerate (anchor equals its positive or negative), duplicate (an exact copy of an earlier
triplet), decontaminated (a text of the row appears in an evaluation split) or not sampled (left
out by a cap). ``SourceReport.check_identity`` asserts that the buckets add up; the removed rows
that a person may want to look at are written to the quarantine CSV with file, row and reason.

Contamination is an exact match after ``normalize_text`` (lowercase, whitespace collapsed, ends
stripped) against the evaluation splits of the configured local tasks, read with the same readers
and file layout as ``gist_core.tasks``.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gist_core.errors import DataError

log = logging.getLogger(__name__)

QUARANTINE_COLUMNS = ["file", "row", "field", "reason", "text"]
BUCKETS = ("quarantined", "degenerate", "duplicates", "decontaminated", "not_sampled")
# Bytes that were not valid UTF-8, decoded with errors="surrogateescape".
_UNDECODABLE = re.compile("[\udc80-\udcff]")
DEFAULT_MAX_TEXT_CHARS = 20_000


# ---------------------------------------------------------------- validation


def text_problem(text: object, max_chars: int = DEFAULT_MAX_TEXT_CHARS) -> str:
    """Why a value cannot be a training text ("" when it can)."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return "missing text"
    if not isinstance(text, str):
        return f"text is {type(text).__name__}, not a string"
    if not text.strip():
        return "empty or whitespace text"
    if _UNDECODABLE.search(text):
        return "not valid UTF-8"
    if "\ufffd" in text:
        return "not valid UTF-8 (replacement characters)"
    if "\x00" in text:
        return "text contains NUL characters"
    if len(text) > max_chars:
        return f"text longer than {max_chars} characters"
    return ""


def label_problem(label: object) -> str:
    """Why a value cannot be a class label ("" when it can): a non-empty string or an integer."""
    if label is None or (isinstance(label, float) and math.isnan(label)):
        return "missing label"
    if isinstance(label, bool) or not isinstance(label, str | int | float | np.integer):
        return f"label is {type(label).__name__}, not a string or a number"
    if not str(label).strip():
        return "missing label"
    if isinstance(label, str) and _UNDECODABLE.search(label):
        return "label is not valid UTF-8"
    return ""


def label_text(label: object) -> str:
    """A label as the string stored in the triplets (1 and 1.0 are the same class)."""
    if isinstance(label, float | np.floating) and float(label).is_integer():
        return str(int(label))
    return str(label).strip()


# ---------------------------------------------------------------- accounting


@dataclass
class SkippedRow:
    """A row that did not become a triplet, with where it came from and why."""

    file: str
    row: int  # 1-based data row (after the header) or JSON record / line number
    field: str
    reason: str
    text: str = ""


def skipped_row(file: str, row: int, fld: str, reason: str, text: object = "") -> SkippedRow:
    shown = text if isinstance(text, str) else repr(text)
    return SkippedRow(file, int(row), fld, reason, _UNDECODABLE.sub("\ufffd", shown[:200]))


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

    def to_markdown(self) -> str:
        return render_markdown(self)


def similarity_summary(report: SourceReport, pos_sim: np.ndarray, neg_sim: np.ndarray) -> None:
    """Record the guide's verdict on kept rows; NaN similarities (not scored) are left out."""
    scored = ~(np.isnan(pos_sim) | np.isnan(neg_sim))
    report.guide_scored = int(scored.sum())
    report.guide_flagged = int((neg_sim[scored] >= pos_sim[scored]).sum())
    report.guide_pos_sim_mean = _mean(pos_sim[scored])
    report.guide_neg_sim_mean = _mean(neg_sim[scored])


def _mean(values: np.ndarray) -> float | None:
    return round(float(np.mean(values)), 4) if len(values) else None


# ---------------------------------------------------------------- contamination


def normalize_text(text: str) -> str:
    """Lowercase, whitespace runs collapsed to one space, ends stripped: the contamination match key."""
    return " ".join(text.split()).lower()


@dataclass
class ContaminationIndex:
    """Normalised texts of evaluation splits, each mapped to the first ``Task/split`` holding it."""

    where: dict[str, str]
    tasks: list[str]
    split_sizes: dict[str, int]
    not_checked: list[str] = field(default_factory=list)

    def match(self, text: str) -> str | None:
        return self.where.get(normalize_text(text))

    def describe(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            "not_checked": self.not_checked,
            "eval_texts": len(self.where),
            "split_sizes": dict(sorted(self.split_sizes.items())),
        }


def eval_split_texts(task: str, data_dir: Path) -> dict[str, list[str]]:
    """The texts of a local task's evaluation splits, keyed ``Task/split`` (train splits are left out)."""
    from gist_core.tasks import SPECS, read_jsonl, read_qrels

    spec = SPECS.get(task)
    if spec is None:
        raise DataError(f"contamination check: {task!r} is not a local task (known: {', '.join(SPECS)})")
    paths = spec.paths(data_dir)
    for role, path in paths.items():
        if not path.is_file():
            raise DataError(f"contamination check: {path} not found ({task} {role}; evaluate.data_dir)")
    kind = spec.kind.lower()
    out: dict[str, list[str]] = {}
    if kind == "sts":
        for split, path in paths.items():
            out[f"{task}/{split}"] = [str(r[k]) for r in read_jsonl(path) for k in ("sentence1", "sentence2")]
    elif kind == "classification":
        assert spec.read_split is not None
        for split, path in paths.items():
            if split != "train":
                out[f"{task}/{split}"] = list(spec.read_split(path)[0])
    elif kind == "retrieval":
        queries = {str(r["_id"]): str(r["text"]) for r in read_jsonl(paths["queries"])}
        for split, path in paths.items():
            if split not in ("corpus", "queries"):
                out[f"{task}/{split} queries"] = [queries[q] for q in read_qrels(path) if q in queries]
        corpus = []
        for r in read_jsonl(paths["corpus"]):
            title, text = str(r.get("title") or ""), str(r.get("text") or "")
            corpus += [t for t in (title, text, f"{title} {text}".strip()) if t]
        out[f"{task}/corpus"] = corpus
    else:  # pragma: no cover - a new task kind in gist_core.tasks
        raise DataError(f"contamination check: task kind {spec.kind!r} of {task} is not supported")
    return out


def build_contamination_index(tasks: Iterable[str], data_dir: Path, local_only: bool = False) -> ContaminationIndex:
    """Index the evaluation splits of ``tasks``.

    With ``local_only`` (the tasks come from evaluate.tasks), tasks without a local copy (custom
    or ``mteb:`` tasks) are listed as not checked instead of failing.
    """
    from gist_core.tasks import SPECS

    where: dict[str, str] = {}
    sizes: dict[str, int] = {}
    checked, not_checked = [], []
    for task in tasks:
        if task not in SPECS and local_only:
            log.warning("contamination check: %s has no local copy; its texts are not checked", task)
            not_checked.append(task)
            continue
        checked.append(task)
        for split, texts in eval_split_texts(task, data_dir).items():
            sizes[split] = len(texts)
            for text in texts:
                key = normalize_text(text)
                if key:
                    where.setdefault(key, split)
    return ContaminationIndex(where, checked, sizes, not_checked)


# ---------------------------------------------------------------- the readable report


def _table(header: list[str], rows: Iterable[Iterable[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return lines


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


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
    lines += _table(
        ["source", "file", "input", "kept", *BUCKETS, "labels"],
        (
            [s.name, s.file, s.input_rows, s.kept, *(getattr(s, b) for b in BUCKETS), s.labels or "-"]
            for s in report.sources
        ),
    )
    lines += ["", "## Rows per task (training draws one task per batch)", ""]
    lines += _table(["task_name", "triplets"], sorted(report.rows_per_task.items()))
    reasons: Counter[str] = Counter()
    for s in report.sources:
        reasons.update(s.reasons)
    lines += ["", "## Why rows were removed", ""]
    lines += (
        _table(["reason", "rows"], sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
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
            lines += [""] + _table(["evaluation split", "training rows matching"], sorted(by_split.items()))
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
        lines += [""] + _table(
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
            lines += _table(
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
        lines += _table(["setting", "value"], sorted((k, v) for k, v in report.settings.items()))
    return "\n".join(lines) + "\n"
