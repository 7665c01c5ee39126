"""MEDI, the INSTRUCTOR training set, as (anchor, positive, negative, task_name) triplets.

Two record shapes are read:

- the original ``medi-data.json``: ``{"query": [instruction, text], "pos": [instruction, text],
  "neg": [instruction, text], "task_name": ...}`` (``task_id`` where there is no task name);
- the flattened one of the Hub copies (e.g. ``avsolatorio/medi-data-mteb_avs_triplets``): string
  columns ``query``, ``pos``, ``neg``, ``task_name`` and ``query_instruct``, ``pos_instruct``,
  ``neg_instruct``.

From a local file (a JSON list, JSON Lines, either optionally gzipped, or Parquet) or a Hugging
Face Hub dataset id when the Hub is reachable. Files are streamed: a JSON list through ijson's C
parser, JSON Lines line by line, Parquet in row batches; kept rows are held as Arrow-backed
columns, so memory grows with the kept triplets only. Instructions are dropped by default, as GIST trains
without them; with ``keep_instructions`` each text becomes ``"<instruction> <text>"``. Each
malformed record is quarantined with its record number and the reason; the load fails only when
the input as a whole is unusable (missing file, wrong top-level shape, missing columns, or more
than ``max_bad_fraction`` of the records malformed).
"""

from __future__ import annotations

import codecs
import gzip
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ijson
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gist_core.config import MediSettings
from gist_core.data.audit import SourceReport
from gist_core.data.contamination import normalize_texts
from gist_core.errors import DataError
from gist_core.models import HUB_ID
from gist_core.readers import (
    QUARANTINE_COLUMNS,
    SkippedRow,
    Unparsable,
    first_rows,
    iter_jsonl,
    skipped_frame,
    skipped_row,
    text_problem,
)

log = logging.getLogger(__name__)

TEXT_FIELDS = ("query", "pos", "neg")
MEDI_KEYS = frozenset({*TEXT_FIELDS, "task_name", "task_id", *(f"{f}_instruct" for f in TEXT_FIELDS)})
MEDI_SOURCE = "MEDI"
MEDI_COLUMNS = ["row", "anchor", "positive", "negative", "task_name"]
RECORD_CHUNK = 65_536  # records parsed before they are turned into columns
READ_BYTES = 1 << 16
PROGRESS_RECORDS = 200_000  # a log line every this many records
EXACT_DEGENERATE = "anchor equals its positive or negative"
NEAR_DEGENERATE = "anchor equals its positive or negative after case and whitespace normalisation"


@dataclass
class MediData:
    triplets: pd.DataFrame  # row, anchor, positive, negative, task_name
    report: SourceReport
    skipped: list[SkippedRow]  # malformed records
    degenerate: pd.DataFrame | None = None  # skipped_frame of records whose anchor equals its positive or negative

    def removed(self) -> pd.DataFrame:
        """Every record that did not become a triplet, in the quarantine CSV's columns."""
        listed = pd.DataFrame([vars(s) for s in self.skipped], columns=QUARANTINE_COLUMNS)
        parts = [listed, *([self.degenerate] if self.degenerate is not None and len(self.degenerate) else [])]
        return pd.concat(parts, ignore_index=True) if len(parts) > 1 else listed


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


@dataclass(frozen=True)
class StreamBroken(Unparsable):
    """A JSON list whose syntax breaks at a record: the stream cannot go on past it."""

    unread_fraction: float = 0.0


class _Utf8Stream:
    """A file's bytes (decompressed when ``.gz``) with invalid UTF-8 replaced by U+FFFD, read in chunks.

    A record holding bad bytes then fails ``text_problem`` on its own instead of stopping the JSON
    parser; ``fraction_read`` tells how far into the file (its stored bytes) the stream has got.
    """

    def __init__(self, path: Path) -> None:
        try:
            self.raw = path.open("rb")
        except OSError as err:
            raise DataError(f"{path}: cannot be read: {err}") from None
        self.size = max(path.stat().st_size, 1)
        self.source: Any = gzip.GzipFile(fileobj=self.raw) if path.suffix == ".gz" else self.raw
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.path = path
        self.started = False

    def read(self, size: int = -1) -> bytes:
        if size == 0:  # ijson probes the stream's type with read(0)
            return b""
        size = size if size > 0 else READ_BYTES
        while True:
            try:
                raw = self.source.read(size)
            except (OSError, EOFError) as err:  # a truncated or corrupt .gz
                raise DataError(f"{self.path}: cannot be read: {err}") from None
            text = self.decoder.decode(raw, final=not raw)
            if not self.started and text:
                text, self.started = text.lstrip("\ufeff"), True
            if text or not raw:
                return text.encode("utf-8")

    def fraction_read(self) -> float:
        return min(self.raw.tell() / self.size, 1.0)

    def close(self) -> None:
        self.raw.close()


def _first_byte(path: Path) -> bytes:
    stream = _Utf8Stream(path)
    try:
        return stream.read(4096).lstrip()[:1]
    finally:
        stream.close()


def _stream_json_list(path: Path) -> Iterator[tuple[int, Any]]:
    """The records of a JSON list, parsed as they stream in (ijson); a syntax error ends the stream.

    The record where the syntax breaks is yielded as a ``StreamBroken`` marker with its number;
    the records before it have been yielded already. Nothing after it can be told apart, so the
    marker carries the share of the file left unread.
    """
    stream = _Utf8Stream(path)
    number = 0
    try:
        for number, record in enumerate(ijson.items(stream, "item", use_float=True), start=1):  # noqa: B007
            yield number, record
            if number % PROGRESS_RECORDS == 0:
                log.info(
                    "MEDI %s: %d records read (%.0f%% of the file)", path.name, number, 100 * stream.fraction_read()
                )
    except ijson.JSONError as err:
        unread = 1.0 - stream.fraction_read()
        where = f"; the file cannot be read past it (about {unread:.0%} of its bytes unread)" if unread > 0 else ""
        yield number + 1, StreamBroken(f"not valid JSON ({err}){where}", unread)
    finally:
        stream.close()


def _first_key(path: Path) -> str | None:
    """The first object key of a file that does not start with ``[`` (None when there is none)."""
    stream = _Utf8Stream(path)
    try:
        for _prefix, event, value in ijson.parse(stream, multiple_values=True):
            if event == "map_key":
                return str(value)
            if event not in ("start_map",):
                return None
    except ijson.JSONError:
        return None
    finally:
        stream.close()
    return None


def _json_records(path: Path, fmt: str) -> Iterator[tuple[int, Any]]:
    """(record number, record) pairs, streamed; a record that is not JSON yields an ``Unparsable`` marker."""
    if fmt == "json" and _first_byte(path) == b"[":
        yield from _stream_json_list(path)
        return
    if fmt == "json" and _first_byte(path) == b"{":
        key = _first_key(path)
        if key is not None and key not in MEDI_KEYS:
            raise DataError(
                f"{path}: a JSON dict, expected a list of MEDI records "
                '({"query": [instruction, text], "pos": [...], "neg": [...], "task_name": ...}) or JSON Lines'
            )
    elif fmt == "json":
        raise DataError(f"{path}: not a JSON list of MEDI records or JSON Lines")
    for number, record in iter_jsonl(path):
        yield number, record
        if number % PROGRESS_RECORDS == 0:
            log.info("MEDI %s: %d lines read", path.name, number)


def _check_columns(columns: list[str], where: str) -> None:
    missing = [c for c in TEXT_FIELDS if c not in columns]
    if missing or not ({"task_name", "task_id"} & set(columns)):
        need = missing + ([] if {"task_name", "task_id"} & set(columns) else ["task_name (or task_id)"])
        raise DataError(f"{where}: not MEDI data: missing column(s) {need} (has {columns})")


def _table_records(frame: pd.DataFrame, where: str) -> Iterator[tuple[int, Any]]:
    _check_columns([str(c) for c in frame.columns], where)
    yield from enumerate(frame.to_dict("records"), start=1)


def _parquet_records(path: Path) -> Iterator[tuple[int, Any]]:
    """The rows of a Parquet file as records, read in batches (never the whole table at once)."""
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, ValueError, pa.ArrowException) as err:
        raise DataError(f"{path}: cannot be read as Parquet: {err}") from None
    _check_columns(parquet.schema_arrow.names, str(path))
    number = 0
    try:
        for batch in parquet.iter_batches(batch_size=RECORD_CHUNK):
            for record in batch.to_pylist():
                number += 1
                yield number, record
            log.info("MEDI %s: %d of %d rows read", path.name, number, parquet.metadata.num_rows)
    except (OSError, ValueError, pa.ArrowException) as err:
        raise DataError(f"{path}: cannot be read as Parquet past row {number}: {err}") from None


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
            return settings.path, _parquet_records(path)
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


def _degenerate(file: str, chunk: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
    """Rows whose anchor equals its positive or negative, exactly or after case and whitespace normalisation."""
    anchor = normalize_texts(chunk["anchor"])
    same = {
        c: pc.equal(anchor, normalize_texts(chunk[c])).to_numpy(zero_copy_only=False) for c in ("positive", "negative")
    }
    exact = {c: (chunk["anchor"] == chunk[c]).to_numpy(dtype=bool) for c in ("positive", "negative")}
    bad = same["positive"] | same["negative"]
    fld = np.where(same["positive"], "positive", "negative")
    reason = np.where(
        np.where(same["positive"], exact["positive"], exact["negative"]),
        EXACT_DEGENERATE,
        NEAR_DEGENERATE,
    )
    removed = chunk[bad]
    frame = skipped_frame(
        file, removed["row"], pd.Series(fld[bad], dtype=object), pd.Series(reason[bad], dtype=object), removed["anchor"]
    )
    return bad, frame


def _chunk_table(rows: list[tuple[int, str, str, str, str]]) -> pd.DataFrame:
    columns = list(zip(*rows, strict=True)) if rows else [[] for _ in MEDI_COLUMNS]
    return pd.DataFrame(
        {
            "row": np.asarray(columns[0], dtype=np.int64),
            **{
                name: pd.Series(values, dtype="str") for name, values in zip(MEDI_COLUMNS[1:], columns[1:], strict=True)
            },
        }
    )


def load_medi(settings: MediSettings, root: Path, max_text_chars: int, max_bad_fraction: float) -> MediData:
    """Read MEDI into triplets, streaming, quarantining malformed records and dropping degenerate ones.

    Records are parsed as they stream in and kept in chunks of ``RECORD_CHUNK`` rows (Arrow-backed
    columns), so memory holds the kept triplets and little else. A JSON list whose syntax breaks
    mid-file keeps the records before the break, quarantines the broken one with its number, and
    counts the unread rest of the file against ``max_bad_fraction``.
    """
    file, records = _records(settings, root)
    report = SourceReport(name=MEDI_SOURCE, kind="medi", file=file)
    skipped: list[SkippedRow] = []
    chunks: list[pd.DataFrame] = []
    degenerate: list[pd.DataFrame] = []
    rows: list[tuple[int, str, str, str, str]] = []
    unread = 0.0

    def flush() -> None:
        if not rows:
            return
        chunk = _chunk_table(rows)
        rows.clear()
        bad, frame = _degenerate(file, chunk)
        for reason, count in frame["reason"].value_counts(sort=False).items():
            report.count("degenerate", str(reason), int(count))
        degenerate.append(frame)
        chunks.append(chunk[~bad])

    for number, record in records:
        report.input_rows += 1
        parsed, fld, reason = parse_record(record, settings.keep_instructions, max_text_chars)
        if parsed is None:
            shown = record.get("query") if isinstance(record, dict) else record
            skipped.append(skipped_row(file, number, fld, reason, shown if not isinstance(shown, Unparsable) else ""))
            report.count("quarantined", reason)
            if isinstance(record, StreamBroken):
                unread = record.unread_fraction
            continue
        rows.append((number, *parsed))
        if len(rows) >= RECORD_CHUNK:
            flush()
    flush()
    if report.input_rows == 0:
        raise DataError(f"{file}: no MEDI records")
    if report.quarantined > max_bad_fraction * report.input_rows or unread > max_bad_fraction:
        first = first_rows(skipped, noun="record")
        lost = f", and {unread:.0%} of the file could not be read" if unread else ""
        raise DataError(
            f"{file}: {report.quarantined} of {report.input_rows} MEDI records are malformed{lost} (more than "
            f"data.max_bad_fraction {max_bad_fraction}); first: {first}"
        )
    triplets = pd.concat(chunks, ignore_index=True) if chunks else _chunk_table([])
    log.info("MEDI %s: %d triplets from %d records", file, len(triplets), report.input_rows)
    removed = (
        pd.concat(degenerate, ignore_index=True)
        if degenerate
        else skipped_frame(file, [], "", "", pd.Series([], dtype="str"))
    )
    return MediData(triplets, report, skipped, removed)
