"""Training data: read classification train splits, validate rows, build (anchor, positive, negative) triplets.

Every input row ends in exactly one bucket: kept as a triplet anchor, quarantined (bad input),
dropped as degenerate or duplicate, or not sampled (per-task cap). ``DataReport.check_identity``
asserts that the buckets add up, and skipped rows are written to a CSV a person can read.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from gist_core.config import ClassificationSource, DataSettings
from gist_core.errors import DataError

log = logging.getLogger(__name__)

TRIPLET_COLUMNS = ["anchor", "positive", "negative", "task_name"]
QUARANTINE_COLUMNS = ["file", "row", "field", "reason", "text"]
MAX_TEXT_CHARS = 20_000


@dataclass
class SkippedRow:
    """A row that did not become a triplet, with where it came from and why."""

    file: str
    row: int  # 1-based data row, after the header
    field: str
    reason: str
    text: str = ""


@dataclass
class TaskReport:
    task_name: str
    file: str
    input_rows: int = 0
    kept: int = 0
    quarantined: int = 0
    degenerate: int = 0
    duplicates: int = 0
    not_sampled: int = 0
    labels: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def check_identity(self) -> None:
        accounted = self.kept + self.quarantined + self.degenerate + self.duplicates + self.not_sampled
        if accounted != self.input_rows:
            raise AssertionError(
                f"{self.file}: row accounting broken: input {self.input_rows} != kept {self.kept} + "
                f"quarantined {self.quarantined} + degenerate {self.degenerate} + duplicates "
                f"{self.duplicates} + not_sampled {self.not_sampled}"
            )


@dataclass
class DataReport:
    tasks: list[TaskReport]

    @property
    def totals(self) -> dict[str, int]:
        keys = ["input_rows", "kept", "quarantined", "degenerate", "duplicates", "not_sampled"]
        return {k: sum(getattr(t, k) for t in self.tasks) for k in keys}

    def check_identity(self) -> None:
        for task in self.tasks:
            task.check_identity()

    def to_dict(self) -> dict:
        return {"totals": self.totals, "tasks": {t.task_name: asdict(t) for t in self.tasks}}


def _read_lastsep(path: Path, source: ClassificationSource, skipped: list[SkippedRow]) -> pd.DataFrame:
    """Lines of ``text<sep>label`` with a header; split on the last separator (texts may contain it)."""
    raw_lines = path.read_bytes().splitlines()
    if not raw_lines:
        raise DataError(f"{path}: file is empty")
    header = raw_lines[0].decode("utf-8", errors="replace").strip().rsplit(source.separator, 1)
    if len(header) != 2:
        raise DataError(f"{path}: header {raw_lines[0][:80]!r} is not '<text>{source.separator}<label>'")
    text_col, label_col = header
    rows: list[tuple[int, str, str]] = []
    for i, raw in enumerate(raw_lines[1:], start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(SkippedRow(source.path, i, "text", "not valid UTF-8", raw[:200].decode("utf-8", "replace")))
            continue
        if not line.strip():
            skipped.append(SkippedRow(source.path, i, "text", "blank line"))
            continue
        if source.separator not in line:
            skipped.append(SkippedRow(source.path, i, label_col, f"no {source.separator!r} separator", line[:200]))
            continue
        text, label = line.rsplit(source.separator, 1)
        rows.append((i, text, label.strip()))
    frame = pd.DataFrame(rows, columns=["row", text_col, label_col])
    return frame


def _read_table(path: Path, source: ClassificationSource) -> pd.DataFrame:
    try:
        if source.format in ("csv", "tsv"):
            frame = pd.read_csv(
                path,
                sep="," if source.format == "csv" else "\t",
                dtype=str,
                keep_default_na=False,
                encoding="utf-8",
                encoding_errors="replace",
            )
        elif source.format == "jsonl":
            frame = pd.read_json(path, lines=True, dtype=False)
        else:
            frame = pd.read_parquet(path)
    except (ValueError, pd.errors.ParserError, OSError) as err:
        raise DataError(f"{path}: cannot be read as {source.format}: {err}") from None
    frame.insert(0, "row", np.arange(1, len(frame) + 1))
    return frame


def read_classification_source(source: ClassificationSource, root: Path) -> tuple[pd.DataFrame, list[SkippedRow], int]:
    """Read one labelled text file into (row, text, label); return valid rows, skipped rows, input row count."""
    path = Path(source.path)
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise DataError(f"{path}: classification data file not found (data.classification '{source.name}')")
    skipped: list[SkippedRow] = []
    frame = _read_lastsep(path, source, skipped) if source.format == "lastsep" else _read_table(path, source)
    missing = [c for c in (source.text_column, source.label_column) if c not in frame.columns]
    if missing:
        have = [c for c in frame.columns if c != "row"]
        raise DataError(f"{path}: missing column(s) {missing} (has {have}); set text_column/label_column")
    input_rows = len(frame) + len(skipped)
    frame = frame[["row", source.text_column, source.label_column]].rename(
        columns={source.text_column: "text", source.label_column: "label"}
    )
    bad = []
    for row, text, label in frame.itertuples(index=False):
        reason, fld = _row_problem(text, label)
        if reason:
            skipped.append(SkippedRow(source.path, int(row), fld, reason, str(text)[:200]))
            bad.append(row)
    frame = frame[~frame["row"].isin(bad)].copy()
    frame["text"] = frame["text"].astype(str)
    frame["label"] = frame["label"].astype(str).str.strip()
    return frame.reset_index(drop=True), skipped, input_rows


def _row_problem(text: object, label: object) -> tuple[str, str]:
    if not isinstance(text, str):
        return (f"text is {type(text).__name__}, not a string", "text")
    if not text.strip():
        return ("empty or whitespace text", "text")
    if "\ufffd" in text:
        return ("not valid UTF-8 (replacement characters)", "text")
    if len(text) > MAX_TEXT_CHARS:
        return (f"text longer than {MAX_TEXT_CHARS} characters", "text")
    if label is None or (isinstance(label, float) and np.isnan(label)) or not str(label).strip():
        return ("missing label", "label")
    return ("", "")


def _task_seed(seed: int, task_name: str) -> int:
    """A per-task seed that does not depend on the order of sources in params.yaml."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{task_name}".encode()).digest()[:8], "little")


def build_triplets(frame: pd.DataFrame, task_name: str, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """For each row: positive = another text of the same label, negative = a text of another label.

    Returns (triplets with a ``row`` column, rows whose label has a single example).
    """
    rng = np.random.default_rng(_task_seed(seed, task_name))
    counts = frame["label"].value_counts()
    singletons = frame[frame["label"].map(counts) < 2]
    usable = frame[frame["label"].map(counts) >= 2].sort_values(["label", "row"], kind="stable").reset_index(drop=True)
    if usable["label"].nunique() < 2:
        raise DataError(f"task {task_name}: needs at least two labels with two or more examples each")
    labels = usable["label"].to_numpy()
    n = len(usable)
    # Rows are sorted by label, so each label is one contiguous block [start, start + size).
    starts = pd.Series(np.arange(n)).groupby(labels).transform("min").to_numpy()
    sizes = pd.Series(labels).map(usable["label"].value_counts()).to_numpy()
    pos_in_block = np.arange(n) - starts
    offset = rng.integers(0, sizes - 1)  # another member of the block: skip the anchor itself
    positive_idx = starts + offset + (offset >= pos_in_block)
    k = rng.integers(0, n - sizes)  # any row outside the block
    negative_idx = np.where(k < starts, k, k + sizes)
    texts = usable["text"].to_numpy()
    triplets = pd.DataFrame(
        {
            "row": usable["row"].to_numpy(),
            "anchor": texts,
            "positive": texts[positive_idx],
            "negative": texts[negative_idx],
            "task_name": task_name,
        }
    )
    return triplets.sort_values("row", kind="stable").reset_index(drop=True), singletons


def prepare_task(
    source: ClassificationSource, root: Path, seed: int, max_per_task: int | None
) -> tuple[pd.DataFrame, TaskReport, list[SkippedRow]]:
    """Read, validate and turn one source into triplets, accounting for every input row."""
    frame, skipped, input_rows = read_classification_source(source, root)
    report = TaskReport(task_name=source.name, file=source.path, input_rows=input_rows)
    report.quarantined = len(skipped)
    path = source.path
    triplets, singletons = build_triplets(frame, source.name, seed)
    for row, text in singletons[["row", "text"]].itertuples(index=False):
        skipped.append(SkippedRow(path, int(row), "label", "label has a single example", text[:200]))
    report.quarantined += len(singletons)
    degenerate = (triplets["anchor"] == triplets["positive"]) | (triplets["anchor"] == triplets["negative"])
    for row, text in triplets.loc[degenerate, ["row", "anchor"]].itertuples(index=False):
        skipped.append(SkippedRow(path, int(row), "positive", "anchor equals its positive or negative", text[:200]))
    report.degenerate = int(degenerate.sum())
    triplets = triplets[~degenerate]
    dupes = triplets.duplicated(subset=["anchor", "positive", "negative"], keep="first")
    for row, text in triplets.loc[dupes, ["row", "anchor"]].itertuples(index=False):
        skipped.append(SkippedRow(path, int(row), "anchor", "duplicate triplet", text[:200]))
    report.duplicates = int(dupes.sum())
    triplets = triplets[~dupes]
    if max_per_task is not None and len(triplets) > max_per_task:
        rng = np.random.default_rng(_task_seed(seed + 1, source.name))
        keep = np.sort(rng.choice(len(triplets), size=max_per_task, replace=False))
        report.not_sampled = len(triplets) - max_per_task
        triplets = triplets.iloc[keep]
    report.kept = len(triplets)
    report.labels = int(frame["label"].nunique())
    report.reasons = dict(Counter(s.reason for s in skipped))
    report.check_identity()
    return triplets.drop(columns="row").reset_index(drop=True), report, skipped


def prepare_data(settings: DataSettings, root: Path, seed: int) -> tuple[pd.DataFrame, DataReport, list[SkippedRow]]:
    """Triplets from every configured classification source, concatenated in config order."""
    frames, reports, skipped = [], [], []
    for source in settings.classification:
        triplets, report, task_skipped = prepare_task(source, root, seed, settings.max_per_task)
        log.info(
            "%s: %d triplets from %d rows (%d skipped)",
            source.name,
            report.kept,
            report.input_rows,
            len(task_skipped),
        )
        frames.append(triplets)
        reports.append(report)
        skipped.extend(task_skipped)
    data = pd.concat(frames, ignore_index=True)[TRIPLET_COLUMNS]
    report = DataReport(reports)
    report.check_identity()
    return data, report, skipped


def write_outputs(
    data: pd.DataFrame,
    report: DataReport,
    skipped: list[SkippedRow],
    output: Path,
    report_path: Path,
    quarantine: Path,
) -> None:
    """Write the triplets (Parquet), the report (JSON metrics) and skipped rows (CSV), deterministically."""
    for path in (output, report_path, quarantine):
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(output.suffix + ".tmp")
    data.to_parquet(tmp, index=False)
    tmp.replace(output)
    report_path.write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n")
    pd.DataFrame([asdict(s) for s in skipped], columns=QUARANTINE_COLUMNS).to_csv(quarantine, index=False)


def load_triplets(path: Path) -> pd.DataFrame:
    """Read the prepared triplets, checking the columns training relies on."""
    if not path.is_file():
        raise DataError(f"{path}: prepared triplets not found; run `gist data` (or `dvc repro data`) first")
    frame = pd.read_parquet(path)
    missing = [c for c in TRIPLET_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}")
    if frame.empty:
        raise DataError(f"{path}: no triplets")
    return frame
