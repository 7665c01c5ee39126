"""MEDI, the INSTRUCTOR training set, as (anchor, positive, negative, task_name) triplets.

Two record shapes are read:

- the original ``medi-data.json``: ``{"query": [instruction, text], "pos": [instruction, text],
  "neg": [instruction, text], "task_name": ...}`` (``task_id`` where there is no task name);
- the flattened one of the Hub copies (e.g. ``avsolatorio/medi-data-mteb_avs_triplets``): string
  columns ``query``, ``pos``, ``neg``, ``task_name`` and ``query_instruct``, ``pos_instruct``,
  ``neg_instruct``.

From a local file (a JSON list, JSON Lines, either optionally gzipped, or Parquet) or a Hugging
Face Hub dataset id when the Hub is reachable. Instructions are dropped by default, as GIST trains
without them; with ``keep_instructions`` each text becomes ``"<instruction> <text>"``. Each
malformed record is quarantined with its record number and the reason; the load fails only when
the input as a whole is unusable (missing file, wrong top-level shape, missing columns, or more
than ``max_bad_fraction`` of the records malformed).
"""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gist_core.config import MediSettings
from gist_core.data.audit import SourceReport
from gist_core.errors import DataError
from gist_core.models import HUB_ID
from gist_core.readers import SkippedRow, Unparsable, first_rows, iter_jsonl, skipped_row, text_problem

log = logging.getLogger(__name__)

TEXT_FIELDS = ("query", "pos", "neg")
MEDI_SOURCE = "MEDI"


@dataclass
class MediData:
    triplets: pd.DataFrame  # row, anchor, positive, negative, task_name
    report: SourceReport
    skipped: list[SkippedRow]


def _open_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: cannot be read: {err}") from None


def _format(path: Path, configured: str) -> str:
    if configured != "auto":
        return configured
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    last = suffixes[-1] if suffixes else ""
    if last in (".parquet", ".pq"):
        return "parquet"
    if last in (".jsonl", ".ndjson"):
        return "jsonl"
    if last == ".json":
        return "json"
    raise DataError(f"{path}: cannot tell the MEDI format from the name; set data.medi.format")


def _json_records(path: Path, fmt: str) -> Iterator[tuple[int, Any]]:
    """(record number, record) pairs; a line that is not JSON yields an ``Unparsable`` marker."""
    if fmt == "jsonl":
        yield from iter_jsonl(path)
        return
    raw = _open_bytes(path)
    if fmt == "json" and raw.lstrip()[:1] == b"[":
        try:
            records = json.loads(raw.decode("utf-8", errors="surrogateescape"))
        except ValueError as err:
            raise DataError(f"{path}: not valid JSON: {err}") from None
        yield from enumerate(records, start=1)
        return
    if fmt == "json":
        try:
            whole = json.loads(raw.decode("utf-8", errors="surrogateescape"))
        except ValueError:
            whole = None  # not one JSON document: read it as JSON Lines
        if whole is not None:
            raise DataError(
                f"{path}: a JSON {type(whole).__name__}, expected a list of MEDI records "
                '({"query": [instruction, text], "pos": [...], "neg": [...], "task_name": ...}) or JSON Lines'
            )
    yield from iter_jsonl(path)


def _check_columns(columns: list[str], where: str) -> None:
    missing = [c for c in TEXT_FIELDS if c not in columns]
    if missing or not ({"task_name", "task_id"} & set(columns)):
        need = missing + ([] if {"task_name", "task_id"} & set(columns) else ["task_name (or task_id)"])
        raise DataError(f"{where}: not MEDI data: missing column(s) {need} (has {columns})")


def _table_records(frame: pd.DataFrame, where: str) -> Iterator[tuple[int, Any]]:
    _check_columns([str(c) for c in frame.columns], where)
    yield from enumerate(frame.to_dict("records"), start=1)


def _hub_records(settings: MediSettings) -> Iterator[tuple[int, Any]]:
    try:
        # deferred: datasets is only needed for a Hub copy of MEDI
        from datasets import load_dataset

        dataset = load_dataset(settings.path, split=settings.split, revision=settings.revision)
    except Exception as err:  # noqa: BLE001 - any Hub or loader failure becomes one clear line
        raise DataError(
            f"MEDI: could not load the Hub dataset {settings.path!r} (split {settings.split!r}): "
            f"{type(err).__name__}: {err}. Is the Hub reachable (HF_HUB_OFFLINE unset)? "
            "Otherwise download it and set data.medi.path to the file."
        ) from None
    yield from _table_records(dataset.to_pandas(), f"Hub dataset {settings.path}")


def _records(settings: MediSettings, root: Path) -> tuple[str, Iterator[tuple[int, Any]]]:
    path = Path(settings.path).expanduser()
    path = path if path.is_absolute() else root / path
    if path.is_file():
        fmt = _format(path, settings.format)
        if fmt == "parquet":
            try:
                frame = pd.read_parquet(path)
            except (OSError, ValueError) as err:
                raise DataError(f"{path}: cannot be read as Parquet: {err}") from None
            return settings.path, _table_records(frame, str(path))
        return settings.path, _json_records(path, fmt)
    looks_like_file = bool(Path(settings.path).suffix) or settings.path.startswith((".", "/", "~"))
    if HUB_ID.match(settings.path) and not looks_like_file:
        return settings.path, _hub_records(settings)
    raise DataError(f"{path}: MEDI file not found (data.medi.path)")


def _text(value: Any, instruction: Any, fld: str, keep: bool, max_chars: int) -> tuple[str | None, str]:
    """(text, "") or (None, reason) for one of query/pos/neg."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, list | tuple):
        if len(value) != 2:
            return None, f"{fld}: expected [instruction, text], got a list of {len(value)}"
        instruction, value = value
        if not isinstance(instruction, str):
            return None, f"{fld}: instruction is {type(instruction).__name__}, not a string"
    elif not isinstance(value, str):
        return None, f"{fld} is {type(value).__name__}, not [instruction, text] or a string"
    problem = text_problem(value, max_chars)
    if problem:
        return None, f"{fld}: {problem}"
    instruction = instruction.strip() if isinstance(instruction, str) else ""
    return (f"{instruction} {value}" if keep and instruction else value), ""


def _task_name(record: dict[str, Any]) -> str | None:
    name = record.get("task_name")
    if isinstance(name, str) and name.strip():
        return name.strip()
    task_id = record.get("task_id")
    if isinstance(task_id, int | np.integer) and not isinstance(task_id, bool):
        return f"medi-task-{int(task_id)}"
    if isinstance(task_id, str) and task_id.strip():
        return f"medi-task-{task_id.strip()}"
    return None


def parse_record(record: Any, keep_instructions: bool, max_chars: int) -> tuple[tuple[str, ...] | None, str, str]:
    """((anchor, positive, negative, task_name), "", "") or (None, field, reason) for one MEDI record."""
    if isinstance(record, Unparsable):
        return None, "record", record.reason
    if not isinstance(record, dict):
        return None, "record", f"record is a {type(record).__name__}, not an object"
    missing = [f for f in TEXT_FIELDS if record.get(f) is None]
    if missing:
        return None, missing[0], f"missing field(s) {missing}"
    texts = []
    for fld in TEXT_FIELDS:
        text, reason = _text(record[fld], record.get(f"{fld}_instruct"), fld, keep_instructions, max_chars)
        if text is None:
            return None, fld, reason
        texts.append(text)
    task = _task_name(record)
    if task is None:
        return None, "task_name", "missing task_name (or task_id)"
    return (*texts, task), "", ""


def load_medi(settings: MediSettings, root: Path, max_text_chars: int, max_bad_fraction: float) -> MediData:
    """Read MEDI into triplets, quarantining malformed records and dropping degenerate ones."""
    file, records = _records(settings, root)
    report = SourceReport(name=MEDI_SOURCE, kind="medi", file=file)
    skipped: list[SkippedRow] = []
    rows: list[tuple[int, str, str, str, str]] = []
    for number, record in records:
        report.input_rows += 1
        parsed, fld, reason = parse_record(record, settings.keep_instructions, max_text_chars)
        if parsed is None:
            shown = record.get("query") if isinstance(record, dict) else record
            skipped.append(skipped_row(file, number, fld, reason, shown if not isinstance(shown, Unparsable) else ""))
            report.count("quarantined", reason)
            continue
        anchor, positive, negative, task = parsed
        if anchor in (positive, negative):
            reason = "anchor equals its positive or negative"
            skipped.append(skipped_row(file, number, "positive" if anchor == positive else "negative", reason, anchor))
            report.count("degenerate", reason)
            continue
        rows.append((number, anchor, positive, negative, task))
    if report.input_rows == 0:
        raise DataError(f"{file}: no MEDI records")
    if report.quarantined > max_bad_fraction * report.input_rows:
        first = first_rows(skipped, noun="record")
        raise DataError(
            f"{file}: {report.quarantined} of {report.input_rows} MEDI records are malformed (more than "
            f"data.max_bad_fraction {max_bad_fraction}); first: {first}"
        )
    triplets = pd.DataFrame(rows, columns=["row", "anchor", "positive", "negative", "task_name"])
    log.info("MEDI %s: %d triplets from %d records", file, len(triplets), report.input_rows)
    return MediData(triplets, report, skipped)
