"""Reading input files: the one set of readers for training data and evaluation tasks, with one set of bad-row rules.

Formats: ``csv`` and ``tsv`` (a header line), ``jsonl`` (one JSON object a line, ``.gz`` allowed),
``parquet``, and ``lastsep`` (``text<sep>label`` lines after a header, split on the *last*
separator because texts may contain it). ``read_records`` returns every readable row with its
1-based row number (after the header; the line number for JSON Lines) and lists each unreadable one
as a ``SkippedRow`` (file, row, field, reason, text), never dropping a row silently:

- a blank line, a line that is not valid UTF-8, a record with the wrong number of fields, a JSON
  line that does not parse or is not an object: skipped, with the reason;
- a file that is missing, empty, or cannot be parsed at all: ``DataError`` naming the file.

``read_labelled`` adds the checks a labelled text must pass (``text_problem``, ``label_problem``)
and fails only when more than ``max_bad_fraction`` of the rows are unusable, naming the first ones.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from gist_core.errors import DataError

TableFormat = Literal["csv", "tsv", "jsonl", "parquet", "lastsep"]
QUARANTINE_COLUMNS = ["file", "row", "field", "reason", "text"]
DEFAULT_MAX_TEXT_CHARS = 20_000
# Bytes that were not valid UTF-8, decoded with errors="surrogateescape".
UNDECODABLE = re.compile("[\udc80-\udcff]")


# ---------------------------------------------------------------- bad rows


@dataclass
class SkippedRow:
    """A row that did not become data, with where it came from and why."""

    file: str
    row: int  # 1-based data row (after the header) or JSON record / line number
    field: str
    reason: str
    text: str = ""


def skipped_row(file: str, row: int, fld: str, reason: str, text: object = "") -> SkippedRow:
    """A SkippedRow whose text is cut to 200 characters, with undecodable bytes shown as U+FFFD."""
    shown = text if isinstance(text, str) else repr(text)
    return SkippedRow(file, int(row), fld, reason, UNDECODABLE.sub("\ufffd", shown[:200]))


def skipped_frame(
    file: str | pd.Series, rows: Any, fld: str | pd.Series, reason: str | pd.Series, texts: pd.Series
) -> pd.DataFrame:
    """Many skipped rows at once, in the quarantine CSV's columns (``QUARANTINE_COLUMNS``), texts cut to 200 characters.

    The vectorised form of ``skipped_row`` for rows a stage removes in bulk (duplicates,
    contamination): no Python object per row.
    """
    n = len(texts)
    text = pa.array(texts.array) if hasattr(texts.array, "__arrow_array__") else pa.array(texts.astype(object))
    frame = pd.DataFrame(
        {
            "file": file if isinstance(file, pd.Series) else np.repeat(np.array([file], dtype=object), n),
            "row": np.asarray(rows, dtype=np.int64),
            "field": fld if isinstance(fld, pd.Series) else np.repeat(np.array([fld], dtype=object), n),
            "reason": reason if isinstance(reason, pd.Series) else np.repeat(np.array([reason], dtype=object), n),
            "text": pd.Series(pc.utf8_slice_codeunits(pc.fill_null(text, ""), 0, 200), dtype="str"),
        }
    )
    for column in ("file", "field", "reason"):
        frame[column] = frame[column].to_numpy(dtype=object)
    return frame[QUARANTINE_COLUMNS]


def first_rows(skipped: list[SkippedRow], n: int = 3, noun: str = "row") -> str:
    """``row 3 (text: blank line); row 9 (...)``: the first skipped rows, for error messages."""
    ordered = sorted(skipped, key=lambda s: s.row)[:n]
    return "; ".join(f"{noun} {s.row} ({s.field}: {s.reason})" for s in ordered)


def text_problem(text: object, max_chars: int = DEFAULT_MAX_TEXT_CHARS) -> str:
    """Why a value cannot be a text ("" when it can)."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return "missing text"
    if not isinstance(text, str):
        return f"text is {type(text).__name__}, not a string"
    if not text.strip():
        return "empty or whitespace text"
    if UNDECODABLE.search(text):
        return "not valid UTF-8"
    if "\ufffd" in text:
        return "not valid UTF-8 (replacement characters)"
    if "\x00" in text:
        return "text contains NUL characters"
    if len(text) > max_chars:
        return f"text longer than {max_chars} characters"
    return ""


def label_problem(label: object) -> str:
    """Why a value cannot be a class label ("" when it can): a non-empty string or a number."""
    if label is None or (isinstance(label, float) and math.isnan(label)):
        return "missing label"
    if isinstance(label, bool) or not isinstance(label, str | int | float | np.integer):
        return f"label is {type(label).__name__}, not a string or a number"
    if not str(label).strip():
        return "missing label"
    if isinstance(label, str) and UNDECODABLE.search(label):
        return "label is not valid UTF-8"
    return ""


def label_text(label: object) -> str:
    """A label as the string stored (1 and 1.0 are the same class; surrounding spaces dropped)."""
    if isinstance(label, float | np.floating) and float(label).is_integer():
        return str(int(label))
    return str(label).strip()


# ---------------------------------------------------------------- line and record readers


@dataclass(frozen=True)
class Unparsable:
    """A JSON line that could not be read, and why."""

    reason: str


def open_binary(path: Path) -> IO[bytes]:
    """The file's bytes, decompressed when its name ends in ``.gz``."""
    try:
        return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")
    except OSError as err:
        raise DataError(f"{path}: cannot be read: {err}") from None


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line number, record)`` per line, streamed; an unreadable line yields an ``Unparsable``."""
    with open_binary(path) as handle:
        try:
            for number, raw in enumerate(handle, start=1):
                line = raw.rstrip(b"\r\n")
                if not line.strip():
                    yield number, Unparsable("blank line")
                    continue
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError:
                    yield number, Unparsable("not valid UTF-8")
                    continue
                try:
                    yield number, json.loads(text)
                except ValueError as err:
                    yield number, Unparsable(f"not valid JSON ({err})")
        except (OSError, EOFError) as err:  # a truncated or corrupt .gz
            raise DataError(f"{path}: cannot be read: {err}") from None


def _decode(path: Path) -> str:
    try:
        with open_binary(path) as handle:
            raw = handle.read()
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: cannot be read: {err}") from None
    text = raw.decode("utf-8", errors="surrogateescape")  # bad bytes are found per row (text_problem)
    return text[1:] if text.startswith("\ufeff") else text


def _read_lastsep(path: Path, label: str, separator: str, skipped: list[SkippedRow]) -> pd.DataFrame:
    with open_binary(path) as handle:
        raw_lines = handle.read().splitlines()
    if not raw_lines:
        raise DataError(f"{path}: file is empty")
    header = raw_lines[0].decode("utf-8", errors="replace").lstrip("\ufeff").strip().rsplit(separator, 1)
    if len(header) != 2:
        raise DataError(f"{path}: header {raw_lines[0][:80]!r} is not '<text>{separator}<label>'")
    text_col, label_col = header
    rows: list[tuple[int, str, str]] = []
    for i, raw in enumerate(raw_lines[1:], start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(skipped_row(label, i, "text", "not valid UTF-8", raw.decode("utf-8", "replace")))
            continue
        if not line.strip():
            skipped.append(skipped_row(label, i, "text", "blank line"))
            continue
        if separator not in line:
            skipped.append(skipped_row(label, i, label_col, f"no {separator!r} separator", line))
            continue
        text, value = line.rsplit(separator, 1)
        rows.append((i, text, value))
    return pd.DataFrame(rows, columns=["row", text_col, label_col])


def _read_delimited(path: Path, label: str, delimiter: str, skipped: list[SkippedRow]) -> pd.DataFrame:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = csv.reader(io.StringIO(_decode(path), newline=""), delimiter=delimiter)
    row = 0
    try:
        header = next(reader, None)
        if not header:
            raise DataError(f"{path}: file is empty (no header line)")
        records = []
        for row, record in enumerate(reader, start=1):  # noqa: B007 - row is reported if parsing fails
            if not record:
                skipped.append(skipped_row(label, row, "row", "blank line"))
            elif len(record) != len(header):
                reason = f"expected {len(header)} fields, got {len(record)}"
                skipped.append(skipped_row(label, row, "row", reason, delimiter.join(record)))
            else:
                records.append([row, *record])
    except csv.Error as err:
        kind = "csv" if delimiter == "," else "tsv"
        raise DataError(f"{path}: row {row + 1}: cannot be parsed as {kind}: {err}") from None
    return pd.DataFrame(records, columns=["row", *header], dtype=object)


def read_json_objects(path: Path, skipped: list[SkippedRow], label: str | None = None) -> list[dict[str, Any]]:
    """The JSON objects of a JSON Lines file, each with its line number as ``row``; other lines go to ``skipped``."""
    name = label if label is not None else str(path)
    records = []
    for number, record in iter_jsonl(path):
        if isinstance(record, Unparsable):
            skipped.append(skipped_row(name, number, "row", record.reason))
        elif not isinstance(record, dict):
            reason = f"a JSON {type(record).__name__}, not an object"
            skipped.append(skipped_row(name, number, "row", reason, json.dumps(record)[:200]))
        else:
            records.append({"row": number, **record})
    return records


def _read_jsonl(path: Path, label: str, skipped: list[SkippedRow]) -> pd.DataFrame:
    records = read_json_objects(path, skipped, label)
    columns = {c for r in records for c in r}
    return pd.DataFrame(records, columns=["row", *sorted(columns - {"row"})], dtype=object)


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot be read as parquet: {err}") from None
    frame = frame.astype(object)
    frame.insert(0, "row", np.arange(1, len(frame) + 1))
    return frame


def read_records(
    path: Path, fmt: TableFormat, skipped: list[SkippedRow], *, separator: str = ";", label: str | None = None
) -> pd.DataFrame:
    """Every readable row of a file as a DataFrame with a ``row`` column; unreadable rows go to ``skipped``.

    ``label`` is how the file is named in ``skipped`` (default: the path as given).
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    name = label if label is not None else str(path)
    if fmt == "parquet":
        return _read_parquet(path)
    if fmt == "jsonl":
        return _read_jsonl(path, name, skipped)
    if fmt == "lastsep":
        return _read_lastsep(path, name, separator, skipped)
    return _read_delimited(path, name, "," if fmt == "csv" else "\t", skipped)


def read_labelled(
    path: Path,
    fmt: TableFormat,
    text_column: str,
    label_column: str,
    *,
    separator: str = ";",
    label: str | None = None,
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
    max_bad_fraction: float = 1.0,
    where: str = "",
) -> tuple[pd.DataFrame, list[SkippedRow], int]:
    """Labelled texts as ``(row, text, label)``, every row checked; returns (rows, skipped rows, input rows).

    A row whose text or label is unusable is skipped with the field and reason. Fails (DataError
    naming the file) when the file is unusable as a whole: missing, empty, unparseable, without
    the columns, or with more than ``max_bad_fraction`` of its rows unusable. ``where`` names the
    setting that points at the file, for the messages.
    """
    name = label if label is not None else str(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found" + (f" ({where})" if where else ""))
    skipped: list[SkippedRow] = []
    frame = read_records(path, fmt, skipped, separator=separator, label=name)
    missing = [c for c in (text_column, label_column) if c not in frame.columns]
    if missing:
        have = [c for c in frame.columns if c != "row"]
        raise DataError(
            f"{path}: missing column(s) {missing} (has {have}); set text_column/label_column"
            + (f" of {where}" if where else "")
        )
    input_rows = len(frame) + len(skipped)
    if input_rows == 0:
        raise DataError(f"{path}: no data rows")
    frame = frame[["row", text_column, label_column]].set_axis(["row", "text", "label"], axis=1)
    good = []
    for row, text, value in frame.itertuples(index=False):
        problem, fld = text_problem(text, max_text_chars), "text"
        if not problem:
            problem, fld = label_problem(value), "label"
        if problem:
            skipped.append(skipped_row(name, row, fld, problem, text))
        good.append(not problem)
    if len(skipped) > max_bad_fraction * input_rows:
        raise DataError(
            f"{path}: {len(skipped)} of {input_rows} rows are unusable (more than data.max_bad_fraction "
            f"{max_bad_fraction}); first: {first_rows(skipped)}"
        )
    frame = frame[np.array(good, dtype=bool)].copy()
    frame["row"] = frame["row"].astype(np.int64)
    frame["text"] = frame["text"].astype(str)
    frame["label"] = frame["label"].map(label_text).astype(str)
    skipped.sort(key=lambda s: s.row)
    return frame.reset_index(drop=True), skipped, input_rows


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """BEIR qrels (query-id, corpus-id, score; tab-separated, with a header) as {query: {doc: score}}."""
    skipped: list[SkippedRow] = []
    frame = read_records(path, "tsv", skipped)
    if skipped:
        raise DataError(f"{path}: unreadable qrels rows: {first_rows(skipped)}")
    missing = [c for c in ("query-id", "corpus-id", "score") if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing} (has {[c for c in frame.columns if c != 'row']})")
    qrels: dict[str, dict[str, int]] = {}
    for row, query, doc, score in frame[["row", "query-id", "corpus-id", "score"]].itertuples(index=False):
        try:
            qrels.setdefault(query, {})[doc] = int(score)
        except (TypeError, ValueError):
            raise DataError(f"{path}:{row + 1}: score {score!r} is not an integer") from None
    return qrels


def write_skipped(skipped: list[SkippedRow], path: Path, frames: Iterable[pd.DataFrame] = ()) -> None:
    """Write skipped rows as a CSV (file, row, field, reason, text) a person can open.

    ``frames`` (``skipped_frame``) follow the listed rows, in order.
    """
    parts = [pd.DataFrame([vars(s) for s in skipped], columns=QUARANTINE_COLUMNS)]
    parts += [f[QUARANTINE_COLUMNS] for f in frames if len(f)]
    frame = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    frame.to_csv(path, index=False, lineterminator="\n")


def read_skipped(path: Path) -> list[SkippedRow]:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    return [SkippedRow(r.file, int(r.row), r.field, r.reason, r.text) for r in frame.itertuples()]
